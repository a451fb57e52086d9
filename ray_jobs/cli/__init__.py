"""The `bae` command line.

    bae synth      train several coders on one synthetic data set and print their recovery metrics
    bae cache      capture language-model activations into parquet shards with a Ray Data actor pool
    bae train      train one coder on one hookpoint of a cache with Ray Train (data-parallel, resumable)
    bae sweep      run a sweep spec (sweeps/*.yaml) with Ray Tune: grid or Optuna, resumable
    bae study      the whole study of a spec: sweep, score, report (`make quickstart`)
    bae report     the frontier table and a Markdown report with plots and the paper's claims, for a scored run
    bae score      interpretability (lexical or LLM judge), fidelity, density and ablation of every coder of a sweep

Each subcommand imports what it needs when it runs, so `bae --help` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ray_jobs.cli.cache import add_cache_parser
from ray_jobs.cli.report import add_report_parser
from ray_jobs.cli.score import add_score_parser
from ray_jobs.cli.study import add_study_parser
from ray_jobs.cli.sweep import add_sweep_parser
from ray_jobs.cli.synth import add_synth_parser
from ray_jobs.cli.train import add_train_parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bae",
        description="Binary and continuous sparse coders on language-model activations.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    add_synth_parser(sub)
    add_cache_parser(sub)
    add_train_parser(sub)
    add_sweep_parser(sub)
    add_score_parser(sub)
    add_report_parser(sub)
    add_study_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if not args.verbose:
        # The commands print their own progress; Ray Data and Tune log theirs to files under /tmp/ray.
        for name in ("ray.data", "ray.tune", "ray.train"):
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except (ValueError, ConnectionError) as err:
        print(f"bae {args.command}: error: {err}", file=sys.stderr)
        return 2
