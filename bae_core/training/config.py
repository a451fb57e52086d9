"""How a coder is trained: the `TrainConfig`, the authors' learning-rate rules and the sign-SGD optimiser."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
from schedulefree import ScheduleFreeWrapper

from bae_core.coders.coder import SparseCoder
from bae_core.coders.config import check_choice, check_positive

Optimizer = Literal["signum", "adam"]
Precision = Literal["fp32", "bf16"]


@dataclass
class TrainConfig:
    """How to train a coder: optimiser, loss terms, precision and bookkeeping."""

    optimizer: Optimizer = "signum"
    """signum: sign-SGD with momentum inside a schedule-free wrapper (the paper's authors' choice);
    adam: Adam with linear warm-up."""

    lr: float | None = None
    """Learning rate. None picks the scaling rule for the coder's width M: 3e-3/sqrt(M/2^15) for binary
    codes with either optimiser; for continuous codes signum 5e-3/sqrt(M/2^14) and adam
    2e-4/sqrt(M/2^14); binary_groupmax 3e-2 with signum and the continuous adam rule with adam."""

    momentum: float = 0.95
    """Momentum of the schedule-free wrapper (signum only)."""

    lr_warmup_steps: int = 1000
    """Linear learning-rate warm-up steps (adam only)."""

    auxk_alpha: float = 0.0
    """Weight of the AuxK loss that revives dead latents (continuous topk and groupmax only)."""

    entropy_coef: float = 0.0
    """Weight of the minibatch entropy term sum_j H(mean_batch z_j) (binary codes only)."""

    l0_control: float = 1.0
    """How much of the L0 controller's correction to apply after each step (0 to 1). The controller
    holds jumprelu and binary_threshold codes at k active latents per token: it multiplies every
    threshold by c ** l0_control, where c is the factor that makes the step's batch fire exactly k
    latents per token at the updated weights. It acts on the thresholds directly, so it holds at any
    learning rate and with either optimiser. 0 turns it off and leaves the L0 free (for
    binary_threshold: the paper's dense binary); a free-L0 coder whose training L0 ends more than 10%
    off k is then named in a warning."""

    l0_coef: float = 0.0
    """Weight of an extra penalty (mean L0 / k - 1)^2 on jumprelu and binary_threshold codes (0: none;
    the controller above is what holds L0 at k)."""

    dead_tokens: int = 10_000_000
    """A latent that has not fired for this many training tokens counts as dead."""

    precision: Precision = "fp32"
    """bf16 runs the encoder matmul under bfloat16 autocast (weights stay fp32)."""

    device: str = "cpu"
    """Torch device to train on, e.g. cpu, cuda, cuda:1."""

    seed: int = 0
    """Seed of the coder's initialisation when the trainer's caller builds it (`build_coder`)."""

    log_every: int = 100
    """Log a line of metrics every this many steps (0: never)."""

    def __post_init__(self) -> None:
        check_choice("optimizer", self.optimizer, ("signum", "adam"))
        check_choice("precision", self.precision, ("fp32", "bf16"))
        if self.lr is not None:
            check_positive("lr", self.lr)
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum: must be in [0, 1), got {self.momentum!r}")
        for name in ("auxk_alpha", "entropy_coef", "l0_coef"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name}: must be a finite number >= 0, got {value!r}")
        if not isinstance(self.l0_control, (int, float)) or not 0 <= self.l0_control <= 1:
            raise ValueError(f"l0_control: must be a number in [0, 1], got {self.l0_control!r}")
        if not isinstance(self.lr_warmup_steps, int) or self.lr_warmup_steps < 0:
            raise ValueError(f"lr_warmup_steps: must be an integer >= 0, got {self.lr_warmup_steps!r}")
        check_positive("dead_tokens", self.dead_tokens, integer=True)
        try:
            torch.device(self.device)
        except RuntimeError as err:
            raise ValueError(f"device: {self.device!r} is not a torch device ({err})") from None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        if "l0_coef" in d and d["l0_coef"] is None:  # checkpoints before the L0 controller: None meant default
            d = {key: value for key, value in d.items() if key != "l0_coef"}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown training option; allowed: {', '.join(sorted(names))}")
        return cls(**d)


def default_lr(coder: SparseCoder, optimizer: str) -> float:
    """The learning-rate scaling rules of the paper's authors for a coder of width M.

    Binary codes (except binary_groupmax) take the authors' binary rule 3e-3/sqrt(M/2^15) with either
    optimiser. With Adam, the continuous rule 2e-4/sqrt(M/2^14) is about 21x too slow for them: on the
    quickstart's cache (SmolLM2-135M layers.9.mlp, binary_topk, 2304 latents, k=32, 300 steps of 1024
    tokens, `benchmarks/optimizer_choice.py`) held-out FVU 0.531 at the binary rule (1.1e-2) against
    0.787 at the continuous one (5.3e-4) with a 30-step warm-up, and 0.695 against 0.886 with 1,000.
    """
    m = coder.num_latents
    if coder.cfg.activation == "binary_groupmax":
        return 3e-2 if optimizer == "signum" else 2e-4 / math.sqrt(m / 2**14)
    if coder.cfg.is_binary:
        return 3e-3 / math.sqrt(m / 2**15)
    if optimizer == "adam":
        return 2e-4 / math.sqrt(m / 2**14)
    return 5e-3 / math.sqrt(m / 2**14)


class SignSGD(torch.optim.Optimizer):
    """Steepest descent in the L-infinity norm: p -= lr * sign(grad). The step leaves sign(grad) in p.grad."""

    def __init__(self, params, lr: float):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign_(), alpha=-group["lr"])  # in place: no M x d temporary


class ScheduleFree(ScheduleFreeWrapper):
    """schedulefree's `ScheduleFreeWrapper`, whose swap of a parameter with its base iterate z exchanges the
    two tensors' storage instead of xor-ing their bytes three times (six passes over every parameter per step
    for the same values)."""

    @staticmethod
    def swap(x: torch.Tensor, y: torch.Tensor) -> None:  # noqa: D102
        x_data = x.data
        x.data = y.data
        y.data = x_data
