"""Reading overlaps compute: training steps fed by the cache reader, with and without prefetching, against steps
fed from batches already in memory.

A sweep trial pulls each batch from `bae_core.data.reader.iter_activation_batches` (parquet shards read with
pyarrow, float16 rows decoded to float32) and then runs `Trainer.step` on it. Fed by:

- (a) the reader without prefetching: a step costs reading + decoding + computing;
- (b) the reader with `prefetch=N`: a background thread reads and decodes up to N batches ahead, so a step
  should cost about the larger of the two;
- (c) batches already in memory (the reference: the computation alone);
- and the reader alone, no step: read + decode per batch.

The shapes of a realistic trial (SAE or skip transcoder on the cache's 576-wide MLP hookpoint, 4608 latents,
k = 32, 4096 tokens per batch), fp32 and bf16 (autocast). The four feeds take turns in blocks of `--block`
timed steps after `--prefetch` untimed ones (one step at a time would hand (b)'s thread the other feeds' steps to
read in), in a rotating order, `--rounds` times. A feed's time is its total over all timed steps; the ratios
(a)/(c) and (b)/(c) are given overall and per round (median and range). The target is (b)/(c) <= 1.1. Before
timing, the prefetched batches are checked to be identical to the unprefetched ones. Nothing is asserted; the
table is printed and written to benchmarks/results/reader_overlap.json.

    .venv/bin/python benchmarks/reader_overlap.py --cache CACHE          # a cache made by `bae cache`
    .venv/bin/python benchmarks/reader_overlap.py                        # makes one first, with the real CLI
    .venv/bin/python benchmarks/reader_overlap.py --cache CACHE --kind transcoder --threads 1
    .venv/bin/python benchmarks/reader_overlap.py --cache CACHE --small  # CI-sized: seconds
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bae_core import CoderConfig, TrainConfig, Trainer, build_coder
from bae_core.data.cache import open_cache
from bae_core.data.reader import coder_columns, iter_activation_batches

RESULTS = Path(__file__).resolve().parent / "results"
READER, MEMORY, ALONE = "(a) reader", "(c) memory", "read alone"


def feeds(depths: list[int]) -> list[str]:
    return [READER, *(f"(b) prefetch={d}" for d in depths), MEMORY, ALONE]


def make_cache(root: Path, tokens: int) -> None:
    """A float16 cache of layers.9.mlp of the embedded model, made by the real CLI (skipped when it exists)."""
    if (root / "manifest.json").exists():
        return
    bae = Path(sys.executable).parent / "bae"
    env = {"RAY_ADDRESS": "local", "RAY_AUTH_MODE": "disabled", **os.environ}
    cmd = [str(bae), "cache", str(root), "--hookpoints", "layers.9.mlp", "--train-tokens", str(tokens)]
    cmd += ["--heldout-tokens", "2048", "--seq-len", "128", "--dtype", "float16"]
    print("making the cache:", " ".join(cmd), flush=True)
    subprocess.run(cmd, env=env, check=True)


def as_args(batch) -> tuple:
    return batch if isinstance(batch, tuple) else (batch,)


def same_batches(first, second, n: int) -> bool:
    """Whether the first `n` batches of two streams are identical, tensor for tensor."""
    pairs = zip(itertools.islice(first, n), itertools.islice(second, n), strict=True)
    return all(all(torch.equal(u, v) for u, v in zip(as_args(a), as_args(b), strict=True)) for a, b in pairs)


def run_precision(args, precision: str, hookpoint: str, widths: dict, columns: tuple) -> dict:
    """Per feed: the wall and CPU seconds of each round's block of timed steps."""
    read = dict(batch_size=args.batch, transcoder=args.kind == "transcoder", epochs=None, shuffle_seed=0)
    ccfg = CoderConfig(kind="sae" if args.kind == "sae" else "skip_transcoder", k=args.k, num_latents=args.latents)
    x_col, y_col = columns

    def trainer():
        coder = build_coder(ccfg, widths[x_col], widths[y_col] if y_col else None, seed=0)
        return Trainer(coder, TrainConfig(optimizer="signum", precision=precision, log_every=0))

    memory = list(itertools.islice(iter_activation_batches(args.cache, hookpoint, **read), args.memory_batches))
    names = feeds(args.depths)
    streams = {READER: iter_activation_batches(args.cache, hookpoint, **read)}
    for name, depth in zip(names[1:], args.depths, strict=False):
        streams[name] = iter_activation_batches(args.cache, hookpoint, prefetch=depth, **read)
    streams[MEMORY] = itertools.cycle(memory)
    streams[ALONE] = iter_activation_batches(args.cache, hookpoint, **read)
    trainers = {feed: trainer() for feed in names if feed != ALONE}
    for t in trainers.values():  # first steps allocate; none of that is timed
        for batch in memory[:2]:
            t.step(*as_args(batch))

    def call(feed: str) -> float:
        """One step of `feed`; returns the seconds spent waiting for its batch."""
        t0 = time.perf_counter()
        batch = next(streams[feed])
        waited = time.perf_counter() - t0
        if feed in trainers:
            trainers[feed].step(*as_args(batch))  # step() calls .item(): synchronous
        return waited

    wall: dict[str, list[float]] = {feed: [] for feed in names}
    wait: dict[str, list[float]] = {feed: [] for feed in names}
    for r in range(args.rounds):
        for feed in names[r % len(names) :] + names[: r % len(names)]:
            for _ in range(max(args.depths)):
                call(feed)
            t0 = time.perf_counter()
            wait[feed].append(sum(call(feed) for _ in range(args.block)))
            wall[feed].append(time.perf_counter() - t0)
        print(f"  {precision} round {r + 1}/{args.rounds}: " + ", ".join(f"{f} {wall[f][-1]:.2f}s" for f in names))
    for feed in names[1:-2]:
        streams[feed].close()
    return {"wall": wall, "wait": wait}


