"""A converted coder checked against the package that wrote it: the same inputs through sparsify's or SAELens' own
code and through the `SparseCoder`, and how far apart their codes and outputs are.

`check_conversion` passes when the two give the same set of active latents on every token but a few near-ties
(at most `MAX_SUPPORT_MISMATCH` of the tokens: a latent whose pre-activation sits within rounding of the k-th
largest or of its threshold may flip after weights were folded), and, on the other tokens, codes and outputs
within `rtol` x the largest absolute value the package produced (1e-4 in float32 and float64; 2e-2 in float16
and bfloat16, whose rounding step is about 4e-3 and 8e-3). The packages are imported only here, when a check runs.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from bae_core.coders.coder import SparseCoder

MAX_SUPPORT_MISMATCH = 0.001
"""Share of tokens whose active latents may differ (near-ties) for a conversion to pass."""
PACKAGES = {"sparsify": "eai-sparsify", "saelens": "sae-lens"}


def rtol_for(dtype: torch.dtype) -> float:
    return 2e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4


@dataclass
class ConversionCheck:
    """How a converted coder's codes and outputs compare with the original package's on the same tokens."""

    reference: str
    """The package and version that computed the reference, e.g. sae-lens 6.54.12."""
    tokens: int
    max_code_diff: float
    """Largest |code - reference code| over tokens with the same active latents."""
    max_output_diff: float
    """Largest |output - reference output| over those tokens."""
    code_scale: float
    """Largest |reference code|."""
    output_scale: float
    """Largest |reference output|."""
    support_mismatch: int
    """Tokens whose set of active latents differs."""
    rtol: float

    @property
    def ok(self) -> bool:
        return (
            self.support_mismatch <= MAX_SUPPORT_MISMATCH * self.tokens
            and self.max_code_diff <= self.rtol * max(self.code_scale, 1e-12)
            and self.max_output_diff <= self.rtol * max(self.output_scale, 1e-12)
        )

    def summary(self) -> dict:
        return {**asdict(self), "ok": self.ok}

    def describe(self) -> str:
        return (
            f"compared with {self.reference} on {self.tokens} tokens: max |code diff| {self.max_code_diff:.2e} "
            f"(largest code {self.code_scale:.3g}), max |output diff| {self.max_output_diff:.2e} (largest output "
            f"{self.output_scale:.3g}), {self.support_mismatch} tokens with other active latents; tolerance "
            f"{self.rtol:g} x the largest value and {MAX_SUPPORT_MISMATCH:.1%} of tokens"
        )


@torch.no_grad()
def reference_outputs(folder: str | Path, fmt: str, x: Tensor) -> tuple[Tensor, Tensor, str]:
    """(dense codes, outputs, package and version) of the coder in `folder` on `x`, computed by the package that
    wrote it. Raises ModuleNotFoundError when that package is not installed."""
    from importlib.metadata import version

    folder = Path(folder)
    if fmt == "sparsify":
        with contextlib.redirect_stdout(io.StringIO()):  # sparsify prints which decoder it uses on import
            from sparsify import SparseCoder as SparsifyCoder
        coder = SparsifyCoder.load_from_disk(folder)
        out = coder(x.to(coder.dtype))
        codes = torch.zeros(x.shape[0], coder.num_latents, dtype=out.latent_acts.dtype)
        codes.scatter_(1, out.latent_indices, out.latent_acts)
        return codes, out.sae_out, f"eai-sparsify {version('eai-sparsify')}"
    if fmt == "saelens":
        from sae_lens import SAE

        from bae_core.coders.external import EXPORTED_ARCHITECTURE, _json

        if _json(folder / "cfg.json").get("architecture") == EXPORTED_ARCHITECTURE:
            from bae_core.coders.saelens import register_saelens

            register_saelens()
        sae = SAE.load_from_disk(folder, device="cpu")
        sae.eval()
        return sae.encode(x), sae(x), f"sae-lens {version('sae-lens')}"
    raise ValueError(f"format: no reference package for {fmt!r}")


@torch.no_grad()
def compare(coder: SparseCoder, x: Tensor, codes: Tensor, outputs: Tensor, reference: str) -> ConversionCheck:
    """The converted coder on `x` against the reference's dense `codes` and `outputs`."""
    coder.eval()
    code = coder.encode(x.to(coder.device, coder.dtype))
    mine = code.to_dense(coder.num_latents).float()
    out = coder.decode(code, x.to(coder.device, coder.dtype)).float()
    codes, outputs = codes.float(), outputs.float()
    same = ((mine != 0) == (codes != 0)).all(dim=1)
    return ConversionCheck(
        reference=reference,
        tokens=x.shape[0],
        max_code_diff=float((mine - codes)[same].abs().max()) if same.any() else float("nan"),
        max_output_diff=float((out - outputs)[same].abs().max()) if same.any() else float("nan"),
        code_scale=float(codes.abs().max()),
        output_scale=float(outputs.abs().max()),
        support_mismatch=int((~same).sum()),
        rtol=rtol_for(coder.dtype),
    )


def check_conversion(coder: SparseCoder, folder: str | Path, fmt: str, x: Tensor) -> ConversionCheck:
    """`coder` (converted from `folder`) against the original package on `x` (tokens x d_in)."""
    codes, outputs, reference = reference_outputs(folder, fmt, x)
    return compare(coder, x, codes, outputs, reference)
