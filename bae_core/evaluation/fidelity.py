"""Spliced-model fidelity and ablation by interpretability (evaluation.md §1 and §5).

    held-out token sequences
      -> one clean forward, one with the hookpoint zero-ablated, one per coder with the coder spliced in
         (and, for §5, one per bin of latents zero-ablated inside the spliced coder)
      -> next-token CE, top-1 accuracy and KL(clean || variant), accumulated exactly over every predicted token

Every variant of a batch runs right after the clean forward of that batch, so the clean logits are never stored.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from bae_core.coders.coder import SparseCoder
from bae_core.data.hooks import splice, zero_ablate
from bae_core.data.lm import Hookpoint, LoadedModel

CLEAN = "clean"
ZERO_ABLATED = "zero_ablated"


@dataclass
class TokenStats:
    """Next-token statistics of one model variant, summed over predicted tokens."""

    tokens: int = 0
    ce_sum: float = 0.0
    correct: int = 0
    kl_sum: float = 0.0
    """Sum of KL(clean || this variant) in nats (0 for the clean model itself)."""

    @property
    def ce(self) -> float:
        return self.ce_sum / self.tokens if self.tokens else math.nan

    @property
    def top1(self) -> float:
        return self.correct / self.tokens if self.tokens else math.nan

    @property
    def kl(self) -> float:
        return self.kl_sum / self.tokens if self.tokens else math.nan


@torch.no_grad()
def next_token_stats(
    loaded: LoadedModel,
    token_ids: Tensor | np.ndarray,
    variants: Mapping[str, Callable[[], AbstractContextManager]],
    *,
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, TokenStats]:
    """CE, top-1 accuracy and KL to the clean model of the clean model and of each variant on `token_ids`
    (sequences x seq_len, every position a real token). A variant is a factory of the context manager that
    changes the model (e.g. `lambda: splice(loaded, hook, coder)`). Each sequence predicts its tokens 1..n-1."""
    token_ids = torch.as_tensor(np.asarray(token_ids), dtype=torch.long)
    if token_ids.ndim != 2 or token_ids.shape[1] < 2:
        raise ValueError(f"token_ids: need (sequences, seq_len >= 2) token ids, got shape {tuple(token_ids.shape)}")
    if CLEAN in variants:
        raise ValueError(f"variants: {CLEAN!r} is the unchanged model and is always measured; rename that variant")
    device = next(loaded.model.parameters()).device
    stats = {name: TokenStats() for name in [CLEAN, *variants]}
    for start in range(0, len(token_ids), batch_size):
        batch = token_ids[start : start + batch_size].to(device)
        targets = batch[:, 1:].reshape(-1)
        clean = _log_probs(loaded, batch, nullcontext)
        if not torch.isfinite(clean).all():
            raise ValueError(f"model: the clean forward gave non-finite logits on sequences {start}..")
        p_clean = clean.exp()
        for name, make in [(CLEAN, None), *variants.items()]:
            logp = clean if make is None else _log_probs(loaded, batch, make)
            s = stats[name]
            s.tokens += targets.numel()
            s.ce_sum += float(-logp.gather(1, targets[:, None]).double().sum())
            s.correct += int((logp.argmax(-1) == targets).sum())
            if make is not None:
                s.kl_sum += float((p_clean * (clean - logp)).sum(-1).double().sum())
        if progress is not None:
            progress(min(start + batch_size, len(token_ids)), len(token_ids))
    return stats


def _log_probs(loaded: LoadedModel, batch: Tensor, make) -> Tensor:
    with make():
        logits = loaded.model(batch).logits[:, :-1]
    return F.log_softmax(logits.float().reshape(-1, logits.shape[-1]), dim=-1)


@dataclass(frozen=True)
class Fidelity:
    """How well the model runs with a coder spliced in at one hookpoint (evaluation.md §1)."""

    tokens: int
    ce_clean: float
    ce_spliced: float
    ce_zero_ablated: float
    top1_clean: float
    top1_spliced: float
    kl: float
    """Mean KL(clean || spliced) per predicted token, in nats."""

    @property
    def ce_increase(self) -> float:
        return self.ce_spliced - self.ce_clean

    @property
    def ce_increase_relative(self) -> float:
        return self.ce_increase / self.ce_clean

    @property
    def top1_drop(self) -> float:
        return self.top1_clean - self.top1_spliced

    @property
    def loss_recovered(self) -> float:
        """(CE_zero_ablated - CE_spliced) / (CE_zero_ablated - CE_clean): 1 for a perfect coder, 0 for one no
        better than removing the module's output."""
        gap = self.ce_zero_ablated - self.ce_clean
        return (self.ce_zero_ablated - self.ce_spliced) / gap if gap else math.nan

    def summary(self) -> dict[str, float | int]:
        return {
            **{f"fidelity_{k}" if k == "tokens" else k: v for k, v in asdict(self).items()},
            "ce_increase": self.ce_increase,
            "ce_increase_relative": self.ce_increase_relative,
            "top1_drop": self.top1_drop,
            "loss_recovered": self.loss_recovered,
        }


def spliced_fidelity(
    loaded: LoadedModel,
    hookpoint: Hookpoint,
    coders: Mapping[str, SparseCoder],
    token_ids: Tensor | np.ndarray,
    *,
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Fidelity]:
    """The fidelity of each coder at `hookpoint` on `token_ids`, sharing one clean and one zero-ablated forward."""
    if ZERO_ABLATED in coders:
        raise ValueError(f"coders: {ZERO_ABLATED!r} is reserved for the zero-ablated model; rename that coder")
    variants = {ZERO_ABLATED: lambda: zero_ablate(loaded, hookpoint)}
    for name, coder in coders.items():
        variants[name] = lambda coder=coder: splice(loaded, hookpoint, coder)
    stats = next_token_stats(loaded, token_ids, variants, batch_size=batch_size, progress=progress)
    return {name: _fidelity(stats, name) for name in coders}


