"""analysis: the Pareto frontier on hand-made tables, and the convergence verdicts and training figure on
hand-made training curves (the claims table: test_claims.py)."""

import json

import numpy as np
import pandas as pd
import pytest

from analysis import family, frontier_table, pareto_mask, plots, training_curves
from analysis.convergence import (
    FALLING,
    LEVELLED,
    NO_LOG,
    RISING,
    TOO_FEW,
    UNCLEAR,
    convergence_summary,
    convergence_table,
)


def test_pareto_mask_drops_exactly_the_dominated_points():
    #          a    b    c    d    e    f    g(dup of a)  h(NaN)
    error = [0.1, 0.2, 0.3, 0.2, 0.4, 0.05, 0.1, np.nan]
    score = [0.6, 0.7, 0.9, 0.6, 0.8, 0.5, 0.6, 0.99]
    # d is dominated by a (lower error, same score) and by b; e by c; everything else is on the front.
    assert pareto_mask(np.array(error), np.array(score)).tolist() == [
        True,
        True,
        True,
        False,
        False,
        True,
        True,
        False,
    ]
    assert pareto_mask(np.array([]), np.array([])).tolist() == []
    with pytest.raises(ValueError, match="error, score"):
        pareto_mask(np.zeros(2), np.zeros(3))


def coders_table(rows):
    columns = ["coder_id", "trial_id", "activation", "kind", "hookpoint", "k", "num_latents", "seed"]
    metrics = ["fvu", "ce_increase", "token_auroc", "token_auroc_weighted", "frequent_fraction"]
    return pd.DataFrame(rows, columns=columns + metrics)


def test_frontier_table_per_family_and_overall():
    coders = coders_table(
        [
            ("c1", "t1", "topk", "sae", "h", 16, 100, 0, 0.10, 0.10, 0.70, 0.72, 0.01),
            ("c2", "t2", "topk", "sae", "h", 32, 100, 0, 0.05, 0.05, 0.65, 0.70, 0.01),
            ("c3", "t3", "topk", "sae", "h", 64, 100, 0, 0.08, 0.08, 0.60, 0.60, 0.01),  # dominated by c2
            ("b1", "t4", "binary_topk", "sae", "h", 16, 100, 0, 0.30, 0.30, 0.80, 0.60, 0.05),
            ("n", None, "mlp_neurons", "baseline", "h", 16, None, None, np.nan, np.nan, 0.6, 0.6, 0.0),
        ]
    )
    table = frontier_table(coders)
    assert "n" not in set(table["coder_id"])  # the neuron baseline is not a coder
    assert set(table["group"]) == {"all", "continuous SAE", "binary SAE"}
    fvu = table[(table["reconstruction_metric"] == "fvu") & (table["interpretability_metric"] == "token_auroc")]
    on = fvu[fvu["on_frontier"]]
    assert set(on.loc[on["group"] == "continuous SAE", "coder_id"]) == {"c1", "c2"}
    assert set(on.loc[on["group"] == "all", "coder_id"]) == {"c1", "c2", "b1"}
    assert set(fvu["coder_id"]) == {"c1", "c2", "c3", "b1"}
    assert len(table) == 4 * (4 + 4)  # 2 x 2 metric pairs x (4 coders in 'all' + 4 in their families)
    assert family("binary_topk", "skip_transcoder") == "binary transcoder"


# ---- convergence --------------------------------------------------------------------------------------------

STEPS = np.arange(10, 301, 10)  # the quickstart's 300 steps, logged every 10


def curve(trial_id, fvu, steps=STEPS):
    return pd.DataFrame({"trial_id": trial_id, "step": steps, "fvu": fvu})


