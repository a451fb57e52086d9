"""Sparse probing's tables (RUN/probing.parquet, written by `bae probe`; evaluation.md §7): per-coder means, the
coder families against the raw and neuron baselines, and binary against continuous latents, each with its 95%
interval over tasks.

Intervals are Student-t intervals over tasks: a task's number is the mean over the group's dictionaries on it,
and the tasks are the sample. They speak for tasks like these and for the run's coders, not for the coders'
seeds (a run with one seed per setting has no between-seed spread to add).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy.stats import t as student_t

from analysis.claims import MATCH
from analysis.frontier import family
from bae_core.coders.config import BINARY_ACTIVATIONS

BASELINES = {
    "mlp_neurons": "MLP neurons, top-k per token",
    "mlp_neurons_dense": "MLP neurons, dense",
    "raw_input": "raw input (transcoders encode it)",
    "raw_output": "raw output (SAEs encode it)",
}
"""Labels of the baseline dictionaries; a trained coder's group is its family (`analysis.frontier.family`)."""
COMMAND = "bae probe RUN"


def t_interval(values) -> tuple[float, float, float]:
    """(mean, low, high): the 95% Student-t interval of the mean of `values` (NaNs dropped); no bounds below 2."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return math.nan, math.nan, math.nan
    mean = float(values.mean())
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = float(student_t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values)))
    return mean, mean - half, mean + half


def group(row) -> str:
    """The group a probing row belongs to: a coder family or a baseline's label."""
    if row["activation"] in BASELINES:
        return BASELINES[row["activation"]]
    origin = row.get("origin")
    imported = isinstance(origin, str) and origin != "run"
    return family(row["activation"], row["kind"]) + (f" ({origin.split(':', 1)[0]} import)" if imported else "")


def coder_summary(probing: pd.DataFrame) -> pd.DataFrame:
    """One row per dictionary: `probe_tasks`, and per probe size k `probe_accuracy_k{k}` (mean test accuracy of
    the k-sparse probe over tasks) with `_ci_low` and `_ci_high` (95% t-interval over tasks); also
    `probe_shuffled_accuracy_k1`, the shuffled-label control (expect ~0.5)."""
    sparse = probing[probing["probe"] == "sparse"]
    rows = []
    for coder_id, g in sparse.groupby("coder_id", sort=False):
        row = {"coder_id": coder_id, "probe_tasks": int(g["task"].nunique())}
        for k, part in g.groupby("probe_k"):
            mean, low, high = t_interval(part["accuracy"])
            row.update({f"probe_accuracy_k{k}": mean, f"probe_accuracy_k{k}_ci_low": low})
            row[f"probe_accuracy_k{k}_ci_high"] = high
            if k == 1:
                row["probe_shuffled_accuracy_k1"] = float(part["shuffled_accuracy"].mean())
        rows.append(row)
    return pd.DataFrame(rows)


def per_task(probing: pd.DataFrame, column: str = "accuracy") -> pd.DataFrame:
    """Mean `column` per (group, probe, probe_k, task) over the group's dictionaries, with how many there are."""
    table = probing.assign(group=probing.apply(group, axis=1))
    keys = ["group", "probe", "probe_k", "task"]
    out = table.groupby(keys, sort=False).agg(value=(column, "mean"), dictionaries=("coder_id", "nunique"))
    return out.reset_index()


def _cell(mean: float, low: float, high: float) -> str:
    if not math.isfinite(mean):
        return "–"
    return f"{mean:.3f} [{low:.3f}, {high:.3f}]" if math.isfinite(low) else f"{mean:.3f}"


def family_table(probing: pd.DataFrame, ks=None) -> pd.DataFrame:
    """Per group (coder family or baseline): dictionaries, tasks, and the mean test accuracy of the k-sparse probe
    with its 95% t-interval over tasks for each k of `ks` (default: every k probed), the shuffled-label control at
    the first k, and for the raw baselines the full-width probe (every feature; a dense readout, not a ceiling)."""
    if ks is None:
        ks = sorted(probing.loc[probing["probe"] == "sparse", "probe_k"].unique())
    tasks = per_task(probing)
    shuffled = per_task(probing, "shuffled_accuracy")
    present, known = set(tasks["group"]), {*_families(), *BASELINES.values()}
    groups = [g for g in _families() if g in present] + sorted(present - known)
    groups += [g for g in BASELINES.values() if g in present]
    rows = []
    for name in groups:
        mine = tasks[tasks["group"] == name]
        sparse = mine[mine["probe"] == "sparse"]
        row = {"group": name, "dictionaries": int(sparse["dictionaries"].max()), "tasks": sparse["task"].nunique()}
        for k in ks:
            row[f"k={k} accuracy [95% CI]"] = _cell(*t_interval(sparse.loc[sparse["probe_k"] == k, "value"]))
        control = shuffled[(shuffled["group"] == name) & (shuffled["probe_k"] == ks[0])]
        row[f"shuffled labels, k={ks[0]}"] = _cell(control["value"].mean(), math.nan, math.nan)
        full = mine[mine["probe"] == "full"]
        row["full width [95% CI]"] = _cell(*t_interval(full["value"])) if len(full) else "–"
        rows.append(row)
    return pd.DataFrame(rows)


