"""This project's coders as SAELens folders (`bae export --format saelens`): cfg.json + sae_weights.safetensors in
SAELens 6's inference format, which `sae_lens.SAE.load_from_disk` reads.

A built-in SAELens architecture is used where one computes exactly what the coder computes:

    topk SAE            topk (apply_b_dec_to_input: our SAE encodes x - b_dec; rescale_acts_by_decoder_norm off)
    jumprelu            jumprelu, jumprelu_transcoder, jumprelu_skip_transcoder (threshold = exp(log_threshold))
    batchtopk           the same, with the inference threshold for every latent: how SAELens saves its own batchtopk
                        SAEs (metadata.training_architecture batchtopk, training_architecture_details.k)

None exists for binary coders (their latents are exactly 0 or 1 and the decoder rows carry the magnitude; every
SAELens architecture outputs pre-activation values: ReLU, TopK, JumpReLU), for topk and groupmax transcoders
(SAELens' transcoders are ReLU or JumpReLU) or for groupmax SAEs. For those, `custom=True` writes the
architecture "bae_sparse_coder", which SAELens loads once `register_saelens()` has registered it through
SAELens' own `register_sae_class` (so this package must be installed where the folder is read); without it they
are refused with the reason. `bae import` reads both forms back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from bae_core.coders.coder import SparseCoder
from bae_core.coders.external import EXPORTED_ARCHITECTURE, SAELENS_WEIGHTS, UnsupportedCoder

_BUILT_IN = {
    ("sae", "topk"): "topk",
    ("sae", "jumprelu"): "jumprelu",
    ("sae", "batchtopk"): "jumprelu",
    ("transcoder", "jumprelu"): "jumprelu_transcoder",
    ("transcoder", "batchtopk"): "jumprelu_transcoder",
    ("skip_transcoder", "jumprelu"): "jumprelu_skip_transcoder",
    ("skip_transcoder", "batchtopk"): "jumprelu_skip_transcoder",
}
_THRESHOLDED = ("jumprelu", "batchtopk", "binary_topk", "binary_threshold")


def saelens_architecture(coder: SparseCoder) -> tuple[str | None, str]:
    """(the built-in SAELens architecture that computes what `coder` computes, or None; why none does)."""
    cfg = coder.cfg
    built_in = _BUILT_IN.get((cfg.kind, cfg.activation))
    if built_in is not None:
        return built_in, ""
    if cfg.is_binary:
        why = (
            f"{cfg.activation} latents are exactly 0 or 1 (the decoder rows carry the magnitude), and every SAELens "
            "architecture outputs pre-activation values (ReLU, TopK, JumpReLU)"
        )
    elif cfg.is_transcoder:
        why = f"SAELens' transcoders are ReLU or JumpReLU, not {cfg.activation}"
    else:
        why = f"SAELens has no {cfg.activation} activation"
    return None, why


def export_saelens(
    coder: SparseCoder,
    out: str | Path,
    *,
    hookpoint: str | None = None,
    model: str | None = None,
    custom: bool = False,
) -> str:
    """Write `coder` into the folder `out` as SAELens reads it; returns the architecture written. A coder no
    built-in architecture represents is refused (`UnsupportedCoder`) unless `custom`."""
    cfg = coder.cfg
    architecture, why = saelens_architecture(coder)
    if architecture is None:
        if not custom:
            raise UnsupportedCoder(
                f"coder: no SAELens architecture computes a {cfg.activation} {cfg.kind}: {why}; --custom-architecture "
                f"writes SAELens' registered architecture {EXPORTED_ARCHITECTURE!r}, which needs this package to load"
            )
        architecture = EXPORTED_ARCHITECTURE
    tensors = {
        "W_enc": coder.encoder.weight.detach().T.contiguous(),
        "b_enc": coder.encoder.bias.detach().clone(),
        "W_dec": coder.W_dec.detach().clone(),
        "b_dec": coder.b_dec.detach().clone(),
    }
    if coder.W_skip is not None:
        tensors["W_skip"] = coder.W_skip.detach().clone()
    if cfg.activation == "batchtopk":
        tensors["threshold"] = coder.batch_threshold.detach().expand(coder.num_latents).clone()
    elif coder.threshold is not None:
        tensors["threshold"] = coder.threshold.detach().clone()
    meta = {
        "sae_lens_version": _saelens_version(),
        "hook_name": hookpoint,
        "model_name": model,
        "training_architecture": f"bae:{cfg.activation}",
        "training_architecture_details": cfg.to_dict(),
    }
    if cfg.is_transcoder:
        meta["hook_name_out"] = hookpoint
    if cfg.activation == "batchtopk":
        meta["training_architecture"] = "batchtopk"
        meta["training_architecture_details"] = {**cfg.to_dict(), "k": cfg.k}
    config = {
        "architecture": architecture,
        "d_in": coder.d_in,
        "d_sae": coder.num_latents,
        "dtype": str(coder.dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": not cfg.is_transcoder,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": meta,
    }
    if cfg.is_transcoder:
        config["d_out"] = coder.d_out
    if architecture == "topk":
        config |= {"k": cfg.k, "rescale_acts_by_decoder_norm": False}
    if architecture == EXPORTED_ARCHITECTURE:
        config |= {"activation": cfg.activation, "kind": cfg.kind, "k": cfg.k, "d_out": coder.d_out}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(out / SAELENS_WEIGHTS))
    (out / "cfg.json").write_text(json.dumps(config, indent=2) + "\n")
    return architecture


def _saelens_version() -> str:
    """The installed SAELens' version (the format written is its), else the first version of this format."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sae-lens")
    except PackageNotFoundError:
        return "6.0.0"


