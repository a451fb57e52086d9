"""Typed configuration of a sparse coder: which kind, which activation, how wide, how sparse.

Every field has a docstring underneath it; that text is the command-line help. Validation lives in
`__post_init__` and raises `ValueError` naming the field and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any, Literal, get_args

Kind = Literal["sae", "transcoder", "skip_transcoder"]
Activation = Literal[
    "topk",
    "groupmax",
    "batchtopk",
    "jumprelu",
    "binary_topk",
    "binary_threshold",
    "binary_groupmax",
]
Surrogate = Literal["sigmoid", "rectangle", "identity"]

KINDS: tuple[str, ...] = get_args(Kind)
ACTIVATIONS: tuple[str, ...] = get_args(Activation)
SURROGATES: tuple[str, ...] = get_args(Surrogate)

BINARY_ACTIVATIONS = frozenset({"binary_topk", "binary_threshold", "binary_groupmax"})
GROUP_ACTIVATIONS = frozenset({"groupmax", "binary_groupmax"})
THRESHOLD_ACTIVATIONS = frozenset({"binary_topk", "binary_threshold", "jumprelu"})
# Activations whose number of active latents is learned rather than fixed: an L0 penalty applies.
FREE_L0_ACTIVATIONS = frozenset({"binary_threshold", "jumprelu"})


def check_choice(field: str, value: Any, allowed: tuple[str, ...]) -> None:
    """Raise a ValueError naming `field` when `value` is not one of `allowed`."""
    if value not in allowed:
        raise ValueError(f"{field}: {value!r} is not allowed; choose one of {', '.join(allowed)}")


def check_positive(field: str, value: float, *, integer: bool = False) -> None:
    """Raise a ValueError naming `field` unless `value` is a finite positive number."""
    if integer and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{field}: must be a positive integer, got {value!r}")
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{field}: must be a finite number > 0, got {value!r}")


@dataclass
class CoderConfig:
    """Architecture of one sparse coder (SAE, transcoder or skip transcoder; binary or continuous)."""

    activation: Activation = "topk"
    """Latent activation: topk, groupmax, batchtopk, jumprelu (continuous); binary_topk,
    binary_threshold, binary_groupmax (binary: every latent is exactly 0 or 1)."""

    kind: Kind = "sae"
    """sae reconstructs its input; transcoder predicts a module's output from its input;
    skip_transcoder adds a linear skip term W_skip x."""

    k: int = 32
    """Number of active latents: the exact count for topk/groupmax/binary_groupmax, the upper bound
    for binary_topk, the mean per token for batchtopk, and the target mean L0 for jumprelu and
    binary_threshold (used only by the optional L0 penalty)."""

    expansion_factor: int = 32
    """Dictionary size as a multiple of the input width, used when num_latents is 0."""

    num_latents: int = 0
    """Dictionary size M. 0 means expansion_factor x d_in."""

    normalize_decoder: bool = True
    """Keep a continuous SAE's decoder rows at unit norm (transcoders and binary coders, whose
    decoder rows carry the magnitude, are never normalised; every SAE starts at unit norm)."""

    surrogate: Surrogate = "sigmoid"
    """Straight-through surrogate of the step function's derivative for thresholded activations:
    sigmoid (s = sig(u/T)(1 - sig(u/T))), rectangle (s = 1 on |u/T| < 1/2) or identity (s = 1)."""

    temperature: float = 2.0
    """Temperature T of the surrogate gradient."""

    init_threshold: float = 0.004
    """Initial per-latent threshold theta (stored as log theta) for binary_topk, binary_threshold
    and jumprelu."""

    gumbel_tau: float = 0.5
    """Gumbel-softmax temperature of binary_groupmax during training."""

    def __post_init__(self) -> None:
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("kind", self.kind, KINDS)
        check_choice("surrogate", self.surrogate, SURROGATES)
        check_positive("k", self.k, integer=True)
        check_positive("expansion_factor", self.expansion_factor, integer=True)
        if isinstance(self.num_latents, bool) or not isinstance(self.num_latents, int) or self.num_latents < 0:
            raise ValueError(
                f"num_latents: must be an integer >= 0 (0 = use expansion_factor), got {self.num_latents!r}"
            )
        check_positive("temperature", self.temperature)
        check_positive("init_threshold", self.init_threshold)
        check_positive("gumbel_tau", self.gumbel_tau)
        if self.num_latents:
            self.check_width(self.num_latents)

    # ---- derived properties -------------------------------------------------------------------

    @property
    def is_binary(self) -> bool:
        return self.activation in BINARY_ACTIVATIONS

    @property
    def is_transcoder(self) -> bool:
        return self.kind != "sae"

    @property
    def has_skip(self) -> bool:
        return self.kind == "skip_transcoder"

    @property
    def has_threshold(self) -> bool:
        return self.activation in THRESHOLD_ACTIVATIONS

    def latents_for(self, d_in: int) -> int:
        """Dictionary size for an input of width `d_in` (validated)."""
        m = self.num_latents or self.expansion_factor * d_in
        self.check_width(m)
        return m

    def check_width(self, m: int) -> None:
        if self.k >= m:
            raise ValueError(f"k: must be smaller than the number of latents ({m}), got k={self.k}")
        if self.activation in GROUP_ACTIVATIONS and m % self.k:
            raise ValueError(
                f"num_latents: {self.activation} splits the latents into k={self.k} equal groups, "
                f"so the number of latents must be divisible by k; got {m}"
            )

    # ---- (de)serialisation ----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict; also carries the field names EleutherAI's sparsify reads."""
        d = dataclasses.asdict(self)
        d["transcode"] = self.is_transcoder
        d["skip_connection"] = self.has_skip
        d["multi_topk"] = False
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CoderConfig:
        """Inverse of `to_dict`; also reads a sparsify cfg.json (transcode / skip_connection flags)."""
        names = {f.name for f in fields(cls)}
        kw = {key: value for key, value in d.items() if key in names}
        if "kind" not in d and d.get("transcode"):
            kw["kind"] = "skip_transcoder" if d.get("skip_connection") else "transcoder"
        return cls(**kw)
