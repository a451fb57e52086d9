"""bae_core: binary and continuous sparse coders (SAEs, transcoders) in plain PyTorch.

The science of the project: configs, activations and their straight-through estimators, the
`SparseCoder` module and its checkpoints, training, synthetic ground truth, and evaluation (fidelity, density,
lexical and LLM interpretability scores, aggregation). Never imports Ray.
"""

from bae_core.coders.coder import Code, ForwardOutput, SparseCoder, fraction_of_variance_unexplained
from bae_core.coders.config import ACTIVATIONS, KINDS, SURROGATES, CoderConfig
from bae_core.training import StepMetrics, TrainConfig, Trainer, build_coder

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
