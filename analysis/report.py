"""`bae report RUN`: one self-contained Markdown report of a scored run, with its figures beside it.

RUN/frontier.parquet          the frontier table (written here, next to trials and latents)
RUN/report/report.md          the report: what was run, what the score means, the claims table, the tables
RUN/report/*.png              the figures it shows (analysis.plots)

The run folder and the report folder may each be a local path or a URI (s3://bucket/run).
"""

from __future__ import annotations

import io
import math
import tempfile
from pathlib import Path

import pandas as pd

from analysis import plots
from analysis.claims import SPARSITY_TOLERANCE, claims_table
from analysis.controls import control_checks, missed_controls
from analysis.convergence import FALLING, convergence_summary, convergence_table, describe_rule
from analysis.frontier import family, frontier_table
from analysis.llm_judge import llm_judge_section
from analysis.probing import probing_section
from analysis.run import FRONTIER_TABLE, load_run, training_curves
from bae_core.data.cache import open_filesystem, write_bytes_atomic
from bae_core.data.paths import copy_folder, is_uri
from bae_core.evaluation.aggregate import MIN_TEST_WINDOWS
from bae_core.evaluation.lexical import LABEL

REPORT_DIR = "report"
FRONTIER_COLUMNS = ["reconstruction_metric", "reconstruction", "interpretability_metric", "interpretability"]


def _markdown(frame: pd.DataFrame, floats: str = "{:.3f}") -> str:
    """A DataFrame as a GitHub-flavoured Markdown table (no extra dependency)."""
    if frame.empty:
        return "_(none)_"

    def cell(v) -> str:
        if isinstance(v, float):
            return "–" if math.isnan(v) else floats.format(v)
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


DICTIONARY_LABELS = {
    "mlp_neurons": "MLP neurons, top-k (baseline)",
    "token_control": "token control (expect ~1)",
    "random_control": "random control (expect ~0.5)",
}


def _with_interval(value, low, high) -> str:
    """`value [low, high]`, or the value alone when it has no interval."""
    if not isinstance(value, float) or math.isnan(value):
        return "–"
    if isinstance(low, float) and math.isfinite(low):
        return f"{value:.3f} [{low:.3f}, {high:.3f}]"
    return f"{value:.3f}"


