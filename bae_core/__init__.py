"""bae_core: binary and continuous sparse coders (SAEs, transcoders) in plain PyTorch.

The science of the project: configs, activations and their straight-through estimators, the
`SparseCoder` module and its checkpoints, training, synthetic ground truth, and evaluation (fidelity, density,
lexical and LLM interpretability scores, aggregation). Never imports Ray.
"""

from .coder import Code, ForwardOutput, SparseCoder, fraction_of_variance_unexplained
from .config import ACTIVATIONS, KINDS, SURROGATES, CoderConfig
from .train import StepMetrics, TrainConfig, Trainer, build_coder

__all__ = [
    "ACTIVATIONS",
    "KINDS",
    "SURROGATES",
    "Code",
    "CoderConfig",
    "ForwardOutput",
    "SparseCoder",
    "StepMetrics",
    "TrainConfig",
    "Trainer",
    "build_coder",
    "fraction_of_variance_unexplained",
]
