"""The claims table and the intervals behind it, on constructed coders and latents with known answers: a verdict
follows the interval of the paired difference, never the point estimate alone."""

import math
import zlib

import numpy as np
import pandas as pd
import pytest

from analysis.claims import AGREES, DISAGREES, INCONCLUSIVE, NOT_MEASURED, claims_table
from bae_core.evaluation.aggregate import MIN_TEST_WINDOWS, across_seeds, bootstrap_replicates, interval, score_basis

COLUMNS = ["coder_id", "trial_id", "activation", "kind", "hookpoint", "k", "num_latents", "seed"]


def latent_rows(
    coder_id, n, auroc, spread, *, frequent=0.05, frequent_auroc=None, seed=0, windows=50, frequent_rate=0.15
):
    """`n` eligible latents of one coder with token AUROCs ~ N(auroc, spread); a share `frequent` of them fire on
    `frequent_rate` of tokens (above both cuts, 1% and 10%; scoring `frequent_auroc` when given), the others on
    0.1%."""
    rng = np.random.default_rng(seed)
    is_frequent = np.arange(n) < round(frequent * n)
    scores = np.clip(rng.normal(auroc, spread, n), 0, 1)
    if frequent_auroc is not None:
        scores[is_frequent] = np.clip(rng.normal(frequent_auroc, spread, is_frequent.sum()), 0, 1)
    rate = np.where(is_frequent, frequent_rate, 0.001)
    return pd.DataFrame(
        {
            "coder_id": coder_id,
            "hookpoint": "h",
            "latent": np.arange(n),
            "firing_rate": rate,
            "firing_count": (rate * 100_000).astype(int),
            "eligible": True,
            "token_auroc": scores,
            "test_activating_windows": windows,
            "test_nonactivating_windows": windows,
        }
    )


def make_run(settings, *, n=400, spread=0.1, seeds=(0,), rates=None):
    """Coders and latents: `settings` maps (activation, kind, k) to (fvu, ce_increase, auroc, frequent share,
    auroc of the frequent latents or None); each setting is trained with every seed (FVU jittered by seed)."""
    coders, latents = [], []
    for (activation, kind, k), (fvu, ce, auroc, frequent, frequent_auroc) in settings.items():
        for seed in seeds:
            coder_id = f"{activation}-{kind}-{k}-s{seed}"
            rows = latent_rows(
                coder_id,
                n,
                auroc,
                spread,
                frequent=frequent,
                frequent_auroc=frequent_auroc,
                seed=zlib.crc32(coder_id.encode()) % 97,  # hash() of a str changes with every process
                **({"frequent_rate": rates[(activation, kind, k)]} if rates else {}),
            )
            latents.append(rows)
            weighted = float((rows["token_auroc"] * rows["firing_count"]).sum() / rows["firing_count"].sum())
            jitter = 1 + 0.02 * (seed - 1)
            coders.append(
                {
                    **dict(zip(COLUMNS, (coder_id, coder_id, activation, kind, "h", k, 1000, seed), strict=True)),
                    "fvu": fvu * jitter,
                    "ce_increase": ce * jitter,
                    "token_auroc": float(rows["token_auroc"].mean()),
                    "token_auroc_weighted": weighted,
                    "frequent_fraction": float((rows["firing_rate"] > 0.01).mean()),
                    "dense_fraction": float((rows["firing_rate"] > 0.10).mean()),
                    "l0_heldout": (0.85 if activation.startswith("binary") else 1.0) * k,
                }
            )
    return pd.DataFrame(coders), pd.concat(latents, ignore_index=True)


def verdicts(table) -> dict[int, str]:
    return {int(c.split(".")[0]): v for c, v in zip(table["claim"], table["verdict"], strict=True)}


# Binary: worse reconstruction, better unweighted, more frequent latents that score low (so worse weighted).
PAPER = {
    ("binary_topk", "sae", 16): (0.40, 0.10, 0.80, 0.20, 0.55),
    ("topk", "sae", 16): (0.15, 0.04, 0.72, 0.02, None),
    ("binary_topk", "skip_transcoder", 16): (0.30, 0.08, 0.84, 0.20, 0.55),
    ("topk", "skip_transcoder", 16): (0.10, 0.02, 0.76, 0.02, None),
}


