"""`bae sweep`: run a sweep spec (sweeps/*.yaml) with Ray Tune, grid or Optuna, resumable."""

from __future__ import annotations

import argparse
import sys
import time

from ray_jobs.cli.common import _known_widths


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
        print(describe_plan(spec, _known_widths(spec), source=args.spec))
        return 0

    from ray_jobs.runtime import connect, storage_path
    from ray_jobs.sweep_job import run_sweep
    from ray_jobs.trials import TRIALS_TABLE

    connect(args.address)
    start = time.perf_counter()
    if not args.quiet:
        print(f"sweep {spec.name}: {spec.num_trials()} trials into {storage_path(spec.run_dir)}", file=sys.stderr)

    def cache_progress(done: int, total: int) -> None:
        if not args.quiet:
            print(f"\r  caching activations: shard {done}/{total}", end="", file=sys.stderr, flush=True)

    results = run_sweep(spec, cache_progress=cache_progress, quiet=args.quiet)
    failed = [r for r in results if r.error is not None]
    table = f"{storage_path(spec.run_dir).rstrip('/')}/{TRIALS_TABLE}"
    print(
        f"sweep {spec.name}: {len(results) - len(failed)} trials finished, {len(failed)} failed, "
        f"{time.perf_counter() - start:.0f}s; trials table: {table}"
    )
    return 1 if failed else 0