def activate(pre: Tensor, activation: str, k: int, threshold: Tensor | None) -> Tensor:
    """A `SparseCoder` activation at inference on dense pre-activations (..., M), as a dense code."""
    if activation == "jumprelu":
        return pre * (pre > threshold)
    if activation == "batchtopk":
        return pre.relu() * (pre > threshold)
    if activation == "binary_threshold":
        return (pre > threshold).to(pre.dtype)
    if activation in ("groupmax", "binary_groupmax"):
        groups = pre.unflatten(-1, (k, -1))
        values, index = groups.max(dim=-1)
        values = values.relu() if activation == "groupmax" else torch.ones_like(values)
        return torch.zeros_like(groups).scatter(-1, index.unsqueeze(-1), values.unsqueeze(-1)).flatten(-2)
    if activation == "topk":
        values, index = pre.topk(k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, index, values.relu())
    if activation == "binary_topk":
        index = (pre - threshold).topk(k, dim=-1, sorted=False).indices
        fired = (pre.gather(-1, index) > threshold[index]).to(pre.dtype)
        return torch.zeros_like(pre).scatter(-1, index, fired)
    raise ValueError(f"activation: {activation!r} is not a SparseCoder activation")


def register_saelens() -> None:
    """Register the architecture "bae_sparse_coder" with SAELens (once per process), so that
    `sae_lens.SAE.load_from_disk` reads a folder `export_saelens(..., custom=True)` wrote."""
    from sae_lens import SAE, SAEConfig, register_sae_class
    from sae_lens.registry import SAE_CLASS_REGISTRY
    from torch import nn

    if EXPORTED_ARCHITECTURE in SAE_CLASS_REGISTRY:
        return

    @dataclass
    class BAESparseCoderConfig(SAEConfig):
        """A `bae_core.coders.SparseCoder` at inference: its activation, kind, k and output width."""

        activation: str = "binary_topk"
        kind: str = "sae"
        k: int = 32
        d_out: int = 0

        @classmethod
        def architecture(cls) -> str:
            return EXPORTED_ARCHITECTURE

    class BAESparseCoderSAE(SAE[BAESparseCoderConfig]):
        """y = act(x' W_enc + b_enc) W_dec + b_dec (+ x W_skip^T), x' = x - b_dec for an SAE, x for a transcoder."""

        def initialize_weights(self) -> None:
            cfg = self.cfg
            d_out = cfg.d_out or cfg.d_in

            def zeros(*shape: int) -> nn.Parameter:
                return nn.Parameter(torch.zeros(*shape, dtype=self.dtype, device=self.device))

            self.W_enc, self.b_enc = zeros(cfg.d_in, cfg.d_sae), zeros(cfg.d_sae)
            self.W_dec, self.b_dec = zeros(cfg.d_sae, d_out), zeros(d_out)
            if cfg.activation in _THRESHOLDED:
                self.threshold = zeros(cfg.d_sae)
            if cfg.kind == "skip_transcoder":
                self.W_skip = zeros(d_out, cfg.d_in)

        def process_sae_in(self, sae_in: Tensor) -> Tensor:
            sae_in = self.run_time_activation_norm_fn_in(self.hook_sae_input(sae_in.to(self.dtype)))
            return sae_in - self.b_dec if self.cfg.kind == "sae" else sae_in

        def encode(self, x: Tensor) -> Tensor:
            pre = self.hook_sae_acts_pre(self.process_sae_in(x) @ self.W_enc + self.b_enc)
            threshold = getattr(self, "threshold", None)
            return self.hook_sae_acts_post(activate(pre, self.cfg.activation, self.cfg.k, threshold))

        def decode(self, feature_acts: Tensor) -> Tensor:
            return self.hook_sae_recons(feature_acts @ self.W_dec + self.b_dec)

        def forward(self, x: Tensor) -> Tensor:
            out = self.decode(self.encode(x))
            if self.cfg.kind == "skip_transcoder":
                out = out + x.to(self.dtype) @ self.W_skip.T
            return self.hook_sae_output(out)

    register_sae_class(EXPORTED_ARCHITECTURE, BAESparseCoderSAE, BAESparseCoderConfig)
