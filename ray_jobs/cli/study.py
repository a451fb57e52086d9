"""`bae study`: the whole study of a spec: sweep, score, report (`make quickstart`)."""

from __future__ import annotations

import argparse
import sys
import time

from ray_jobs.cli.report import run_report_cmd
from ray_jobs.cli.score import run_score_cmd
from ray_jobs.cli.sweep import run_sweep_cmd


def add_study_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "study",
        help="the whole study of a sweep spec: bae sweep, then bae score, then bae report (each resumes)",
        description="Run (or resume) the sweep of SPEC, score every coder (lexical judge, fidelity, density, "
        "ablation), and write the frontier table and the report. Each step keeps what an earlier, interrupted "
        "run finished. `make quickstart` runs it on sweeps/quickstart.yaml.",
    )
    p.add_argument("spec", help="a YAML sweep spec, e.g. sweeps/quickstart.yaml")
    p.add_argument("--output", default=None, help="run folder (local path or URI); overrides the spec's output")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--out", default=None, help="folder of the report (default: RUN/report)")
    p.set_defaults(func=run_study_cmd)


def run_study_cmd(args: argparse.Namespace) -> int:
    from ray_jobs.runtime import storage_path
    from ray_jobs.spec import load_spec

    spec = load_spec(args.spec)
    run = storage_path(args.output or spec.run_dir)
    start = time.perf_counter()
    steps = (
        ("sweep", run_sweep_cmd, {"spec": args.spec, "output": args.output, "dry_run": False, "quiet": False}),
        ("score", run_score_cmd, {"run": run, **SCORE_DEFAULTS}),
        ("report", run_report_cmd, {"run": run, "out": args.out}),
    )
    for i, (name, command, values) in enumerate(steps, 1):
        print(f"[{i}/3] {name} ({time.perf_counter() - start:.0f}s)", file=sys.stderr, flush=True)
        rc = command(argparse.Namespace(address=args.address, **values))
        if rc:
            print(
                f"bae study: the {name} step failed (exit {rc}); fix what it names and run the same command again: "
                "it resumes",
                file=sys.stderr,
            )
            return rc
    print(f"study done in {time.perf_counter() - start:.0f}s")
    return 0


SCORE_DEFAULTS = {
    "judge": "lexical",
    "coder": [],
    "min_examples": None,
    "test_windows": None,
    "fidelity_tokens": None,
    "ablation_bins": None,
    "lm_dtype": None,
    "gpus_per_task": None,
    "seed": None,
    "llm_latents": 50,
}
"""`bae score`'s options when `bae study` runs it: the spec's `scoring` section decides."""
