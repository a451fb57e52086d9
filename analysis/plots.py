"""The report's figures (matplotlib, PNG), each from the run's tables.

- `frontier`: reconstruction (FVU, spliced CE increase) against interpretability (unweighted and
  frequency-weighted), one colour per coder family, each family's Pareto frontier drawn as a step line;
- `firing_rates`: histograms of log10(firing rate), binary and continuous coders overlaid;
- `rate_vs_score`: each latent's firing rate against its score, one panel per family;
- `ablation`: the relative CE increase of ablating each bin of latents against the bin's mean score;
- `training`: train FVU and dead fraction at every logged step, one line per trial, the convergence window shaded;
- `probing`: sparse probing's test accuracy against k, one line per coder family and baseline, with the
  full-width probe and chance.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from analysis.convergence import WINDOW  # noqa: E402
from analysis.frontier import family  # noqa: E402
from bae_core.coders.config import BINARY_ACTIVATIONS  # noqa: E402

FAMILY_COLOURS = {
    "binary SAE": "#d62728",
    "continuous SAE": "#1f77b4",
    "binary transcoder": "#ff7f0e",
    "continuous transcoder": "#2ca02c",
}
LABELS = {
    "fvu": "held-out FVU (lower is better)",
    "ce_increase": "spliced CE increase, nats (lower is better)",
    "token_auroc": "mean token AUROC, unweighted",
    "token_auroc_weighted": "mean token AUROC, frequency-weighted",
}


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _with_family(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    frame["family"] = [family(a, k) for a, k in zip(frame["activation"], frame["kind"], strict=True)]
    return frame


def frontier(frontier_table: pd.DataFrame, path: Path, score_label: str) -> Path | None:
    """One panel per (reconstruction, interpretability) pair of the frontier table."""
    if frontier_table.empty:
        return None
    table = frontier_table[frontier_table["group"] != "all"]
    pairs = list(table.groupby(["reconstruction_metric", "interpretability_metric"], sort=False).groups)
    cols = 2
    rows = int(np.ceil(len(pairs) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.5 * rows), squeeze=False)
    for ax, (x, y) in zip(axes.flat, pairs, strict=False):
        part = table[(table["reconstruction_metric"] == x) & (table["interpretability_metric"] == y)]
        for fam, g in part.groupby("family", sort=True):
            colour = FAMILY_COLOURS.get(fam)
            ax.scatter(g["reconstruction"], g["interpretability"], color=colour, label=fam, s=36, alpha=0.85)
            for r in g.itertuples():
                ax.annotate(f"k={r.k}", (r.reconstruction, r.interpretability), fontsize=7, alpha=0.7)
            front = g[g["on_frontier"]].sort_values("reconstruction")
            if len(front) > 1:
                ax.step(front["reconstruction"], front["interpretability"], where="post", color=colour, alpha=0.6)
        ax.set_xlabel(LABELS.get(x, x))
        ax.set_ylabel(LABELS.get(y, y))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(pairs) :]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"Reconstruction vs interpretability ({score_label})", fontsize=10)
    return _save(fig, path)


def firing_rates(latents: pd.DataFrame, coders: pd.DataFrame, path: Path) -> Path | None:
    """log10 firing-rate histograms of every trained coder's latents, binary and continuous overlaid."""
    trained = coders[coders["trial_id"].notna()]
    if latents.empty or trained.empty:
        return None
    binary_ids = set(trained.loc[trained["activation"].isin(BINARY_ACTIVATIONS), "coder_id"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    bins = np.linspace(-6, 0, 49)
    for ax, kind in zip(axes, ("sae", "skip_transcoder"), strict=True):
        ids = set(trained.loc[trained["kind"] == kind, "coder_id"])
        shown = False
        for name, chosen, colour in (
            ("binary", ids & binary_ids, "#d62728"),
            ("continuous", ids - binary_ids, "#1f77b4"),
        ):
            rates = latents.loc[latents["coder_id"].isin(chosen), "firing_rate"].to_numpy(dtype=float)
            if len(rates) == 0:
                continue
            alive = rates[rates > 0]
            label = f"{name} ({len(chosen)} coders; dead: {int((rates == 0).sum())} of {len(rates)})"
            ax.hist(np.log10(alive), bins=bins, alpha=0.5, color=colour, label=label)
            shown = True
        for cut, text in ((-2, "1%"), (-1, "10%")):
            ax.axvline(cut, color="grey", linestyle="--", linewidth=0.8)
            ax.text(cut, ax.get_ylim()[1] * 0.95, text, fontsize=8, ha="right")
        ax.set_title("SAE" if kind == "sae" else "skip transcoder")
        ax.set_xlabel("log10 firing rate on held-out tokens")
        ax.set_ylabel("latents")
        if shown:
            ax.legend(fontsize=8)
    return _save(fig, path)


def rate_vs_score(latents: pd.DataFrame, coders: pd.DataFrame, path: Path, score_label: str) -> Path | None:
    """Each eligible latent's firing rate against its token AUROC, one panel per family."""
    trained = _with_family(coders[coders["trial_id"].notna()])
    if latents.empty or trained.empty:
        return None
    scored = latents[latents["eligible"].astype(bool)].merge(trained[["coder_id", "family"]], on="coder_id")
    families = [f for f in FAMILY_COLOURS if f in set(scored["family"])]
    if not families:
        return None
    fig, axes = plt.subplots(1, len(families), figsize=(4.2 * len(families), 4), squeeze=False, sharey=True)
    for ax, fam in zip(axes.flat, families, strict=True):
        g = scored[scored["family"] == fam]
        ax.scatter(np.log10(g["firing_rate"]), g["token_auroc"], s=3, alpha=0.3, color=FAMILY_COLOURS[fam])
        ax.axvline(-2, color="grey", linestyle="--", linewidth=0.8)
        ax.set_title(fam, fontsize=9)
        ax.set_xlabel("log10 firing rate")
        ax.grid(alpha=0.3)
    axes.flat[0].set_ylabel(f"token AUROC ({score_label})", fontsize=8)
    return _save(fig, path)


def ablation(ablation_table: pd.DataFrame, coders: pd.DataFrame, path: Path) -> Path | None:
    """Relative CE increase of ablating each bin against its mean score, one line per coder."""
    if ablation_table.empty:
        return None
    table = ablation_table.merge(_with_family(coders[coders["trial_id"].notna()]), on="coder_id", how="left")
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    labelled = set()
    for _, g in table.groupby("coder_id", sort=False):
        fam = g["family"].iloc[0]
        g = g.sort_values("mean_score")
        ax.plot(
            g["mean_score"],
            g["relative_ce_increase"],
            marker="o",
            color=FAMILY_COLOURS.get(fam),
            alpha=0.7,
            label=None if fam in labelled else fam,
        )
        labelled.add(fam)
    ax.set_xlabel("mean token AUROC of the bin's latents")
    ax.set_ylabel("relative CE increase when the bin is ablated")
    ax.set_title("Ablation by interpretability (bins of equal firing mass)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _log_tick(value: float, _position) -> str:
    """Plain numbers on a log axis, at 1, 2, 3 and 5 times a power of ten only (the others crowd)."""
    if value <= 0:
        return ""
    lead = round(value / 10 ** np.floor(np.log10(value)))
    return f"{value:.2g}" if lead in (1, 2, 3, 5) else ""


def training(curves: pd.DataFrame, trials: pd.DataFrame, path: Path) -> Path | None:
    """Train FVU (log scale) and dead fraction at every logged step of `curves` (`training_curves`), one line per
    trial, coloured by family, a line style per k; the last part of training, where `analysis.convergence`
    judges whether FVU levelled off, shaded. The final held-out values are separate crosses (the training dead
    fraction counts latents that never fired since the start, the held-out one those that never fire on held-out
    tokens: not the same quantity)."""
    if curves.empty:
        return None
    labelled = _with_family(trials)
    ks = sorted(labelled["k"].dropna().unique())
    styles = dict(zip(ks, ["-", "--", ":", "-."] * len(ks), strict=False))
    curves = curves.merge(labelled[["trial_id", "family", "k"]], on="trial_id")
    finished = labelled[labelled["trial_id"].isin(curves["trial_id"])]
    if "status" in finished:
        finished = finished[finished["status"] == "finished"]
    last = curves["step"].max()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    for ax, metric in zip(axes, ("fvu", "dead_fraction"), strict=True):
        ax.axvspan((1 - WINDOW) * last, last, color="grey", alpha=0.12, linewidth=0)
        for _, g in curves.groupby("trial_id", sort=False):
            ax.plot(
                g["step"],
                g[metric],
                color=FAMILY_COLOURS.get(g["family"].iloc[0]),
                linestyle=styles.get(g["k"].iloc[0], "-"),
                linewidth=1.1,
                alpha=0.8,
            )
        if metric in finished and "steps" in finished:
            for fam, g in finished.groupby("family"):
                ax.scatter(g["steps"], g[metric], marker="x", color=FAMILY_COLOURS.get(fam), s=40, zorder=3)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].yaxis.set_major_formatter(FuncFormatter(_log_tick))
    axes[0].yaxis.set_minor_formatter(FuncFormatter(_log_tick))
    axes[0].set_ylabel("FVU (log scale)")
    axes[1].set_ylabel("dead fraction")
    handles = [
        Line2D([], [], color=FAMILY_COLOURS.get(f), label=f) for f in FAMILY_COLOURS if f in set(curves["family"])
    ]
    if len(ks) > 1:
        handles += [Line2D([], [], color="black", linestyle=styles[k], label=f"k={k}") for k in ks]
    handles += [
        Line2D([], [], color="black", marker="x", linestyle="", label="held-out, at the end"),
        Patch(color="grey", alpha=0.25, label=f"last {WINDOW:.0%}: convergence check"),
    ]
    axes[0].legend(handles=handles, fontsize=7)
    every = curves["interval_steps"].median() if curves["interval_steps"].notna().any() else None
    axes[0].set_title(
        "FVU of the training batches" + (f", mean of every {every:.0f} steps" if every else "") + "; held-out (x)",
        fontsize=9,
    )
    axes[1].set_title("dead fraction: never fired in training so far (lines), on held-out tokens (x)", fontsize=9)
    return _save(fig, path)


BASELINE_STYLES = {
    "MLP neurons, top-k per token": ("#7f7f7f", "--"),
    "MLP neurons, dense": ("#7f7f7f", ":"),
    "raw input (transcoders encode it)": ("#17becf", "-."),
    "raw output (SAEs encode it)": ("#9467bd", "-."),
}


def probing(probing_table: pd.DataFrame, path: Path) -> Path | None:
    """Test accuracy of the k-sparse probe against k (log scale), mean over tasks with its 95% t-interval, one
    line per coder family and baseline; the raw activations' full-width probe as horizontal lines."""
    from analysis.probing import per_task, t_interval

    if probing_table.empty:
        return None
    tasks = per_task(probing_table)
    fig, ax = plt.subplots(figsize=(10, 4.8))
    groups = list(dict.fromkeys(tasks["group"]))
    for i, name in enumerate(groups):
        g = tasks[tasks["group"] == name]
        colour, style = BASELINE_STYLES.get(name, (FAMILY_COLOURS.get(name.split(" (")[0], "black"), "-"))
        sparse = g[g["probe"] == "sparse"]
        points = [(k, *t_interval(part["value"])) for k, part in sparse.groupby("probe_k")]
        ks, means, lows, highs = (np.array(v, dtype=float) for v in zip(*points, strict=True))
        errors = np.nan_to_num(np.vstack([means - lows, highs - means]))
        dodge = ks * 1.025 ** (i - (len(groups) - 1) / 2)  # side by side, so the intervals stay readable
        ax.errorbar(
            dodge,
            means,
            yerr=errors,
            color=colour,
            linestyle=style,
            marker="o",
            ms=4,
            capsize=2,
            elinewidth=0.8,
            alpha=0.85,
            label=name,
        )
        full = g[g["probe"] == "full"]
        if len(full):
            ax.axhline(
                full["value"].mean(),
                color=colour,
                linestyle=style,
                linewidth=0.8,
                alpha=0.6,
                label=f"{name.split(' (')[0]}: full width",
            )
    ax.axhline(0.5, color="black", linewidth=0.8, alpha=0.5)
    ax.set_xscale("log")
    ax.set_xticks(sorted(tasks["probe_k"][tasks["probe"] == "sparse"].unique()))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("k (latents in the probe)")
    ax.set_ylabel("test accuracy, mean over tasks (chance 0.5)")
    ax.set_title(f"Sparse probing on {tasks['task'].nunique()} tasks (95% t-intervals over tasks)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    return _save(fig, path)