def _fidelity(stats: Mapping[str, TokenStats], name: str) -> Fidelity:
    """The Fidelity of variant `name` from statistics that include the clean and the zero-ablated model."""
    clean = stats[CLEAN]
    return Fidelity(
        tokens=clean.tokens,
        ce_clean=clean.ce,
        ce_spliced=stats[name].ce,
        ce_zero_ablated=stats[ZERO_ABLATED].ce,
        top1_clean=clean.top1,
        top1_spliced=stats[name].top1,
        kl=stats[name].kl,
    )


# ---- ablation by interpretability (§5) ---------------------------------------------------------------------------


def equal_mass_bins(scores: np.ndarray, firing_counts: np.ndarray, bins: int) -> np.ndarray:
    """Bin index (0 = lowest scores) of each latent: latents sorted by score and cut into `bins` bins of about
    equal total firing count. Latents without a score (NaN) or that never fire get -1. A latent is never split, so
    one very frequent latent can fill a bin on its own (and leave a later bin empty)."""
    scores = np.asarray(scores, dtype=np.float64)
    counts = np.asarray(firing_counts, dtype=np.float64)
    if scores.shape != counts.shape or scores.ndim != 1:
        raise ValueError(
            f"scores, firing_counts: need two 1-d arrays of one length, got {scores.shape} and {counts.shape}"
        )
    if bins < 1:
        raise ValueError(f"bins: must be >= 1, got {bins}")
    out = np.full(len(scores), -1, dtype=np.int64)
    ranked = np.flatnonzero(np.isfinite(scores) & (counts > 0))
    if len(ranked) == 0:
        return out
    ranked = ranked[np.argsort(scores[ranked], kind="stable")]
    mass = counts[ranked]
    # A latent belongs to the bin that holds the middle of its firing mass.
    middle = (np.cumsum(mass) - mass / 2) / mass.sum()
    out[ranked] = np.minimum((middle * bins).astype(np.int64), bins - 1)
    return out


def ablation_by_score(
    loaded: LoadedModel,
    hookpoint: Hookpoint,
    coder: SparseCoder,
    token_ids: Tensor | np.ndarray,
    scores: np.ndarray,
    firing_counts: np.ndarray,
    *,
    bins: int = 5,
    batch_size: int = 8,
) -> list[dict]:
    """One row per bin of `equal_mass_bins`: its latents, firing count, mean score and the CE of the spliced
    model with the bin's latents zero-ablated inside the coder, against the spliced model with all latents
    (relative loss increase = (CE_ablated - CE_spliced) / CE_spliced)."""
    if bins < 1:
        raise ValueError(f"bins: must be >= 1, got {bins}")
    _, rows = fidelity_and_ablation(
        loaded, hookpoint, coder, token_ids, scores, firing_counts, bins=bins, batch_size=batch_size, zero=False
    )
    return rows


def fidelity_and_ablation(
    loaded: LoadedModel,
    hookpoint: Hookpoint,
    coder: SparseCoder,
    token_ids: Tensor | np.ndarray,
    scores: np.ndarray | None,
    firing_counts: np.ndarray | None,
    *,
    bins: int = 5,
    batch_size: int = 8,
    zero: bool = True,
) -> tuple[Fidelity | None, list[dict]]:
    """`spliced_fidelity` of one coder and its `ablation_by_score` from one pass over `token_ids`: the clean and
    spliced forwards of each batch serve both, so the two cost 2 + bins forwards per batch (plus the
    zero-ablated one when `zero`) instead of 5 + bins. The numbers equal those of the two functions apart.
    Without `scores` (or with `bins` 0) there is no ablation; without `zero` no Fidelity."""
    ablate = scores is not None and bins > 0
    if ablate:
        if firing_counts is None:
            raise ValueError("firing_counts: needed with scores, one count per latent")
        if len(scores) != coder.num_latents:
            raise ValueError(f"scores: need one score per latent ({coder.num_latents}), got {len(scores)}")
        assignment = equal_mass_bins(scores, firing_counts, bins)
        present = [b for b in range(bins) if (assignment == b).any()]
    else:
        assignment, present = None, []
    variants = {}
    if zero:
        variants[ZERO_ABLATED] = lambda: zero_ablate(loaded, hookpoint)
    variants["spliced"] = lambda: splice(loaded, hookpoint, coder)
    for b in present:
        mask = torch.from_numpy(assignment == b)
        variants[f"bin{b}"] = lambda mask=mask: splice(loaded, hookpoint, coder, ablate=mask)
    stats = next_token_stats(loaded, token_ids, variants, batch_size=batch_size)
    fidelity = _fidelity(stats, "spliced") if zero else None
    spliced = stats["spliced"].ce
    rows = []
    for b in present:
        members = assignment == b
        ce = stats[f"bin{b}"].ce
        rows.append(
            {
                "bin": b,
                "latents": int(members.sum()),
                "firing_count": int(np.asarray(firing_counts)[members].sum()),
                "mean_score": float(np.asarray(scores)[members].mean()),
                "min_score": float(np.asarray(scores)[members].min()),
                "max_score": float(np.asarray(scores)[members].max()),
                "ce_spliced": spliced,
                "ce_ablated": ce,
                "ce_increase": ce - spliced,
                "relative_ce_increase": (ce - spliced) / spliced,
                "tokens": stats["spliced"].tokens,
            }
        )
    return fidelity, rows
