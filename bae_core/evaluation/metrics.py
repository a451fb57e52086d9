"""Reconstruction and density of a trained coder on evaluation tokens (evaluation.md §1-§2).

`evaluate_coder` streams batches once and accumulates exact totals, so the FVU is the held-out
FVU over every evaluation token (not a mean of per-batch FVUs) and firing rates count every token.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from bae_core.coders.coder import SparseCoder

DENSE_RATE = 0.10
"""A latent firing on more than this fraction of tokens is dense (the common literature cut)."""
FREQUENT_RATE = 0.01
"""Ultra-high-frequency cut the paper's authors looked at (>= 1%)."""


@dataclass
class CoderEvaluation:
    """Held-out numbers of one coder; `firing_rates` is per latent."""

    tokens: int
    fvu: float
    l0: float
    dead_fraction: float
    frequent_fraction: float
    dense_fraction: float
    firing_rates: np.ndarray = field(repr=False)

    def summary(self) -> dict[str, float | int]:
        """Scalar metrics, e.g. for a sweep report or a table row."""
        return {
            "fvu": self.fvu,
            "l0": self.l0,
            "dead_fraction": self.dead_fraction,
            "frequent_fraction": self.frequent_fraction,
            "dense_fraction": self.dense_fraction,
            "eval_tokens": self.tokens,
        }


@torch.no_grad()
def evaluate_coder(
    coder: SparseCoder,
    batches: Iterable[Tensor | tuple[Tensor, Tensor]],
    *,
    max_tokens: int | None = None,
) -> CoderEvaluation:
    """FVU, mean L0 and per-latent firing rates of `coder` over `batches` (`x`, or `(x, y)` for transcoders).

    FVU = sum ||y - y_hat||^2 / sum ||y - mean(y)||^2 with the mean over all evaluated tokens.
    Firing rate f_i = fraction of tokens on which latent i is non-zero; dead: f_i = 0, frequent:
    f_i > 1%, dense: f_i > 10%. Stops after `max_tokens` tokens (the last batch is cut to fit).
    """
    coder.eval()
    device, m = coder.device, coder.num_latents
    counts = torch.zeros(m, dtype=torch.long, device=device)
    sse = torch.zeros((), dtype=torch.float64, device=device)
    sum_y = None
    sum_y2 = torch.zeros((), dtype=torch.float64, device=device)
    l0_total = 0
    n = 0
    for batch in batches:
        x, y = batch if isinstance(batch, tuple) else (batch, None)
        if max_tokens is not None:
            x = x[: max_tokens - n]
            y = None if y is None else y[: max_tokens - n]
        if x.shape[0] == 0:
            break
        x = x.to(device=device, dtype=coder.dtype)
        y = x if y is None else y.to(device=device, dtype=coder.dtype)
        if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
            raise ValueError(f"activations: evaluation batch after {n} tokens holds NaN or inf values")
        code = coder.encode(x)
        y_hat = coder.decode(code, x)
        y64 = y.double()
        sse += (y64 - y_hat.double()).pow(2).sum()
        sum_y = y64.sum(0) if sum_y is None else sum_y + y64.sum(0)
        sum_y2 += y64.pow(2).sum()
        counts += code.firing_counts(m)
        l0_total += int(code.l0().sum())
        n += x.shape[0]
        if max_tokens is not None and n >= max_tokens:
            break
    if n == 0:
        raise ValueError("evaluation: no tokens to evaluate on")
    total_var = sum_y2 - sum_y.pow(2).sum() / n
    rates = (counts.double() / n).cpu().numpy()
    return CoderEvaluation(
        tokens=n,
        fvu=float(sse / total_var.clamp_min(torch.finfo(torch.float64).tiny)),
        l0=l0_total / n,
        dead_fraction=float((rates == 0).mean()),
        frequent_fraction=float((rates > FREQUENT_RATE).mean()),
        dense_fraction=float((rates > DENSE_RATE).mean()),
        firing_rates=rates,
    )
