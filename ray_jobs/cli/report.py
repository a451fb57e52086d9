"""`bae report`: the frontier table and a Markdown report with plots and the paper's claims, for a scored run."""

from __future__ import annotations

import argparse


def add_report_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="write the frontier table and a Markdown report with plots for a scored run (no Ray needed)",
        description="From RUN/trials.parquet and the tables `bae score` wrote: RUN/frontier.parquet (the Pareto "
        "frontier of reconstruction against interpretability per coder family), and RUN/report/report.md with "
        "its PNG figures: the frontier, firing-rate histograms, firing rate vs score, the ablation by score, "
        "training curves, the coders' table and the paper's claims checked on this run's numbers.",
    )
    p.add_argument("run", help="a run folder scored by `bae score`")
    p.add_argument("--out", default=None, help="folder of the report (default: RUN/report)")
    p.set_defaults(func=run_report_cmd)


def run_report_cmd(args: argparse.Namespace) -> int:
    from analysis import claims_table, load_run, write_report
    from ray_jobs.cli.checks import scored_run, writable_folder

    scored_run(args.run)
    writable_folder(args.out or f"{args.run.rstrip('/')}/report", "--out")
    path = write_report(args.run, args.out)
    tables = load_run(args.run)
    claims = claims_table(tables.coders, tables.latents)
    print("the paper's claims on this run's numbers:")
    for r in claims.itertuples():
        print(f"  {r.verdict:<13} {r.claim}")
    run = args.run.rstrip("/")
    print(f"report: {path}")
    print(f"tables: {run}/trials.parquet, {run}/latents.parquet, {run}/coders.parquet, {run}/frontier.parquet")
    return 0
