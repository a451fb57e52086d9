"""`bae probe`: sparse probing of every dictionary of a run on labelled text tasks (evaluation.md §7)."""

from __future__ import annotations

import argparse
import sys
import time

from bae_core.evaluation.probing import DEFAULT_KS, DEFAULT_MAX_EXAMPLES, DEFAULT_MAX_TOKENS, DEFAULT_TASKS


def add_probe_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "probe",
        help="sparse probing of every dictionary of a run on labelled text tasks (Ray tasks)",
        description="For every trained coder of RUN, the MLP-neuron baselines and the raw activations: encode the "
        "hookpoint's activation at the last token of each prompt of binary text-classification tasks (the sae-probes "
        "wheel, offline), choose the k latents with the largest class-mean difference on the training prompts, fit "
        "a logistic regression on them and test it on held-out prompts "
        "(Kantamneni et al.'s sae-probes protocol, SAEBench's sparse_probing_sae_probes). Writes "
        "RUN/probing.parquet and adds per-coder mean accuracies with 95% t-intervals over tasks to "
        "RUN/coders.parquet; running it again does only what is missing or was made with other settings. Defaults "
        "come from the sweep spec's `probing` section.",
    )
    p.add_argument("run", help="a run folder written by `bae sweep`")
    p.add_argument(
        "--tasks",
        nargs="+",
        metavar="TASK",
        default=None,
        help="task names (113_movie_sent, or movie_sent), or `all` for every binary task of the wheel (default: "
        f"the run's spec, probing.tasks; if it has none, {len(DEFAULT_TASKS)} tasks: {', '.join(DEFAULT_TASKS)})",
    )
    p.add_argument(
        "--k",
        dest="ks",
        nargs="+",
        metavar="K",
        type=int,
        default=None,
        help=f"latents per probe (default: probing.ks; if none, {' '.join(map(str, DEFAULT_KS))})",
    )
    p.add_argument(
        "--max-examples",
        type=int,
        default=None,
        help=f"prompts per task, half of each class, 2/3 train (default: probing.max_examples; if none, "
        f"{DEFAULT_MAX_EXAMPLES})",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help=f"a longer prompt keeps its last this many tokens (default: probing.max_tokens; if none, "
        f"{DEFAULT_MAX_TOKENS})",
    )
    p.add_argument("--seed", type=int, default=None, help="seed of the prompts' draw and split (default: 0)")
    p.add_argument(
        "--gpus-per-task",
        type=float,
        default=None,
        help="GPUs of each actor that runs the language model for the activations; fractions share a GPU; 0: CPUs "
        "(default: the run's spec, scoring.gpus_per_task; if it has none, 0)",
    )
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a local Ray)")
    p.set_defaults(func=run_probe_cmd)


def run_probe_cmd(args: argparse.Namespace) -> int:
    from ray_jobs.cli.checks import scored_run
    from ray_jobs.probe_job import PROBING_TABLE, ProbeOptions, probe_plan, run_probe
    from ray_jobs.runtime import connect, storage_path

    run = storage_path(args.run)
    scored_run(run)
    # Bad tasks, k or sizes are named here, before Ray starts.
    options = ProbeOptions.from_run(
        run,
        tasks=args.tasks,
        ks=args.ks,
        max_examples=args.max_examples,
        max_tokens=args.max_tokens,
        seed=args.seed,
        gpus_per_task=args.gpus_per_task,
    )
    dictionaries = probe_plan(run, options)
    connect(args.address)
    start = time.perf_counter()
    print(
        f"probing {len(dictionaries)} dictionaries of {run} on {len(options.tasks)} tasks, k = "
        f"{', '.join(map(str, options.ks))}",
        file=sys.stderr,
        flush=True,
    )

    def progress(done: int, total: int, what: str) -> None:
        print(f"  [{done}/{total}] {what} ({time.perf_counter() - start:.0f}s)", file=sys.stderr, flush=True)

    def notice(text: str) -> None:
        print(f"  {text}", file=sys.stderr, flush=True)

    table = run_probe(run, options, progress=progress, notice=notice)
    print(format_probing(table, options.ks))
    print(
        f"{len(table)} probes of {table['coder_id'].nunique()} dictionaries on {table['task'].nunique()} tasks in "
        f"{time.perf_counter() - start:.0f}s; table: {run.rstrip('/')}/{PROBING_TABLE}"
    )
    return 0


def format_probing(table, ks) -> str:
    """Per dictionary, the mean test accuracy over tasks of the k-sparse probe at each k, with its 95% t-interval."""
    import pandas as pd

    from analysis.probing import coder_summary, group

    summary = coder_summary(table)
    names = table.drop_duplicates("coder_id").set_index("coder_id")
    rows = []
    for r in summary.itertuples(index=False):
        about = names.loc[r.coder_id]
        row = {"dictionary": group(about), "k": "–" if pd.isna(about["k"]) else int(about["k"]), "tasks": r.probe_tasks}
        for k in ks:
            mean, low, high = (getattr(r, f"probe_accuracy_k{k}{s}") for s in ("", "_ci_low", "_ci_high"))
            row[f"acc@{k}"] = f"{mean:.3f} [{low:.3f}, {high:.3f}]" if high == high else f"{mean:.3f}"
        row["shuffled@1"] = f"{r.probe_shuffled_accuracy_k1:.3f}" if 1 in ks else "–"
        full = table[(table["coder_id"] == r.coder_id) & (table["probe"] == "full")]
        row["full width"] = f"{full['accuracy'].mean():.3f}" if len(full) else "–"
        rows.append(row)
    return (
        "test accuracy of the k-sparse probe, mean over tasks [95% t-interval]; chance 0.5; shuffled: the probe on "
        "shuffled training labels\n" + pd.DataFrame(rows).to_string(index=False)
    )