def test_convergence_verdicts_on_hand_made_curves():
    noise = 1 + 0.01 * np.random.default_rng(0).standard_normal(len(STEPS))  # 1% batch noise
    spiky = np.full(len(STEPS), 0.2)
    spiky[[-2, -5]] = 0.5  # two bad intervals in the window: the median of slopes ignores them
    curves = pd.concat(
        [
            curve("flat", 0.2 * noise),
            # A power law, as early training looks: still 11% down over the last fifth.
            curve("steep", 0.9 * (STEPS / 10) ** -0.5 * noise),
            curve("line", 1 - 0.001 * STEPS),
            curve("spiky", spiky),
            curve("rising", 0.2 + 0.0005 * STEPS),
            # 15% batch noise on a flat curve: the fitted line can move by more than 2% across the window, but
            # its interval covers zero.
            curve("noisy", 0.2 * (1 + 0.15 * np.random.default_rng(3).standard_normal(len(STEPS)))),
            # Logged only at its checkpoints: 1 row in the last fifth.
            curve("sparse", [0.5, 0.4, 0.3], steps=[100, 200, 300]),
        ]
    )
    trials = pd.DataFrame(
        {
            "trial_id": ["flat", "steep", "line", "spiky", "rising", "noisy", "sparse", "unlogged"],
            "activation": ["topk", "binary_topk", "topk", "topk", "topk", "topk", "topk", "topk"],
            "kind": "sae",
            "k": 16,
        }
    )
    table = convergence_table(curves, trials)
    assert table["trial_id"].tolist() == trials["trial_id"].tolist()
    verdict = dict(zip(table["trial_id"], table["verdict"], strict=True))
    assert verdict == {
        "flat": LEVELLED,
        "steep": FALLING,
        "line": FALLING,
        "spiky": LEVELLED,
        "rising": RISING,
        "noisy": UNCLEAR,
        "sparse": TOO_FEW,
        "unlogged": NO_LOG,
    }
    assert table["levelled_off"].tolist() == [True, False, False, True, False, False, False, False]
    noisy = table.set_index("trial_id").loc["noisy"]
    assert abs(noisy["relative_drop"]) >= 0.02 and noisy["relative_drop_low"] < 0 < noisy["relative_drop_high"]
    row = table.set_index("trial_id").loc["line"]
    # The window is steps 240..300 (7 rows); the line falls from 0.76 to 0.70 across it.
    assert (row["window_start"], row["window_rows"], row["steps"]) == (240, 7, 300)
    assert row["fvu_window_start"] == pytest.approx(0.76) and row["fvu_end"] == pytest.approx(0.70)
    assert row["relative_drop"] == pytest.approx(0.06 / 0.76)
    assert row["relative_drop_low"] == pytest.approx(row["relative_drop_high"])  # no noise: no doubt
    steep = table.set_index("trial_id").loc["steep"]
    assert 0.09 < steep["relative_drop"] < 0.13 and steep["relative_drop_low"] > 0.02
    assert table.set_index("trial_id").loc["steep", "family"] == "binary SAE"
    # The threshold decides: at 20%, even the power law counts as levelled off.
    assert convergence_table(curves, trials, threshold=0.2).set_index("trial_id").loc["steep", "verdict"] == LEVELLED
    summary = convergence_summary(table)
    assert summary.startswith("2 of 6 coders had levelled off") and "2 were still falling" in summary
    assert "for 1 the batch-to-batch noise is larger than the trend" in summary
    assert "1 rose over the window" in summary and "2 not judged" in summary
    with pytest.raises(ValueError, match="window"):
        convergence_table(curves, trials, window=0)


def test_training_figure_and_curves_of_an_older_run_read_from_tunes_reports(tmp_path):
    # A run made before trials kept their training log: Tune's result.json, one report per checkpoint; a retried
    # trial reported step 200 twice, and its latest attempt's report counts.
    trial_dir = tmp_path / "tune" / "trial_a"
    (trial_dir / "checkpoint_000002").mkdir(parents=True)
    reports = [
        {"split": "train", "steps": 100, "tokens": 100, "fvu": 0.5, "l0": 8, "dead_fraction": 0.1, "lr": 1e-3},
        {"split": "train", "steps": 200, "tokens": 200, "fvu": 0.45, "l0": 8, "dead_fraction": 0.1, "lr": 1e-3},
        {"split": "train", "steps": 200, "tokens": 200, "fvu": 0.4, "l0": 8, "dead_fraction": 0.1, "lr": 1e-3},
        {"split": "heldout", "steps": 300, "fvu": 0.35, "dead_fraction": 0.2},
    ]
    (trial_dir / "result.json").write_text("\n".join(json.dumps(r) for r in reports) + "\n{cut sh")
    trials = pd.DataFrame(
        {
            "trial_id": ["a"],
            "status": ["finished"],
            "activation": ["topk"],
            "kind": ["sae"],
            "k": [8],
            "steps": [300],
            "fvu": [0.35],
            "dead_fraction": [0.2],
            "checkpoint": [str(trial_dir / "checkpoint_000002")],
        }
    )
    curves = training_curves(trials)
    assert curves["step"].tolist() == [100, 200] and curves["fvu"].tolist() == [0.5, 0.4]
    assert curves["interval_steps"].isna().all()
    assert convergence_table(curves, trials)["verdict"].tolist() == [TOO_FEW]
    # The figure draws the fine curves of a new run: two trials, 30 rows each.
    fine = pd.concat([curve("a", 0.9 * (STEPS / 10) ** -0.5), curve("b", np.full(len(STEPS), 0.2))])
    fine = fine.assign(dead_fraction=0.1, interval_steps=10)
    both = pd.concat([trials, trials.assign(trial_id="b", activation="binary_topk", k=16)])
    path = plots.training(fine, both, tmp_path / "training.png")
    assert path.exists() and path.stat().st_size > 10_000
    assert plots.training(curves.iloc[:0], trials, tmp_path / "none.png") is None
