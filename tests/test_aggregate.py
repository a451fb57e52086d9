"""Aggregation of per-latent scores on hand-built tables, checked against hand-computed numbers (§2, §3c)."""

import math

import numpy as np
import pandas as pd
import pytest

from bae_core.evaluation.aggregate import decile_scores, density, frequency_buckets, log_rate_histogram, score_summary


def table():
    rows = [
        # coder, hookpoint, score, firing count, eligible
        ("A", "h1", 0.9, 10, True),
        ("A", "h1", 0.5, 30, True),
        ("A", "h1", math.nan, 5, False),
        ("A", "h1", math.nan, 0, False),
        ("A", "h2", 0.8, 100, True),
        ("A", "h2", 0.6, 100, True),
        ("B", "h1", 0.7, 1, True),
        ("B", "h1", 0.3, 99, True),
    ]
    frame = pd.DataFrame(rows, columns=["coder_id", "hookpoint", "token_auroc", "firing_count", "eligible"])
    frame["firing_rate"] = frame["firing_count"] / 1000
    frame["shuffled_token_auroc"] = np.where(frame["eligible"], 0.5, np.nan)
    return frame


def test_frequency_weighting_on_a_hand_built_table():
    per_hook, overall = score_summary(table())
    a1 = per_hook[(per_hook.coder_id == "A") & (per_hook.hookpoint == "h1")].iloc[0]
    assert (a1.latents, a1.alive, a1.eligible) == (4, 3, 2) and a1.coverage == pytest.approx(2 / 3)
    assert a1.token_auroc == pytest.approx(0.7) and a1.token_auroc_weighted == pytest.approx((9 + 15) / 40)
    a, b = overall.set_index("coder_id").loc["A"], overall.set_index("coder_id").loc["B"]
    assert a.token_auroc == pytest.approx((0.9 + 0.5 + 0.8 + 0.6) / 4)  # over every eligible latent
    assert a.token_auroc_weighted == pytest.approx((0.6 + 0.7) / 2)  # per hookpoint, then the mean
    assert a.coverage == pytest.approx(4 / 5) and a.hookpoints == 2
    # B: unweighted 0.5, but its frequent latent scores 0.3, so weighting pulls it down.
    assert b.token_auroc == pytest.approx(0.5) and b.token_auroc_weighted == pytest.approx(0.304)
    assert a.shuffled_token_auroc == 0.5

    # Grouping by other columns (e.g. the coder's config across hookpoints) works the same way.
    frame = table().assign(family=lambda t: np.where(t.coder_id == "A", "binary", "continuous"))
    _, by_family = score_summary(frame, by=["family"])
    assert by_family.set_index("family").loc["binary", "token_auroc_weighted"] == pytest.approx(0.65)
    with pytest.raises(ValueError, match="missing column"):
        score_summary(table().drop(columns="firing_count"))


def test_frequency_buckets_and_histogram():
    frame = table()
    buckets = frequency_buckets(frame)
    a = buckets[buckets.coder_id == "A"].set_index("log10_rate_low")
    # Rates 0.01, 0.03, 0.005 are in [-3, -2) or [-2, -1); 0.1 twice in [-1, 0).
    assert a.loc[-3.0, "latents"] == 1 and a.loc[-3.0, "eligible"] == 0 and math.isnan(a.loc[-3.0, "token_auroc"])
    assert a.loc[-2.0, "latents"] == 2 and a.loc[-2.0, "token_auroc"] == pytest.approx(0.7)
    assert a.loc[-1.0, "latents"] == 2 and a.loc[-1.0, "token_auroc"] == pytest.approx(0.7)
    assert buckets.latents.sum() == int((frame.firing_count > 0).sum())  # dead latents left out

    hist = log_rate_histogram(frame, bins=7)
    a = hist[hist.coder_id == "A"]
    assert a.latents.sum() == 6 and a[a.log10_rate_low.isna()].latents.item() == 1  # the dead latent
    assert a[a.log10_rate_low == -1.0].latents.item() == 2


def test_decile_means_skip_latents_without_deciles():
    frame = pd.DataFrame(
        {
            "coder_id": ["A", "A", "A", "B"],
            "decile_token_auroc": [[0.5] * 9 + [1.0], [0.7] * 9 + [np.nan], None, None],
        }
    )
    deciles = decile_scores(frame)
    assert set(deciles.coder_id) == {"A"} and len(deciles) == 10
    assert deciles.iloc[0].token_auroc == pytest.approx(0.6) and deciles.iloc[0].latents == 2
    assert deciles.iloc[9].token_auroc == 1.0 and deciles.iloc[9].latents == 1


def test_density_counts():
    d = density(np.array([0.0, 0.0, 0.005, 0.02, 0.5]))
    assert (d["dead_latents"], d["frequent_latents"], d["dense_latents"]) == (2, 2, 1)
    assert d["dead_fraction"] == pytest.approx(0.4)
    with pytest.raises(ValueError, match="firing_rates"):
        density(np.array([]))
