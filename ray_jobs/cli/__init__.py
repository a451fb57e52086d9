"""The `bae` command line.

    bae synth      train several coders on one synthetic data set and print their recovery metrics
    bae cache      capture language-model activations into parquet shards with a Ray Data actor pool
    bae train      train one coder on one hookpoint of a cache with Ray Train (data-parallel, resumable)
    bae sweep      run a sweep spec (sweeps/*.yaml) with Ray Tune: grid or Optuna, resumable
    bae study      the whole study of a spec: sweep, score, report (`make quickstart`)
    bae report     the frontier table and a Markdown report with plots and the paper's claims, for a scored run
    bae score      interpretability (lexical or LLM judge), fidelity, density and ablation of every coder of a sweep
    bae browse     a static HTML feature browser of a scored run: dictionaries, latents, their example windows
    bae probe      sparse probing of every dictionary of a run on labelled text tasks (accuracy at k = 1, 2, 5, 20)
    bae import     register coders trained elsewhere (sparsify, SAELens, a hub repo) in a run, to be scored with it
    bae export     write a coder as a SAELens folder, checked by loading it back

Each subcommand imports what it needs when it runs, so `bae --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys

from ray_jobs.cli.browse import add_browse_parser
from ray_jobs.cli.cache import add_cache_parser
from ray_jobs.cli.console import HelpFormatter, add_global_options, configure_console
from ray_jobs.cli.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, exit_code, one_line, remote_cause, resume_command
from ray_jobs.cli.export import add_export_parser
from ray_jobs.cli.imports import add_import_parser
from ray_jobs.cli.probe import add_probe_parser
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
        epilog="Exit codes: 0 done; 1 the run failed (rerun the same command to resume); 2 bad input; "
        "130 interrupted (finished work is kept; the same command resumes).",
        formatter_class=HelpFormatter,
    )
    add_global_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        add_synth_parser,
        add_cache_parser,
        add_train_parser,
        add_sweep_parser,
        add_score_parser,
        add_probe_parser,
        add_report_parser,
        add_browse_parser,
        add_study_parser,
        add_import_parser,
        add_export_parser,
    ):
        add(sub)
    for command in sub.choices.values():
        command.formatter_class = HelpFormatter
        # Also after the command's name: `bae sweep spec.yaml --debug` as well as `bae --debug sweep spec.yaml`.
        add_global_options(command, suppress=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one `bae` command; returns its exit code (see `ray_jobs.cli.errors`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)  # a malformed option exits 2 with argparse's usage line
    configure_console(verbose=args.verbose)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(
            f"bae {args.command}: interrupted; finished work is kept. Resume with: {resume_command(argv)}",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except Exception as err:
        if args.debug:
            raise
        err = remote_cause(err)
        code = exit_code(err)
        hint = "" if code == EXIT_BAD_INPUT else " (run it again with --debug for the traceback)"
        print(f"bae {args.command}: error: {one_line(err)}{hint}", file=sys.stderr)
        return code