def summarise(args, precision: str, times: dict) -> list[dict]:
    """Per feed: s/step over all rounds and in its quickest round, the ratios to (c) overall, per round (min,
    median, max) and of the quickest rounds (the least disturbed by other processes)."""
    wall, wait = times["wall"], times["wait"]
    n = args.rounds * args.block
    ref = wall[MEMORY]
    rows = []
    for feed in feeds(args.depths):
        ratios = [w / m for w, m in zip(wall[feed], ref, strict=True)]
        rows.append(
            {
                "precision": precision,
                "feed": feed,
                "steps": n,
                "s_per_step": sum(wall[feed]) / n,
                "best_round_s_per_step": min(wall[feed]) / args.block,
                "wait_s_per_step": sum(wait[feed]) / n,
                "ratio_vs_memory": sum(wall[feed]) / sum(ref),
                "ratio_rounds": [min(ratios), statistics.median(ratios), max(ratios)],
                "ratio_best_rounds": min(wall[feed]) / min(ref),
                "round_seconds": wall[feed],
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default=None, help="a cache made by `bae cache` (default: made here, once)")
    parser.add_argument("--cache-tokens", type=int, default=65536, help="train tokens, when the cache is made here")
    parser.add_argument("--hookpoint", default=None, help="default: the cache's first")
    parser.add_argument("--kind", choices=("sae", "transcoder"), default="sae", help="transcoder reads 2 columns")
    parser.add_argument("--latents", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096, help="tokens per step")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--prefetch", default="2,4", help="batches read ahead in (b); several: 2,8 (one row each)")
    parser.add_argument("--rounds", type=int, default=4, help="blocks per feed")
    parser.add_argument("--block", type=int, default=16, help="timed steps per block (16: a window of 8 shards)")
    parser.add_argument("--memory-batches", type=int, default=8, help="batches held in memory for (c)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--small", action="store_true", help="CI-sized: 512 latents, k 8, 256 tokens, 2 rounds")
    parser.add_argument("--out", default=str(RESULTS / "reader_overlap.json"))
    args = parser.parse_args(argv)
    if args.small:
        args.latents, args.k, args.batch, args.rounds, args.block, args.memory_batches = 512, 8, 256, 2, 3, 2
    args.depths = [int(d) for d in args.prefetch.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.cache is None:
        args.cache = str(RESULTS / "reader_overlap_cache")
        make_cache(Path(args.cache), args.cache_tokens)
    elif not (Path(args.cache) / "manifest.json").exists():
        print(
            f"reader_overlap: no cache at {args.cache} (make one with `bae cache`, or leave out --cache)",
            file=sys.stderr,
        )
        return 2
    manifest = open_cache(args.cache)
    hookpoint = args.hookpoint or next(iter(manifest.hookpoints))
    columns = coder_columns(manifest, hookpoint, args.kind == "transcoder")
    widths = manifest.hookpoints[hookpoint].columns
    read = dict(batch_size=args.batch, transcoder=args.kind == "transcoder", shuffle_seed=0, epochs=2)
    train_rows = manifest.tokens("train")
    plain, ahead = (iter_activation_batches(args.cache, hookpoint, prefetch=p, **read) for p in (0, args.depths[0]))
    checked = 2 * -(-train_rows // args.batch)  # two epochs
    identical = same_batches(plain, ahead, checked)
    print(
        f"cache {args.cache}: {hookpoint}, {manifest.dtype}, {train_rows} train rows in "
        f"{len(manifest.shards_of('train', hookpoint))} shards; {args.kind}, {args.latents} latents, k={args.k}, "
        f"{args.batch} tokens/step; torch threads {torch.get_num_threads()}, {os.cpu_count()} cores; "
        f"prefetch {args.prefetch}; {args.rounds} rounds x {args.block} timed steps per feed"
    )
    print(
        f"prefetch={args.depths[0]}: batches identical to unprefetched ones: {'yes' if identical else 'NO'} "
        f"({checked} batches)"
    )

    load = [os.getloadavg()[0]]
    rows = []
    for precision in args.precisions.split(","):
        rows += summarise(args, precision, run_precision(args, precision, hookpoint, widths, columns))

    print(
        f"\n{'prec':5} {'feed':16} {'steps':>5} {'ms/step':>8} {'best rnd':>8} {'wait ms':>8} {'vs (c)':>7} "
        f"{'rounds min/med/max':>18} {'best/best':>9}"
    )
    for r in rows:
        lo, med, hi = r["ratio_rounds"]
        print(
            f"{r['precision']:5} {r['feed']:16} {r['steps']:5d} {1e3 * r['s_per_step']:8.1f} "
            f"{1e3 * r['best_round_s_per_step']:8.1f} {1e3 * r['wait_s_per_step']:8.1f} {r['ratio_vs_memory']:7.3f} "
            f"{lo:6.3f}/{med:5.3f}/{hi:5.3f} {r['ratio_best_rounds']:9.3f}"
        )
    load.append(os.getloadavg()[0])
    print(f"load average (1 min) before and after timing: {load[0]:.2f}, {load[1]:.2f} ({os.cpu_count()} cores)")
    by = {(r["precision"], r["feed"]): r for r in rows}
    for precision in args.precisions.split(","):
        a, *bs = (by[(precision, f)] for f in feeds(args.depths)[:-2])
        ratios = ", ".join(
            f"{b['feed'][4:]}: {b['ratio_vs_memory']:.3f} (rounds' median {b['ratio_rounds'][1]:.3f})" for b in bs
        )
        print(
            f"{precision}: (a)/(c) = {a['ratio_vs_memory']:.3f} (rounds' median {a['ratio_rounds'][1]:.3f}); (b)/(c) "
            f"{ratios}; target <= 1.1; read+decode alone {1e3 * by[(precision, ALONE)]['s_per_step']:.1f} ms/batch"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    info = {"identical": identical, "checked_batches": checked, "threads": torch.get_num_threads(), "load": load}
    out.write_text(json.dumps({"args": vars(args), **info, "rows": rows}, indent=2))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
