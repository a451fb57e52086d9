"""The coders: configs, activations with their straight-through estimators, and the `SparseCoder` module."""

from bae_core.coders.coder import Code, ForwardOutput, SparseCoder, fraction_of_variance_unexplained
from bae_core.coders.config import ACTIVATIONS, KINDS, SURROGATES, CoderConfig

__all__ = [
    "ACTIVATIONS",
    "KINDS",
    "SURROGATES",
    "Code",
    "CoderConfig",
    "ForwardOutput",
    "SparseCoder",
    "fraction_of_variance_unexplained",
]
