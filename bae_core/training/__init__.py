"""Training a coder: the training config and its optimisers (`config`), and the `Trainer` (`trainer`)."""

from bae_core.training.config import SignSGD, TrainConfig, default_lr
from bae_core.training.trainer import StepMetrics, Trainer, batch_entropy, build_coder

__all__ = ["SignSGD", "StepMetrics", "TrainConfig", "Trainer", "batch_entropy", "build_coder", "default_lr"]
