"""The reconstruction-versus-interpretability frontier of a run's coders.

A coder is a point (reconstruction error, interpretability): lower error and higher interpretability are both
better. Within a group of coders, a point is on the Pareto frontier when no other point of the group is at least
as good on both axes and strictly better on one. Groups are the coder families (binary or continuous latents,
SAE or transcoder) and the whole run.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from bae_core.coders.config import BINARY_ACTIVATIONS

RECONSTRUCTION = ("fvu", "ce_increase")
"""Reconstruction error columns of `coders` (lower is better): held-out FVU and spliced CE increase (nats)."""
INTERPRETABILITY = ("token_auroc", "token_auroc_weighted")
"""Interpretability columns (higher is better): the unweighted and frequency-weighted mean token AUROC."""


def family(activation: str, kind: str) -> str:
    """'binary SAE', 'continuous transcoder', ...: the latents' kind and what the coder reconstructs."""
    latents = "binary" if activation in BINARY_ACTIVATIONS else "continuous"
    return f"{latents} {'SAE' if kind == 'sae' else 'transcoder'}"


def pareto_mask(error: np.ndarray, score: np.ndarray) -> np.ndarray:
    """True where (error, score) is not dominated: no other point has error <= and score >= with one of the two
    strict. Points with a NaN coordinate are never on the frontier (and dominate nothing); duplicates of a
    frontier point are all on it."""
    error, score = np.asarray(error, dtype=float), np.asarray(score, dtype=float)
    if error.shape != score.shape or error.ndim != 1:
        raise ValueError(f"error, score: need two 1-d arrays of one length, got {error.shape} and {score.shape}")
    ok = np.isfinite(error) & np.isfinite(score)
    e, s = error[ok], score[ok]
    better_or_equal = (e[None, :] <= e[:, None]) & (s[None, :] >= s[:, None])
    strictly = (e[None, :] < e[:, None]) | (s[None, :] > s[:, None])
    dominated = (better_or_equal & strictly).any(axis=1)
    mask = np.zeros(len(error), dtype=bool)
    mask[np.flatnonzero(ok)] = ~dominated
    return mask


def frontier_table(coders: pd.DataFrame) -> pd.DataFrame:
    """One row per (trained coder, reconstruction metric, interpretability metric, group), long format:
    `coder_id`, `trial_id`, `family`, `activation`, `kind`, `hookpoint`, `k`, `group` (a family or 'all'),
    `reconstruction_metric`, `reconstruction`, `interpretability_metric`, `interpretability`, `on_frontier`.
    Metrics missing from `coders` are left out; the neuron baseline (no trial) is not a coder and is left out."""
    trained = coders[coders["trial_id"].notna()].copy()
    if trained.empty:
        return pd.DataFrame()
    trained["family"] = [family(a, k) for a, k in zip(trained["activation"], trained["kind"], strict=True)]
    rows = []
    for x in (m for m in RECONSTRUCTION if m in trained.columns):
        for y in (m for m in INTERPRETABILITY if m in trained.columns):
            for group, members in [("all", trained), *trained.groupby("family", sort=True)]:
                mask = pareto_mask(members[x].to_numpy(dtype=float), members[y].to_numpy(dtype=float))
                labels = ["coder_id", "trial_id", "family", "activation", "kind", "hookpoint", "k", "l0_heldout"]
                part = members[[c for c in labels if c in members.columns]].copy()
                part["group"] = group
                part["reconstruction_metric"], part["reconstruction"] = x, members[x].to_numpy(dtype=float)
                part["interpretability_metric"], part["interpretability"] = y, members[y].to_numpy(dtype=float)
                part["on_frontier"] = mask
                rows.append(part)
    return pd.concat(rows, ignore_index=True)