def _coders_summary(coders: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for r in coders.to_dict("records"):
        trained = isinstance(r.get("trial_id"), str)
        imported = isinstance(r.get("origin"), str) and r["origin"] != "run"
        if trained or imported:
            name = family(r["activation"], r["kind"])
            if imported:
                name += f" ({r['origin'].split(':', 1)[0]} import)"  # e.g. "continuous SAE (sparsify import)"
        else:
            name = DICTIONARY_LABELS.get(r.get("dictionary"), "")
        trained = trained or imported
        if r.get("underpowered"):
            name += " **(underpowered)**"
        rows.append(
            {
                "dictionary": name,
                "k": r["k"] if trained or r.get("dictionary") == "mlp_neurons" else "–",
                "L0 (held-out)": r.get("l0_heldout", math.nan),
                "FVU": r.get("fvu", math.nan) if trained else math.nan,
                "CE increase": r.get("ce_increase", math.nan),
                "loss recovered": r.get("loss_recovered", math.nan),
                "dead": r["dead_fraction"],
                "> 1%": r["frequent_fraction"],
                "> 10%": r["dense_fraction"],
                "eligible": r.get("eligible"),
                "firing share": r.get("eligible_firing_share", math.nan),
                "test windows (median)": r.get("test_windows_median", math.nan),
                "AUROC [95% CI]": _with_interval(
                    r["token_auroc"], r.get("token_auroc_ci_low"), r.get("token_auroc_ci_high")
                ),
                "freq-weighted [95% CI]": _with_interval(
                    r["token_auroc_weighted"],
                    r.get("token_auroc_weighted_ci_low"),
                    r.get("token_auroc_weighted_ci_high"),
                ),
                "shuffled": r.get("shuffled_token_auroc", math.nan),
            }
        )
    return pd.DataFrame(rows)


def _sparsity_notes(claims: pd.DataFrame) -> str:
    """One line per distinct comparison (claims on the same pairs share theirs), naming its claims."""
    notes: dict[str, list[str]] = {}
    for claim, note in zip(claims["claim"], claims["sparsity"], strict=True):
        if note:
            notes.setdefault(note, []).append(claim.split(".")[0])
    return "\n".join(f"- claims {', '.join(c)}: {note}" for note, c in notes.items())


def _convergence_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per coder: its last logged step, the FVU drop over the last part of training with its interval, and the
    verdict."""
    return pd.DataFrame(
        {
            "dictionary": table["family"] if "family" in table else table["trial_id"],
            "k": table.get("k"),
            "seed": table.get("seed"),
            "steps": table["steps"],
            "train FVU at the end": table["fvu_end"],
            "FVU drop over the window [95% CI]": [
                "–" if not isinstance(d, float) or math.isnan(d) else f"{d:.1%} [{lo:.1%}, {hi:.1%}]"
                for d, lo, hi in zip(
                    table["relative_drop"], table["relative_drop_low"], table["relative_drop_high"], strict=True
                )
            ],
            "verdict": table["verdict"],
        }
    )


def seeds_summary(coders: pd.DataFrame) -> pd.DataFrame:
    """Settings trained with several seeds: the mean and standard deviation over seeds."""
    from bae_core.evaluation.aggregate import across_seeds

    trained = coders[coders["trial_id"].notna()]
    if trained.empty or "seed" not in trained or trained["seed"].nunique() < 2:
        return pd.DataFrame()
    columns = ["fvu", "l0_heldout", "ce_increase", "token_auroc", "token_auroc_weighted"]
    table = across_seeds(trained, columns, ["hookpoint", "activation", "kind", "k", "num_latents"])
    out = pd.DataFrame(
        {
            "dictionary": [family(a, k) for a, k in zip(table["activation"], table["kind"], strict=True)],
            "k": table["k"],
            "seeds": table["seeds"],
        }
    )
    for c in columns:
        if f"{c}_mean" in table:
            out[c] = [
                "–" if math.isnan(m) else f"{m:.3f} ± {s:.3f}" if math.isfinite(s) else f"{m:.3f}"
                for m, s in zip(table[f"{c}_mean"], table[f"{c}_std"], strict=True)
            ]
    return out


def write_report(run_dir: str, out_dir: str | None = None) -> Path | str:
    """Write RUN/frontier.parquet and the report (RUN/report/report.md and its PNGs, or under `out_dir`);
    returns the report's path. Either folder may be a local path or a URI (s3://...): a report for a URI is
    made in a local temporary folder, then copied there."""
    run_dir = str(run_dir)
    out = str(out_dir) if out_dir else f"{run_dir.rstrip('/')}/{REPORT_DIR}"
    if is_uri(out):
        with tempfile.TemporaryDirectory(prefix="bae-report-") as d:
            write_report(run_dir, d)
            copy_folder(d, out)
        return f"{out.rstrip('/')}/report.md"
    tables = load_run(run_dir)
    if not tables.scored:
        raise ValueError(f"run {run_dir}: no coders.parquet yet; run `bae score {run_dir}` first")
    frontier = frontier_table(tables.coders)
    buffer = io.BytesIO()
    frontier.to_parquet(buffer, index=False)
    fs, base = open_filesystem(run_dir)
    write_bytes_atomic(fs, f"{base}/{FRONTIER_TABLE}", buffer.getvalue())

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    coders, latents, trials = tables.coders, tables.latents, tables.trials
    curves = training_curves(trials)
    finished = trials[trials["status"] == "finished"]
    convergence = convergence_table(curves, finished) if len(finished) else pd.DataFrame()
    figures = {
        "frontier": plots.frontier(frontier, out / "frontier.png", LABEL),
        "firing rates": plots.firing_rates(latents, coders, out / "firing_rates.png"),
        "firing rate vs score": plots.rate_vs_score(latents, coders, out / "rate_vs_score.png", LABEL),
        "ablation by score": plots.ablation(tables.ablation, coders, out / "ablation.png"),
        "training": plots.training(curves, trials, out / "training.png"),
        "sparse probing": plots.probing(tables.probing, out / "probing.png"),
    }
    claims = claims_table(coders, latents)
    text = _render(run_dir, tables, frontier, claims, figures, convergence)
    path = out / "report.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def _browser_line(run_dir) -> str:
    """A link to the run's feature browser (`bae browse`), or how to write it."""
    fs, base = open_filesystem(str(run_dir))
    if fs.get_file_info(f"{base}/browse/index.html").type.name != "NotFound":
        return (
            "Feature browser: [browse/index.html](../browse/index.html) (every dictionary's latents with their "
            "explanations, scores, sample sizes and held-out example windows; `bae browse RUN` updates it)."
        )
    return (
        "Feature browser: run `bae browse RUN` to write RUN/browse/index.html (every latent's explanation, scores "
        "and held-out example windows)."
    )


def _scale(trials: pd.DataFrame) -> str:
    finished = trials[trials["status"] == "finished"]
    seeds = finished["seed"].nunique() if "seed" in finished else 1
    steps = int(finished["steps"].max()) if "steps" in finished and len(finished) else 0
    return f"{len(finished)} coders, {seeds} seed{'s' if seeds != 1 else ''}, {steps} training steps"


def _heldout_tokens(latents: pd.DataFrame) -> str:
    """Tokens the firing rates were counted on: a firing latent's count over its rate."""
    alive = latents[latents["firing_rate"] > 0] if not latents.empty else latents
    return f"{round(alive['firing_count'].iloc[0] / alive['firing_rate'].iloc[0]):,}" if len(alive) else ""


def _render(run_dir, tables, frontier, claims, figures, convergence) -> str:
    trials, coders = tables.trials, tables.coders
    finished = trials[trials["status"] == "finished"]
    first = finished.iloc[0] if len(finished) else trials.iloc[0]
    settings = {
        "model": first.get("model"),
        "revision": first.get("revision"),
        "dataset": first.get("dataset"),
        "hookpoints": ", ".join(sorted(finished["hookpoint"].unique())),
        "trials": f"{len(finished)} finished of {len(trials)}",
        "training": f"{int(first['steps'])} steps, {int(first['tokens']):,} tokens per coder"
        if "tokens" in first
        else "",
        "held-out tokens (scores, density)": _heldout_tokens(tables.latents),
        "spliced-loss tokens": f"{int(coders['fidelity_tokens'].dropna().iloc[0]):,}"
        if "fidelity_tokens" in coders and coders["fidelity_tokens"].notna().any()
        else "",
        "code version": first.get("code_version"),
    }
    on_front = frontier[(frontier["group"] == "all") & frontier["on_frontier"]] if not frontier.empty else frontier
    checks = control_checks(coders)
    warning = missed_controls(checks)
    parts = [f"# Report: {Path(str(run_dir)).name}", ""]
    if warning:
        parts += [f"> **Warning: {warning}**", ""]
    parts += [
        "\n".join(f"- **{k}**: {v}" for k, v in settings.items() if v not in (None, "")),
        "",
        _browser_line(run_dir),
        "",
        "## What the interpretability score is, and is not",
        "",
        f"Every interpretability number here is **{LABEL}**: for each latent, up to 8 token and bigram rules are "
        "chosen on explain windows, and the score is the AUROC with which those rules predict the latent's firing "
        "on test windows from other documents (0.5 = chance, 1 = perfectly predicted). It needs no LLM and is "
        "deterministic. It is a proxy, not the paper's LLM judge: it under-scores latents that track context "
        "rather than tokens. The shuffled control (firing moved to random windows) should sit at 0.5, and the "
        "MLP's own neurons made sparse at the same k are the baseline dictionary. Frequency-weighted scores weight "
        "each latent by its firing count, so frequent latents dominate them.",
        "",
        "## The paper's claims, on this run's numbers",
        "",
        "Comparisons are between coders that differ only in the compared property (same hookpoint, kind, k, "
        "dictionary size and seed). Each claim's number is the mean paired difference over the run's settings. "
        "With several seeds its 95% interval is a t-interval from the between-seed variance (pooled over "
        "settings); with one seed per setting it comes from resampling each coder's latents and speaks only for "
        "these coders, not for the architectures, and FVU and spliced CE, one number per coder, have none. A "
        "claim agrees or disagrees only when the interval excludes zero; its score-based parts never on "
        "underpowered coders or, for frequency-weighted scores, when the eligible latents hold less than half of a "
        "coder's firing (density and reconstruction parts do not rest on test windows); and claim 3's density part "
        "only when the shares above 1% and above 10% point the same way. Otherwise it is inconclusive at this run's "
        f"size. This run: {_scale(trials)}.",
        "",
        _markdown(claims[["claim", "verdict", "measured", "paper"]]),
        "",
        "Sparsity of the compared coders (binary top-k fires fewer than k latents per token, so the same k is not "
        f"the same sparsity; differences above {SPARSITY_TOLERANCE:.0%} are flagged):",
        "",
        _sparsity_notes(claims) or "_(not measured)_",
        "",
        "## Controls",
        "",
        "Known answers scored through the same pipeline: a token control whose latents fire exactly on single "
        "frequent tokens, a random control with the same firing counts at random positions, and each coder's "
        "shuffled control.",
        "",
        _markdown(checks) if not checks.empty else "_(none scored)_",
        "",
        "## Coders",
        "",
        "Density and scores on held-out tokens; CE increase and loss recovered with the coder spliced into the model. "
        "Each score is the mean over the dictionary's eligible latents, with a 95% bootstrap interval (latents "
        "resampled, given this run's test text); `eligible` is how many latents it rests on, `firing share` the "
        "share of the dictionary's firing they hold (the frequency-weighted score covers only that share: latents "
        "that fire in nearly every window have no non-activating test window), and `test windows (median)` the "
        "median number of activating test windows behind each latent's score (as many non-activating ones are "
        "drawn). A dictionary "
        f"whose median is below {MIN_TEST_WINDOWS} is marked underpowered.",
        "",
        _markdown(_coders_summary(coders)),
        "",
    ]
    parts += llm_judge_section(coders, tables.latents)
    parts += [
        "## Frontier",
        "",
    ]
    if figures.get("frontier"):
        parts += ["![frontier](frontier.png)", ""]
    parts += [
        "Coders on the Pareto frontier of the whole run (no other coder has both lower error and a higher score):",
        "",
        _markdown(on_front[["family", "k", *(["l0_heldout"] if "l0_heldout" in on_front else []), *FRONTIER_COLUMNS]])
        if not on_front.empty
        else "_(not measured)_",
        "",
    ]
    captions = {
        "firing rates": "Firing rates: how often each latent fires on held-out tokens. Latents right of the 1% "
        "line are the ultra-high-frequency ones the paper discusses.",
        "firing rate vs score": "Firing rate against score, latent by latent.",
        "ablation by score": "Ablation by score: scored (eligible) latents sorted by score and cut into bins of "
        "equal firing mass, each bin zero-ablated inside the spliced coder; the bins cover only the eligible "
        "latents' share of the firing, and each CE comes from the fidelity tokens alone, without an interval.",
        "training": "Training: train FVU and dead fraction along training (each point the mean since the one "
        "before), and on held-out tokens at the end (crosses).",
    }
    for name, caption in captions.items():
        figure = figures.get(name)
        parts += [f"## {name.capitalize()}", "", caption, ""]
        parts += [f"![{name}]({figure.name})", ""] if figure else ["_(no data)_", ""]
    if not tables.ablation.empty:
        table = tables.ablation.merge(coders[["coder_id", "activation", "kind", "k"]], on="coder_id")
        table["coder"] = [
            f"{family(a, kind)} k={k}"
            for a, kind, k in zip(table["activation"], table["kind"], table["k"], strict=True)
        ]
        parts += [
            _markdown(table[["coder", "bin", "latents", "mean_score", "relative_ce_increase"]]),
            "",
        ]
    if not convergence.empty:
        parts += ["## Convergence", "", convergence_summary(convergence), describe_rule(), ""]
        if (convergence["verdict"] == FALLING).any():
            parts += [
                "Coders still falling had not reached the FVU their size and k allow: comparisons between them "
                "compare training budgets as much as architectures.",
                "",
            ]
        parts += [_markdown(_convergence_summary(convergence)), ""]
    probing = figures.get("sparse probing")
    parts += probing_section(tables.probing, probing.name if probing else None, str(run_dir))
    seeds = seeds_summary(coders)
    if not seeds.empty:
        parts += ["## Across seeds", "", "Mean ± standard deviation over seeds, per setting.", "", _markdown(seeds), ""]
    parts += [
        "## Tables",
        "",
        "Load them with pandas: `analysis.load_run(path)` returns `trials`, `latents`, `coders`, `frontier`, "
        "`ablation` and `density`, or read the parquet files in the run folder directly.",
        "",
    ]
    return "\n".join(parts)
