"""Many coders per read: N coders stepping one stream of batches, against N trials that each read the cache.

A sweep trial with `resources.coders_per_trial: N` reads and decodes each batch once and steps it through its N
coders (`ray_jobs.sweep_trial`); N separate trials each read and decode every batch themselves. This script times
both on a real cache made by `bae cache` (default: the quickstart's, runs/quickstart/cache), with the reader the
trials use (`bae_core.data.reader.iter_activation_batches`) and `Trainer.step`, in one process:

- separate: N readers, each feeding its own coder (the work of N trials; run one after another here, as they
  would share the machine's cores);
- shared: one reader, each batch stepped through the N coders.

For N = 1, 2, 4, 8 it prints coder-tokens/s (tokens trained per second summed over the N coders), the ratio shared
/ separate, and the share of the time spent reading and decoding in each; beside them the bound, what sharing can
give at most (the separate run's reads divided by N: 1 / (1 - r + r / N) for its read share r), and the check, the
time of one coder's step in separate / shared mode, which should read about 1.00 (N = 1 runs the same code in both
modes: its ratio is the noise floor). The two modes take turns, `--repeats` times, each going first in every other
round, and the median run is reported; nothing is asserted. Results: benchmarks/results/shared_stream.json.

    .venv/bin/python benchmarks/shared_stream.py [--cache runs/quickstart/cache] [--ns 1,2,4,8] [--steps 16]
        [--batch 4096] [--latents 4608] [--k 32] [--precision bf16] [--transcoder]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from bae_core import CoderConfig, TrainConfig, Trainer, build_coder
from bae_core.data.cache import open_cache
from bae_core.data.reader import coder_columns, iter_activation_batches

RESULTS = Path(__file__).parent / "results" / "shared_stream.json"


def _trainers(n: int, widths: tuple[int, int], args) -> list[Trainer]:
    kind = "skip_transcoder" if args.transcoder else "sae"
    cfg = CoderConfig(activation="topk", kind=kind, k=args.k, num_latents=args.latents)
    tcfg = TrainConfig(optimizer="signum", precision=args.precision)
    return [Trainer(build_coder(cfg, widths[0], widths[1], seed=i), tcfg) for i in range(n)]


def _stream(args, manifest):
    return iter_activation_batches(
        args.cache,
        args.hookpoint,
        batch_size=args.batch,
        transcoder=args.transcoder,
        shuffle_seed=0,
        epochs=None,
        manifest=manifest,
    )


def _step(trainer: Trainer, batch) -> None:
    trainer.step(*(batch if isinstance(batch, tuple) else (batch,)))


def measure(n: int, shared: bool, args, manifest, widths) -> dict:
    """Seconds spent reading + decoding and stepping, over `args.steps` steps of each of `n` coders."""
    trainers = _trainers(n, widths, args)
    warm_up = _stream(args, manifest)
    for trainer in trainers:  # one untimed step each, from a stream of its own
        _step(trainer, next(warm_up))
    warm_up.close()
    # Timed from the streams' start: their first window of shards is read in the timed steps.
    streams = [_stream(args, manifest) for _ in range(1 if shared else n)]  # separate: a reader per coder
    read = compute = 0.0
    reads = 0
    for _ in range(args.steps):
        for i, trainer in enumerate(trainers):
            if not shared or i == 0:
                started = time.perf_counter()
                batch = next(streams[0 if shared else i])
                read += time.perf_counter() - started
                reads += 1
            started = time.perf_counter()
            _step(trainer, batch)
            compute += time.perf_counter() - started
    for stream in streams:
        stream.close()
    total = read + compute
    return {
        "n": n,
        "mode": "shared" if shared else "separate",
        "seconds": total,
        "read_seconds": read,
        "batches_read": reads,
        "readers": len({id(stream) for stream in streams}),
        "coder_tokens_per_s": n * args.steps * args.batch / total,
        "read_share": read / total,
        "step_seconds": compute / (n * args.steps),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default="runs/quickstart/cache", help="a cache made by `bae cache`")
    parser.add_argument("--hookpoint", default=None, help="default: the cache's first")
    parser.add_argument("--ns", default="1,2,4,8", help="coders per stream, comma-separated")
    parser.add_argument(
        "--steps",
        type=int,
        default=16,
        help="timed steps per coder (16 x 4096 rows: a window of 8 shards of the quickstart's cache)",
    )
    parser.add_argument("--repeats", type=int, default=4, help="rounds of (separate, shared); the median is kept")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--latents", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--transcoder", action="store_true", help="skip transcoders (read input and output)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    if not (Path(args.cache) / "manifest.json").exists():
        print(f"shared_stream: no cache at {args.cache}; run `make quickstart` or give --cache", file=sys.stderr)
        return 2
    manifest = open_cache(args.cache)
    args.hookpoint = args.hookpoint or next(iter(manifest.hookpoints))
    x_col, y_col = coder_columns(manifest, args.hookpoint, args.transcoder)
    columns = manifest.hookpoints[args.hookpoint].columns
    widths = (columns[x_col], columns[y_col] if y_col else None)
    ns = [int(n) for n in args.ns.split(",")]
    torch.manual_seed(0)

    rows = []
    print(
        f"cache {args.cache} ({manifest.dtype}), {args.hookpoint}, {'skip transcoder' if args.transcoder else 'SAE'}"
        f" topk k={args.k}, {args.latents} latents, batch {args.batch}, {args.precision}, {args.steps} steps per "
        f"coder, median of {args.repeats}, torch threads {torch.get_num_threads()}"
    )
    header = ("N", "separate tok/s", "read share", "shared tok/s", "read share", "shared/sep", "bound", "steps")
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, (3, 15, 10, 13, 10, 10, 6, 6), strict=True)))
    measure(1, True, args, manifest, widths)  # untimed: first use of the kernels
    for n in ns:
        runs = {"separate": [], "shared": []}
        for repeat in range(args.repeats):
            for shared in (False, True) if repeat % 2 == 0 else (True, False):  # neither always goes first
                r = measure(n, shared, args, manifest, widths)
                runs[r["mode"]].append(r)
        # The median run (of an even number, the faster of the middle two).
        med = {mode: sorted(rs, key=lambda r: r["seconds"])[(len(rs) - 1) // 2] for mode, rs in runs.items()}
        ratio = med["shared"]["coder_tokens_per_s"] / med["separate"]["coder_tokens_per_s"]
        # What sharing can give at most: the separate run's reads divided by N, its steps unchanged.
        share = med["separate"]["read_share"]
        bound = 1 / (1 - share + share / n)
        # The check: a coder's step costs the same in both modes, so this reads about 1.00.
        steps = med["separate"]["step_seconds"] / med["shared"]["step_seconds"]
        print(
            f"{n:>3} {med['separate']['coder_tokens_per_s']:>15,.0f} {med['separate']['read_share']:>10.1%} "
            f"{med['shared']['coder_tokens_per_s']:>13,.0f} {med['shared']['read_share']:>10.1%} {ratio:>9.2f}x "
            f"{bound:>5.2f}x {steps:>5.2f}x"
        )
        rows.append({"n": n, "ratio": ratio, "bound": bound, "step_ratio": steps, "median": med, "runs": runs})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
