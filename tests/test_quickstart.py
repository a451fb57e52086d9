"""The README's main command at a small scale: `bae study` (what `make quickstart` runs) on the quickstart spec
with a few thousand tokens, in its own process (the session fixture `quickstart_run`), then the run read back with
`analysis.load_run`."""

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import load_run, training_curves

REPO = Path(__file__).resolve().parent.parent


def test_quickstart_study_writes_the_report_the_tables_and_the_plots(quickstart_run):
    run, done = quickstart_run
    report = run / "report" / "report.md"
    # Progress while it works, and where the results are at the end.
    assert "[1/3] sweep" in done.stderr and "[3/3] report" in done.stderr
    assert f"report: {report}" in done.stdout and "frontier.parquet" in done.stdout

    tables = load_run(str(run))
    assert len(tables.trials) == 8 and (tables.trials["status"] == "finished").all()
    assert {"trial_id", "activation", "kind", "k", "fvu", "lexical_auroc", "checkpoint"} <= set(tables.trials.columns)
    assert {"coder_id", "latent", "firing_rate", "eligible", "explanation", "token_auroc"} <= set(tables.latents)
    assert len(tables.coders) == 8 + 2 + 2  # 8 coders, the neuron baseline at each k, the two controls
    assert {"fvu", "ce_increase", "loss_recovered", "token_auroc", "token_auroc_weighted"} <= set(tables.coders)
    # The values the spec set: spliced loss on whole held-out sequences of 64 tokens holding 128 (each predicts 63),
    # 2 ablation bins per coder, 20 training steps with a training log every 10.
    trained = tables.coders[tables.coders["trial_id"].notna()]
    assert (trained["fidelity_tokens"] == 2 * 63).all() and (trained["steps"] == 20).all()
    assert (tables.ablation.groupby("coder_id")["bin"].nunique() == 2).all() and len(tables.ablation) == 8 * 2
    assert (tables.coders["eligible"] > 0).all() and (tables.coders["test_windows_median"] >= 1).all()
    curves = training_curves(tables.trials)
    assert curves.groupby("trial_id")["step"].apply(list).tolist() == [[10, 20]] * 8
    frontier = pd.read_parquet(run / "frontier.parquet")
    assert {"family", "group", "reconstruction", "interpretability", "on_frontier"} <= set(frontier.columns)
    assert set(frontier["family"]) == {"binary SAE", "continuous SAE", "binary transcoder", "continuous transcoder"}
    assert frontier.groupby(["group", "reconstruction_metric", "interpretability_metric"])["on_frontier"].any().all()

    text = report.read_text()
    assert "lexical explainability (token/bigram rules)" in text and "## The paper's claims" in text
    assert "## Controls" in text and "## Convergence" in text and "95% CI" in text and "Warning" not in text
    for claim in range(1, 6):
        assert f"| {claim}. " in text
    for png in ("frontier", "firing_rates", "rate_vs_score", "ablation", "training"):
        figure = run / "report" / f"{png}.png"
        assert figure.stat().st_size > 10_000 and f"({png}.png)" in text

    # Acceptance: the run's key numbers against those stored from a reviewed run, with tolerances, so that a silent
    # change in any stage (cache, training, scoring, aggregation, claims) fails here. After a deliberate change,
    # rerun with BAE_UPDATE_EXPECTED=1 to store the new numbers, and review the diff of the file.
    numbers = key_numbers(tables)
    if os.environ.get("BAE_UPDATE_EXPECTED"):
        EXPECTED.write_text(json.dumps(numbers, indent=2, sort_keys=True) + "\n")
    compare_key_numbers(numbers, json.loads(EXPECTED.read_text()))


EXPECTED = REPO / "tests" / "expected" / "quickstart_small.json"
TOLERANCE = {"fvu": 0.03, "l0_heldout": 0.5, "token_auroc": 0.04, "loss_recovered": 0.1}
"""Tolerances of the per-coder numbers, times (1 + |expected value|): wide enough for another CPU's float rounding,
narrow enough that a changed window split, data order, decoder constraint or L0 control moves at least one."""


def key_numbers(tables) -> dict:
    from analysis import claims_table

    coders = tables.coders
    trained = coders[coders["trial_id"].notna()]
    out = {"coders": {}, "controls": {}, "claims": {}}
    for r in trained.itertuples():
        out["coders"][f"{r.activation} {r.kind} k{r.k}"] = {c: float(getattr(r, c)) for c in TOLERANCE}
    for r in coders[coders["trial_id"].isna()].itertuples():
        out["controls"][r.coder_id] = float(r.token_auroc)
    claims = claims_table(coders, tables.latents)
    out["claims"] = dict(zip(claims["claim"].str.split(".").str[0], claims["verdict"], strict=True))
    out["claim_estimates"] = dict(zip(claims["claim"].str.split(".").str[0], claims["estimate"], strict=True))
    return out


def compare_key_numbers(numbers: dict, expected: dict) -> None:
    assert numbers["coders"].keys() == expected["coders"].keys()
    for coder, values in expected["coders"].items():
        for column, value in values.items():
            got = numbers["coders"][coder][column]
            bound = TOLERANCE[column] * (1 + abs(value))
            assert abs(got - value) <= bound, f"{coder} {column}: {got:.4f}, expected {value:.4f}"
    # The controls at their known answers, whatever was stored; the baselines near their stored values.
    for coder_id, value in numbers["controls"].items():
        if coder_id.startswith("token-control"):
            assert value > 0.95, f"{coder_id}: {value:.3f}"
        elif coder_id.startswith("random-control"):
            assert abs(value - 0.5) < 0.06, f"{coder_id}: {value:.3f}"
        else:
            assert abs(value - expected["controls"][coder_id]) <= TOLERANCE["token_auroc"], coder_id
    # A clear difference (binary - continuous, transcoder - SAE) keeps its sign, even where this reduced run is
    # too small for a verdict.
    for claim, value in expected["claim_estimates"].items():
        if abs(value) > 0.02:
            got = numbers["claim_estimates"][claim]
            assert np.sign(got) == np.sign(value), f"claim {claim}: estimate {got:+.3f}, stored {value:+.3f}"
    # A significant difference never turns into its opposite.
    opposite = {"agrees": "disagrees", "disagrees": "agrees"}
    for claim, verdict in expected["claims"].items():
        assert numbers["claims"][claim] != opposite.get(verdict), f"claim {claim}: {numbers['claims'][claim]}"
