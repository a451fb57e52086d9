"""Sweep overhead of `bae sweep` (ray_jobs.sweep_job.run_sweep): N small trials through Ray Tune, against the
same trainings run one after another in one process.

Every trial trains one coder on layers.3.mlp of the embedded model's cache (made once, before any timing):
`--steps` steps of `--batch-size` tokens, a checkpoint every `--checkpoint-every` steps, then held-out metrics.
The reference does exactly that with bae_core alone (the same Trainer, the same batches from the same cache
reader, the same checkpoint writes, the same evaluation), trial after trial, in this process.

Rows:
- in-process, 1 thread: the reference at the thread count of one trial (Ray gives a 1-CPU trial
  OMP_NUM_THREADS=1);
- in-process, all threads: the same with torch's default thread count (what a user without Ray would run);
- Ray Tune, 1 at a time: `run_sweep` with max_concurrent 1: (this - reference) / N is the overhead per trial
  (Tune's trial actors, result and checkpoint reporting, the trials table, the sweep's check of the existing
  cache);
- Ray Tune, C at a time: max_concurrent C (default: the machine's cores), 1 CPU per trial: the parallel speed-up
  against both references.

Ray's own start-up is excluded (it happens once per driver). Nothing is asserted; the figures are printed and
written to benchmarks/results/sweep_overhead.json.

    .venv/bin/python benchmarks/sweep_overhead.py [--trials 8] [--steps 100] [--concurrent 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from bae_core.coders.config import CoderConfig
from bae_core.data.cache import open_cache
from bae_core.data.reader import coder_columns, iter_activation_batches
from bae_core.evaluation.metrics import evaluate_coder
from bae_core.training import TrainConfig, Trainer, build_coder
from ray_jobs.cache_job import run_cache
from ray_jobs.runtime import connect
from ray_jobs.spec import SweepSpec, parse_spec
from ray_jobs.sweep_job import run_sweep

RESULTS = Path(__file__).resolve().parent / "results"


def make_spec(args, output: str, cache_root: str, concurrent: int) -> SweepSpec:
    activations = ["topk", "binary_topk"]
    seeds = list(range(max(1, args.trials // len(activations))))
    return parse_spec(
        {
            "name": "overhead",
            "output": output,
            "cache": {
                "root": cache_root,
                "hookpoints": ["layers.3.mlp"],
                "seq_len": 64,
                "train_tokens": args.cache_tokens,
                "heldout_tokens": args.eval_tokens,
            },
            "coder": {"expansion_factor": args.expansion, "k": args.k},
            "space": {"activation": activations, "seed": seeds},
            "search": {"algorithm": "grid", "max_concurrent": concurrent},
            "training": {
                "steps": args.steps,
                "batch_size": args.batch_size,
                "checkpoint_every": args.checkpoint_every,
                "eval_tokens": args.eval_tokens,
            },
            "resources": {"cpus_per_worker": 1, "max_failures": 0},
        }
    )


def train_in_process(spec: SweepSpec, cache: str) -> list[float]:
    """The sweep's trials one after another with bae_core alone; returns each trial's held-out FVU."""
    manifest = open_cache(cache)
    fvus = []
    for point in spec.grid():
        hookpoint, coder, train = spec.trial_settings(point)
        cfg = CoderConfig(**coder)
        x_col, y_col = coder_columns(manifest, hookpoint, cfg.is_transcoder)
        widths = manifest.hookpoints[hookpoint].columns
        tcfg = TrainConfig(**{**train, "log_every": 0})
        trainer = Trainer(build_coder(cfg, widths[x_col], widths[y_col] if y_col else None, seed=tcfg.seed), tcfg)
        batches = iter_activation_batches(
            cache, hookpoint, batch_size=spec.training.batch_size, shuffle_seed=tcfg.seed * 1_000_003, epochs=None
        )
        with tempfile.TemporaryDirectory() as d:
            while trainer.step_count < spec.training.steps:
                trainer.step(next(batches))
                if trainer.step_count % spec.training.checkpoint_every == 0:
                    trainer.save_checkpoint(d)
            trainer.eval_mode()
            held_out = iter_activation_batches(
                cache, hookpoint, split="heldout", batch_size=spec.training.batch_size, shuffle_seed=None
            )
            fvus.append(evaluate_coder(trainer.coder, held_out, max_tokens=spec.training.eval_tokens).fvu)
            trainer.save_checkpoint(d)
    return fvus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=8, help="trials per sweep (an even number)")
    parser.add_argument("--steps", type=int, default=100, help="training steps per trial")
    parser.add_argument("--batch-size", type=int, default=512, help="tokens per step")
    parser.add_argument("--checkpoint-every", type=int, default=25)
    parser.add_argument("--expansion", type=int, default=4, help="latents = expansion x 576")
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--cache-tokens", type=int, default=16384, help="train tokens in the cache")
    parser.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens per trial")
    parser.add_argument("--concurrent", type=int, default=os.cpu_count() or 2, help="trials at once in the last row")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bae-sweep-overhead-"))
    cache = str(work / "cache")
    t0 = time.perf_counter()
    connect(num_cpus=os.cpu_count())
    ray_start = time.perf_counter() - t0
    run_cache(make_spec(args, str(work / "unused"), cache, 1).cache_request())
    print(f"cache ready in {work}; Ray start-up {ray_start:.1f}s (excluded)", flush=True)

    timings: dict[str, float] = {}
    fvus: dict[str, list[float]] = {}
    default_threads = torch.get_num_threads()
    for label, threads in (("in-process, 1 thread", 1), (f"in-process, {default_threads} threads", default_threads)):
        torch.set_num_threads(threads)
        start = time.perf_counter()
        fvus[label] = train_in_process(make_spec(args, str(work / "ref"), cache, 1), cache)
        timings[label] = time.perf_counter() - start
        print(f"  {label}: {timings[label]:.1f}s", flush=True)
    torch.set_num_threads(default_threads)

    start = time.perf_counter()
    run_cache(make_spec(args, str(work / "x"), cache, 1).cache_request())
    cache_check = time.perf_counter() - start
    for label, concurrent in (
        ("Ray Tune, 1 at a time", 1),
        (f"Ray Tune, {args.concurrent} at a time", args.concurrent),
    ):
        spec = make_spec(args, str(work / f"sweep-{concurrent}"), cache, concurrent)
        start = time.perf_counter()
        results = run_sweep(spec, quiet=True)
        timings[label] = time.perf_counter() - start
        failed = [r for r in results if r.error is not None]
        if failed:
            raise SystemExit(f"{label}: {len(failed)} trials failed: {failed[0].error}")
        fvus[label] = sorted(r.metrics["fvu"] for r in results)
        print(f"  {label}: {timings[label]:.1f}s", flush=True)

    n = args.trials
    ref1 = timings["in-process, 1 thread"]
    refn = timings[f"in-process, {default_threads} threads"]
    serial = timings["Ray Tune, 1 at a time"]
    parallel = timings[f"Ray Tune, {args.concurrent} at a time"]
    summary = {
        "overhead_per_trial_s": (serial - ref1) / n,
        "sweep_cache_check_s": cache_check,
        "speedup_vs_1_thread": ref1 / parallel,
        f"speedup_vs_{default_threads}_threads": refn / parallel,
    }
    print()
    print(f"{n} trials: {args.steps} steps x {args.batch_size} tokens, {args.expansion * 576} latents, k={args.k}")
    print(f"{'row':<28} {'seconds':>8} {'s/trial':>8}")
    for label, seconds in timings.items():
        print(f"{label:<28} {seconds:>8.1f} {seconds / n:>8.2f}")
    print()
    print(
        f"overhead per trial (Tune 1 at a time - in-process 1 thread) / N: {summary['overhead_per_trial_s']:.2f}s "
        f"(of which the sweep's check of the existing cache, once per sweep: {cache_check:.1f}s)"
    )
    print(
        f"parallel speed-up, {args.concurrent} at a time: {summary['speedup_vs_1_thread']:.2f}x vs in-process "
        f"1 thread, {summary[f'speedup_vs_{default_threads}_threads']:.2f}x vs in-process {default_threads} threads"
    )
    mean = {k: sum(v) / len(v) for k, v in fvus.items()}
    print("mean held-out FVU per row (the same trainings): " + ", ".join(f"{k}: {v:.4f}" for k, v in mean.items()))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "sweep_overhead.json"
    out.write_text(
        json.dumps(
            {
                "args": vars(args),
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
                "seconds": timings,
                "summary": summary,
                "fvu": fvus,
            },
            indent=2,
        )
    )
    print(f"written to {out}")


if __name__ == "__main__":
    main()