def test_claims_agree_only_where_the_intervals_say_so():
    coders, latents = make_run(PAPER, seeds=(0, 1, 2))
    table = claims_table(coders, latents)
    assert verdicts(table) == {1: AGREES, 2: AGREES, 3: AGREES, 4: AGREES, 5: AGREES}
    first = table.iloc[0]
    # The estimate is the mean paired difference (binary - continuous), inside its CI.
    binary = coders["activation"] == "binary_topk"
    expected = coders.loc[binary, "token_auroc"].mean() - coders.loc[~binary, "token_auroc"].mean()
    assert first["estimate"] == pytest.approx(expected)
    assert first["ci_low"] < first["estimate"] < first["ci_high"] and first["ci_low"] > 0
    assert first["pairs"] == 6 and first["seeds"] == 3 and "95% CI" in first["measured"]
    # Binary top-k fires fewer latents than k here (L0 13.6 vs 16): every comparison says so.
    assert "held-out L0 binary vs continuous: 13.6 vs 16.0" in first["sparsity"]
    assert "sparsity differs in 6 of 6 pairs (-15%" in first["sparsity"]


def test_a_per_coder_number_from_one_seed_has_no_interval_and_is_inconclusive():
    coders, latents = make_run(PAPER, seeds=(0,))
    table = claims_table(coders, latents)
    v = verdicts(table)
    # Scores rest on 400 latents per coder: intervals exist. FVU and CE rest on one coder per setting.
    assert v[4] == AGREES and v[2] == INCONCLUSIVE
    assert "no interval: one seed per setting" in table.loc[1, "measured"] and math.isnan(table.loc[1, "ci_low"])


def test_small_differences_are_inconclusive_and_reversed_ones_disagree():
    close = {
        ("binary_topk", "sae", 16): (0.12, 0.03, 0.730, 0.02, None),  # better reconstruction than continuous
        ("topk", "sae", 16): (0.15, 0.04, 0.725, 0.02, None),  # within noise of binary on score
    }
    coders, latents = make_run(close, n=60, spread=0.15, seeds=(0, 1, 2))
    v = verdicts(claims_table(coders, latents))
    assert v[1] == INCONCLUSIVE and v[2] == DISAGREES
    # No frequent latent ranks apart from the rest and no transcoder: not measured, never "agrees".
    assert v[5] == NOT_MEASURED


def test_claims_whose_numbers_are_missing_are_not_measured():
    coders, latents = make_run(PAPER, seeds=(0,))
    # Without the latents table nothing says how the frequent latents score: claim 3 is not measured.
    v = verdicts(claims_table(coders, None))
    assert v[3] == NOT_MEASURED
    # Without any frequent latent among a binary coder's eligible ones, likewise.
    quiet = latents.assign(firing_rate=0.001)
    assert verdicts(claims_table(coders, quiet))[3] == NOT_MEASURED
    lone = coders.iloc[[0]]
    assert set(claims_table(lone, latents)["verdict"]) == {NOT_MEASURED}


def test_bootstrap_intervals_and_the_basis_of_a_coder_score():
    rows = latent_rows("c", 400, 0.7, 0.1)
    mean = rows["token_auroc"].mean()
    low, high = interval(bootstrap_replicates(rows, "mean"))
    # The standard error of a mean of 400 values of sd 0.1 is 0.005: a 95% interval about +-0.01 wide.
    assert low < mean < high and high - low == pytest.approx(4 * 0.1 / 20, rel=0.25)
    small = latent_rows("c", 25, 0.7, 0.1, windows=8)
    s_low, s_high = interval(bootstrap_replicates(small, "mean"))
    assert s_high - s_low > 2.5 * (high - low)
    weighted = (rows["token_auroc"] * rows["firing_count"]).sum() / rows["firing_count"].sum()
    w_low, w_high = interval(bootstrap_replicates(rows, "weighted"))
    assert w_low < weighted < w_high
    basis = score_basis(rows)
    assert basis["eligible"] == 400 and basis["test_windows_median"] == 50 and not basis["underpowered"]
    assert basis["token_auroc_ci_low"] == pytest.approx(low) and basis["token_auroc_weighted_ci_high"] > weighted
    assert score_basis(small)["underpowered"] and MIN_TEST_WINDOWS > 8


def test_spread_over_seeds():
    coders, _ = make_run(PAPER, seeds=(0, 1, 2))
    table = across_seeds(coders, ["fvu"], ["activation", "kind", "k"])
    row = table[(table["activation"] == "topk") & (table["kind"] == "sae")].iloc[0]
    assert row["seeds"] == 3 and row["fvu_mean"] == pytest.approx(0.15)
    assert row["fvu_std"] == pytest.approx(0.15 * 0.02)


