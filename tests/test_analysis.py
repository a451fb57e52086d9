"""analysis: the Pareto frontier on hand-made tables, and the claims table on constructed coders."""

import math

import numpy as np
import pandas as pd
import pytest

from analysis import claims_table, family, frontier_table, pareto_mask
from analysis.claims import AGREES, DISAGREES, MIXED, NOT_MEASURED


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


def pair(binary, continuous, *, kind="sae", k=16):
    """Two matched coders; each side is (fvu, ce_increase, auroc, auroc_weighted, frequent_fraction)."""
    rows = []
    for activation, values in (("binary_topk", binary), ("topk", continuous)):
        coder_id = f"{activation}-{kind}-{k}"
        rows.append((coder_id, coder_id, activation, kind, "h", k, 100, 0, *values))
    return rows


def verdicts(coders, latents=None) -> dict[int, str]:
    table = claims_table(coders, latents)
    return {int(c.split(".")[0]): v for c, v in zip(table["claim"], table["verdict"], strict=True)}


def test_claims_agree_when_the_numbers_follow_the_paper():
    coders = coders_table(
        # binary: worse FVU and CE, better unweighted, worse weighted, more frequent latents
        pair((0.30, 0.50, 0.80, 0.60, 0.08), (0.10, 0.20, 0.70, 0.70, 0.01))
        + pair((0.25, 0.40, 0.85, 0.65, 0.06), (0.08, 0.15, 0.75, 0.72, 0.01), kind="skip_transcoder")
    )
    # Binary latents firing on > 1% of tokens score low.
    latents = pd.DataFrame(
        {
            "coder_id": ["binary_topk-sae-16"] * 2 + ["binary_topk-skip_transcoder-16"] * 2,
            "eligible": True,
            "firing_rate": [0.05, 0.001] * 2,
            "token_auroc": [0.55, 0.9] * 2,
        }
    )
    assert verdicts(coders, latents) == {1: AGREES, 2: AGREES, 3: AGREES, 4: AGREES, 5: AGREES}
    table = claims_table(coders, latents)
    assert "binary 0.800, 0.850 vs continuous 0.700, 0.750" in table.loc[0, "measured"]
    assert (table["pairs"] == 2).all()


def test_claims_disagree_or_are_mixed_when_the_numbers_do_not():
    coders = coders_table(
        # binary: better reconstruction, less interpretable, fewer frequent latents
        pair((0.05, 0.10, 0.60, 0.75, 0.00), (0.10, 0.20, 0.70, 0.70, 0.02))
        # a second k where binary is more interpretable: claim 1 is mixed
        + pair((0.05, 0.10, 0.90, 0.80, 0.00), (0.10, 0.20, 0.70, 0.70, 0.02), k=32)
        # SAE more interpretable than the transcoder of the same activation and k
        + [("tc", "tc", "topk", "skip_transcoder", "h", 16, 100, 0, 0.10, 0.20, 0.50, 0.50, 0.01)]
    )
    v = verdicts(coders)
    assert v[1] == MIXED and v[2] == DISAGREES and v[3] == DISAGREES and v[4] == DISAGREES and v[5] == DISAGREES


def test_claims_without_matched_pairs_are_not_measured():
    coders = coders_table([("c", "c", "topk", "sae", "h", 16, 100, 0, 0.1, 0.2, 0.7, 0.7, 0.01)])
    table = claims_table(coders)
    assert set(table["verdict"]) == {NOT_MEASURED} and (table["pairs"] == 0).all()
    assert not math.isnan(table["pairs"].sum())
