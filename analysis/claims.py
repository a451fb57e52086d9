"""The paper's claims (evaluation.md §6), checked on a run's own numbers.

Each claim compares binary and continuous coders (or transcoders and SAEs) *at matched settings*: the pairs of
trained coders that differ only in the compared property (same hookpoint, kind, k, dictionary size and seed).
A claim "agrees" when every matched pair points the paper's way, "disagrees" when none does, "mixed" otherwise,
and "not measured" when the run has no matched pair or lacks the numbers. The table says which numbers it used.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from bae_core.config import BINARY_ACTIVATIONS
from bae_core.metrics import FREQUENT_RATE

MATCH = ("hookpoint", "kind", "k", "num_latents", "seed")
"""What two coders must share to be compared as binary vs continuous."""
AGREES, DISAGREES, MIXED, NOT_MEASURED = "agrees", "disagrees", "mixed", "not measured"


def _pairs(coders: pd.DataFrame, split: str, match: tuple[str, ...]) -> pd.DataFrame:
    """Rows of matched pairs: columns `<metric>_a` and `<metric>_b` where a/b are the two sides of `split`."""
    trained = coders[coders["trial_id"].notna()].copy()
    if split == "binary":
        trained["_side"] = np.where(trained["activation"].isin(BINARY_ACTIVATIONS), "a", "b")
    else:  # transcoder (a) vs sae (b) with the same activation
        trained["_side"] = np.where(trained["kind"] == "sae", "b", "a")
    keys = [c for c in match if c in trained.columns]
    a = trained[trained["_side"] == "a"].drop(columns="_side")
    b = trained[trained["_side"] == "b"].drop(columns="_side")
    return a.merge(b, on=keys, suffixes=("_a", "_b"))


def _verdict(holds: list[bool]) -> str:
    if not holds:
        return NOT_MEASURED
    if all(holds):
        return AGREES
    return DISAGREES if not any(holds) else MIXED


def _fmt(values: pd.Series) -> str:
    return ", ".join(f"{v:.3f}" for v in values)


def _frequent_scores(latents: pd.DataFrame | None, coder_ids: list[str]) -> dict[str, tuple[float, float]]:
    """Per coder: mean token AUROC of its eligible latents firing on > 1% of tokens, and of the others."""
    out = {}
    if latents is None or "token_auroc" not in latents.columns:
        return out
    for coder_id in coder_ids:
        g = latents[(latents["coder_id"] == coder_id) & latents["eligible"].astype(bool)]
        frequent = g["firing_rate"] > FREQUENT_RATE
        out[coder_id] = (
            float(g.loc[frequent, "token_auroc"].mean()) if frequent.any() else math.nan,
            float(g.loc[~frequent, "token_auroc"].mean()) if (~frequent).any() else math.nan,
        )
    return out


def claims_table(coders: pd.DataFrame, latents: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per claim of evaluation.md §6: `claim`, `paper`, `measured` (the numbers, pair by pair),
    `pairs`, `pairs_agreeing`, `verdict` (agrees / disagrees / mixed / not measured)."""
    rows = []
    pairs = _pairs(coders, "binary", MATCH)

    def add(claim: str, paper: str, holds: list[bool], measured: str) -> None:
        rows.append(
            {
                "claim": claim,
                "paper": paper,
                "measured": measured if holds else "no matched pair with these numbers",
                "pairs": len(holds),
                "pairs_agreeing": int(sum(holds)),
                "verdict": _verdict(holds),
            }
        )

    def have(*columns: str) -> pd.DataFrame:
        need = [f"{c}_{s}" for c in columns for s in "ab"]
        if pairs.empty or not set(need) <= set(pairs.columns):
            return pd.DataFrame(columns=sorted({*pairs.columns, *need, "coder_id_a"}))
        return pairs.dropna(subset=need)

    p = have("token_auroc")
    add(
        "1. binary coders are more interpretable, unweighted",
        "binary > continuous, mean score over latents",
        list(p["token_auroc_a"] > p["token_auroc_b"]),
        f"binary {_fmt(p['token_auroc_a'])} vs continuous {_fmt(p['token_auroc_b'])} (mean token AUROC)",
    )
    p = have("fvu", "ce_increase")
    add(
        "2. binary coders reconstruct worse",
        "binary has higher FVU and larger spliced CE increase",
        list((p["fvu_a"] > p["fvu_b"]) & (p["ce_increase_a"] > p["ce_increase_b"])),
        f"FVU binary {_fmt(p['fvu_a'])} vs continuous {_fmt(p['fvu_b'])}; CE increase binary "
        f"{_fmt(p['ce_increase_a'])} vs continuous {_fmt(p['ce_increase_b'])} nats",
    )
    p = have("frequent_fraction")
    scores = _frequent_scores(latents, list(p["coder_id_a"])) if len(p) else {}
    holds, notes = [], []
    for r in p.itertuples():
        frequent, others = scores.get(r.coder_id_a, (math.nan, math.nan))
        more = r.frequent_fraction_a > r.frequent_fraction_b
        low = not (frequent >= others)  # NaN (no frequent latent scored) does not count against "score low"
        holds.append(bool(more and low))
        scored = (
            f"binary ones score {frequent:.3f} vs {others:.3f} for the rest"
            if math.isfinite(frequent)
            else "none of the binary ones was scored"
        )
        notes.append(
            f"> 1% latents {r.frequent_fraction_a:.3f} vs {r.frequent_fraction_b:.3f} of the dictionary; {scored}"
        )
    add(
        "3. binary coders have more ultra-high-frequency latents, and those score low",
        "more latents firing on > 1% of tokens; they score below the coder's other latents",
        holds,
        "; ".join(notes),
    )
    p = have("token_auroc_weighted", "token_auroc")
    flips = list(
        (p["token_auroc_weighted_b"] > p["token_auroc_weighted_a"]) & (p["token_auroc_a"] > p["token_auroc_b"])
    )
    add(
        "4. frequency-weighted, continuous coders score higher (the ranking flips)",
        "continuous > binary once weighted by firing count, although binary > continuous unweighted",
        flips,
        f"weighted: binary {_fmt(p['token_auroc_weighted_a'])} vs continuous {_fmt(p['token_auroc_weighted_b'])}",
    )
    tc = _pairs(coders, "kind", ("hookpoint", "activation", "k", "num_latents", "seed"))
    need = {f"{c}_{s}" for c in ("token_auroc", "fvu") for s in "ab"}
    if tc.empty or not need <= set(tc.columns):
        tc = pd.DataFrame(columns=sorted(need))
    tc = tc.dropna(subset=sorted(need))
    add(
        "5. transcoders are more interpretable than SAEs at similar reconstruction",
        "transcoder > SAE in score, at FVU no worse (companion paper)",
        list((tc["token_auroc_a"] > tc["token_auroc_b"]) & (tc["fvu_a"] <= tc["fvu_b"] * 1.1)),
        f"score transcoder {_fmt(tc['token_auroc_a'])} vs SAE {_fmt(tc['token_auroc_b'])}; FVU transcoder "
        f"{_fmt(tc['fvu_a'])} vs SAE {_fmt(tc['fvu_b'])} (similar: within 10%)",
    )
    return pd.DataFrame(rows)