def test_controls_that_miss_their_known_answers_are_named():
    from analysis.controls import control_checks, missed_controls

    coders = pd.DataFrame(
        {
            "coder_id": ["trial-a", "token-control-h", "random-control-h"],
            "trial_id": ["a", None, None],
            "dictionary": ["topk sae", "token_control", "random_control"],
            "token_auroc": [0.7, 0.99, 0.51],
            "shuffled_token_auroc": [0.5, 0.5, 0.5],
            "eligible": [100, 32, 30],
        }
    )
    checks = control_checks(coders)
    assert checks["control"].tolist() == ["shuffled control", "token control", "random control"]
    assert checks["ok"].all() and missed_controls(checks) == ""
    broken = coders.assign(token_auroc=[0.7, 0.80, 0.62], shuffled_token_auroc=[0.58, 0.5, 0.5])
    warning = missed_controls(control_checks(broken))
    assert warning.startswith("3 of 3 controls missed their expected values")
    assert "token control of token-control-h: 0.800, expected >= 0.95" in warning
    assert "shuffled control of trial-a: 0.580" in warning
    assert "No control was scored" in missed_controls(control_checks(coders.iloc[:0]))


def test_across_seeds_the_interval_is_a_t_interval_not_the_range_of_three_seeds():
    coders, latents = make_run(PAPER, seeds=(0, 1, 2))
    binary = coders["activation"] == "binary_topk"
    # FVU differences that share a sign on all three seeds but scatter widely: a percentile bootstrap over 3
    # seeds would span only their range; the t-interval (pooled over the 2 settings, 4 degrees of freedom) does
    # not exclude zero.
    noise = np.tile([0.0, -0.19, 0.30], 4)
    fvu = coders["fvu"].to_numpy() + np.where(binary, noise, 0)
    coders = coders.assign(fvu=fvu)
    table = claims_table(coders, latents)
    row = table.iloc[1]
    assert row["verdict"] == INCONCLUSIVE and row["ci_low"] < 0 < row["ci_high"] and row["seeds"] == 3
    assert "across seeds" in row["measured"]


def test_underpowered_coders_and_untested_firing_make_a_claim_inconclusive():
    coders, latents = make_run(PAPER, seeds=(0, 1, 2))
    assert verdicts(claims_table(coders, latents))[1] == AGREES
    weak = coders.assign(underpowered=coders["activation"] == "binary_topk")
    table = claims_table(weak, latents)
    assert (
        table.loc[0, "verdict"] == INCONCLUSIVE
        and "6 of 12 compared coders are underpowered" in table.loc[0, "measured"]
    )
    assert table.loc[1, "verdict"] == AGREES  # FVU and CE do not rest on test windows
    thin = coders.assign(eligible_firing_share=0.3)
    table = claims_table(thin, latents)
    assert (
        table.loc[3, "verdict"] == INCONCLUSIVE and "as little as 30% of a coder's firing" in table.loc[3, "measured"]
    )
    assert table.loc[0, "verdict"] == AGREES  # the unweighted mean does not claim to cover the firing


def test_ultra_high_frequency_must_hold_at_both_cuts():
    # Continuous coders: many latents just above 1% (5%); binary ones: fewer above 1%, but those above 10%.
    # The share above 1% says binary has fewer, the share above 10% says more: the verdict depends on the cut.
    settings = {
        ("binary_topk", "sae", 16): (0.40, 0.10, 0.80, 0.05, 0.55),
        ("topk", "sae", 16): (0.15, 0.04, 0.72, 0.20, None),
        ("binary_topk", "skip_transcoder", 16): (0.30, 0.08, 0.84, 0.05, 0.55),
        ("topk", "skip_transcoder", 16): (0.10, 0.02, 0.76, 0.20, None),
    }
    rates = {setting: 0.15 if setting[0].startswith("binary") else 0.05 for setting in settings}
    coders, latents = make_run(settings, seeds=(0, 1, 2), rates=rates)
    row = claims_table(coders, latents).set_index(claims_table(coders, latents)["claim"].str[:1]).loc["3"]
    assert row["verdict"] == INCONCLUSIVE
    assert "share of latents > 1%, binary - continuous: -0.150" in row["measured"]
    assert "share of latents > 10%, binary - continuous: +0.050" in row["measured"]
    assert "the two cuts point different ways" in row["measured"]
    # Where both cuts agree, they decide: the paper-like run agrees (test above), and with binary coders that
    # have fewer latents above both cuts the claim disagrees.
    fewer = {s: (v[0], v[1], v[2], 0.02 if s[0].startswith("binary") else 0.20, v[4]) for s, v in settings.items()}
    coders, latents = make_run(fewer, seeds=(0, 1, 2))
    assert verdicts(claims_table(coders, latents))[3] == DISAGREES
