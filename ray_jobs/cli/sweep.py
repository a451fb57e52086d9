"""`bae sweep`: run a sweep spec (sweeps/*.yaml) with Ray Tune, grid or Optuna, resumable."""

from __future__ import annotations

import argparse
import sys
import time


def add_sweep_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="run a sweep spec with Ray Tune (grid or Optuna); re-running resumes it",
        description="Validate the spec, create or resume the activation cache, then train one coder per trial with "
        "Ray Tune and write OUTPUT/trials.parquet (one row per trial: settings, held-out FVU, L0, dead, frequent "
        "and dense fractions, checkpoint). Running it again with the same spec and output resumes the sweep: "
        "finished trials are kept, interrupted ones continue from their last checkpoint.",
    )
    p.add_argument("spec", help="a YAML sweep spec, e.g. sweeps/quickstart.yaml")
    p.add_argument("--output", default=None, help="run folder (local path or URI); overrides the spec's output")
    p.add_argument("--dry-run", action="store_true", help="print the trial plan and resources; run nothing")
    p.add_argument(
        "--d-model",
        type=int,
        default=None,
        help="dry run: the model's width, for sizes and costs when neither a cache nor the model's config is here",
    )
    p.add_argument(
        "--tflops",
        type=float,
        default=None,
        help="dry run: training rate in counted TFLOP/s per GPU (per CPU thread when trials have no GPU), in place "
        "of ray_jobs/rates.py's",
    )
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=run_sweep_cmd)


def run_sweep_cmd(args: argparse.Namespace) -> int:
    from ray_jobs.plan import describe_plan
    from ray_jobs.spec import load_spec

    spec = load_spec(args.spec)
    if args.output:
        spec = spec.model_copy(update={"output": args.output})
    if args.dry_run:
        from ray_jobs.cost import resolve_shape
        from ray_jobs.rates import Rate

        shape = resolve_shape(spec, args.d_model)
        rates = {}
        if args.tflops is not None:
            if not args.tflops > 0:
                raise ValueError(f"--tflops: must be a positive rate, got {args.tflops}")
            per = "GPU" if spec.resources.gpus_per_worker > 0 else "thread"
            rates["train_rate"] = Rate(args.tflops * 1e12, f"FLOP/s per {per}", f"given: --tflops {args.tflops:g}")
        print(describe_plan(spec, shape.widths if shape else None, source=args.spec, shape=shape, rates=rates))
        return 0

    from ray_jobs.cli.checks import model_and_dataset, writable_folder
    from ray_jobs.cli.console import Progress
    from ray_jobs.runtime import connect, storage_path
    from ray_jobs.sweep_job import run_sweep
    from ray_jobs.trials import TRIALS_TABLE

    run_dir = storage_path(spec.run_dir)
    writable_folder(run_dir, "output")
    writable_folder(storage_path(spec.cache_root), "cache.root")
    cache = spec.cache_request()
    model_and_dataset(cache.model, cache.revision, cache.dataset, cache.text_column)
    connect(args.address)
    start = time.perf_counter()
    if not args.quiet:
        size = spec.resources.coders_per_trial
        grouped = f", in {spec.num_tune_trials()} groups of up to {size} sharing a stream" if size > 1 else ""
        print(f"sweep {spec.name}: {spec.num_trials()} trials into {run_dir}{grouped}", file=sys.stderr, flush=True)
    progress = Progress("caching activations: shard", quiet=args.quiet)
    try:
        run_sweep(spec, cache_progress=progress, quiet=args.quiet)
    finally:
        progress.end()
    finished, failed = trial_counts(run_dir)
    total = spec.num_trials()
    table = f"{run_dir.rstrip('/')}/{TRIALS_TABLE}"
    summary = (
        f"sweep {spec.name}: {finished} trials finished, {failed} failed, {total - finished - failed} left of {total}"
    )
    if finished + failed < total:
        # Tune stops at Ctrl+C and returns what it has: the sweep is incomplete, not done.
        print(f"{summary} when it stopped; trials table: {table}", file=sys.stderr, flush=True)
        raise KeyboardInterrupt
    print(f"{summary}, {time.perf_counter() - start:.0f}s; trials table: {table}")
    if failed:
        print(
            f"bae sweep: {failed} trial(s) failed: their errors are in the `error` column of {table}; run the same "
            "command again to retry them from their last checkpoint",
            file=sys.stderr,
        )
    return 1 if failed else 0


def trial_counts(run_dir: str) -> tuple[int, int]:
    """Finished and failed trials in RUN/trials.parquet (0, 0 before the first trial ends)."""
    from ray_jobs.score_plan import read_table
    from ray_jobs.trials import TRIALS_TABLE

    try:
        status = read_table(run_dir, TRIALS_TABLE, ["status"])["status"]
    except FileNotFoundError:
        return 0, 0
    return int((status == "finished").sum()), int((status == "failed").sum())