def _families() -> list[str]:
    return [f"{latents} {kind}" for kind in ("SAE", "transcoder") for latents in ("binary", "continuous")]


def binary_vs_continuous(probing: pd.DataFrame, k: int, metric: str = "accuracy") -> dict:
    """Binary minus continuous k-sparse probe `metric` (accuracy or auroc) on pairs of trained coders that differ
    only in their activation (same `analysis.claims.MATCH`: hookpoint, kind, k, dictionary size and seed): per task
    the mean over pairs, then the mean over tasks with its 95% t-interval. Keys: `difference`, `low`, `high`,
    `tasks`, `binary_ahead` (tasks where binary is ahead), `pairs`, `verdict` (binary better, continuous better, or
    inconclusive when the interval holds zero)."""
    coders = ~probing["activation"].isin(list(BASELINES))
    rows = probing[(probing["probe"] == "sparse") & (probing["probe_k"] == k) & coders]
    rows = rows.assign(binary=rows["activation"].isin(BINARY_ACTIVATIONS))
    keys = [c for c in (*MATCH, "task") if c in rows.columns]
    pairs = rows[rows["binary"]].merge(rows[~rows["binary"]], on=keys, suffixes=("_b", "_c"))
    if pairs.empty:
        empty = {"difference": math.nan, "low": math.nan, "high": math.nan, "tasks": 0, "binary_ahead": 0}
        return {**empty, "pairs": 0, "verdict": "–"}
    per = (pairs[f"{metric}_b"] - pairs[f"{metric}_c"]).groupby(pairs["task"]).mean()
    mean, low, high = t_interval(per)
    verdict = "binary better" if low > 0 else "continuous better" if high < 0 else "inconclusive"
    n_pairs = len(pairs.drop_duplicates(["coder_id_b", "coder_id_c"]))
    return {
        "difference": mean,
        "low": low,
        "high": high,
        "tasks": len(per),
        "binary_ahead": int((per > 0).sum()),
        "pairs": n_pairs,
        "verdict": verdict,
    }


def probing_section(probing: pd.DataFrame, figure: str | None, run: str = "RUN") -> list[str]:
    """The report's "Sparse probing" section as Markdown lines; when `probing` is empty, how to make it."""
    from analysis.report import _markdown

    parts = ["## Sparse probing", ""]
    if probing.empty:
        return parts + [f"Not measured yet: `{COMMAND.replace('RUN', run)}` writes RUN/probing.parquet.", ""]
    sparse = probing[probing["probe"] == "sparse"]
    n_train, n_test = int(sparse["n_train"].median()), int(sparse["n_test"].median())
    parts += [
        "Do a dictionary's latents, one or a few at a time, tell apart the two classes of a labelled text task? Per "
        "task (binary classification tasks of the sae-probes wheel: Kantamneni et al.'s protocol, which SAEBench "
        "runs as sparse_probing_sae_probes), the hookpoint's activation at each prompt's last token is encoded; each "
        "feature is divided by its mean non-zero |value| on the training prompts (as sae-probes does, so that a "
        "binary latent's firing rates and a large continuous latent's values are ranked on one scale), the k with the "
        "largest class-mean difference are chosen and a logistic regression on them is tested on held-out prompts "
        f"({sparse['task'].nunique()} tasks, median {n_train} training and {n_test} test prompts per task, distinct "
        "prompts, balanced: chance is 0.5). Baselines get the same probe: the raw activations (the one each coder "
        "encodes) and the MLP's neurons; `full width` is a cross-validated logistic regression on every raw feature, "
        "a dense readout of these prompts, not a ceiling. The shuffled control fits the probe on shuffled training "
        "labels (expect 0.5). Intervals: 95% Student-t over tasks (a task's number is the mean over the group's "
        "dictionaries); the tasks differ in difficulty far more than the groups do, so compare groups with the "
        "paired differences below, not by overlapping intervals. They do not include seed-to-seed spread.",
        "",
    ]
    if figure:
        parts += [f"![sparse probing]({figure})", ""]
    parts += [_markdown(family_table(probing)), ""]
    lines = []
    for metric in ("accuracy", "auroc"):
        for k in sorted(sparse["probe_k"].unique()):
            d = binary_vs_continuous(probing, k, metric)
            if d["pairs"]:
                lines.append(
                    f"- {metric}, k = {k}: binary - continuous {d['difference']:+.3f} [{d['low']:+.3f}, "
                    f"{d['high']:+.3f}] over {d['tasks']} tasks (binary ahead on {d['binary_ahead']}; "
                    f"{d['pairs']} matched pairs of coders): **{d['verdict']}**"
                )
    if lines:
        parts += [
            "Binary against continuous latents, on coders that differ only in their activation (same hookpoint, "
            "kind, k, dictionary size and seed). Every probe size and both metrics are listed; with this many "
            "comparisons one interval that excludes zero is weaker evidence than it looks, and a difference that "
            "changes sign with k is no verdict on either. A probe on one binary latent has only two scores, so its "
            "AUROC is its balanced accuracy, while one continuous latent can rank the prompts:",
            "",
            *lines,
            "",
        ]
    return parts
