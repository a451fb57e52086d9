"""Coders trained elsewhere, read into a `SparseCoder` that computes the same codes and outputs.

    sparsify  cfg.json + sae.safetensors (EleutherAI's layout; `load_many` keeps one such folder per hookpoint):
              topk or groupmax SAEs, transcoders and skip transcoders. The tensors are ours, unchanged.
    SAELens   cfg.json + sae_weights.safetensors, the inference architectures `SAE.load_from_disk` reads:
              standard (ReLU) and topk SAEs, jumprelu SAEs (a batchtopk SAE is saved as a jumprelu one with a
              single threshold, and comes back as batchtopk), transcoder, skip_transcoder, jumprelu_transcoder,
              jumprelu_skip_transcoder, and this project's own exported architecture. SAELens' W_enc (d_in x M)
              is our encoder weight transposed; a topk SAE's rescale_acts_by_decoder_norm and an SAE's
              apply_b_dec_to_input=False are folded into the weights (in float64, the same function); a
              jumprelu threshold t becomes log max(t, 0) (at or below 0 a JumpReLU is a ReLU), and a ReLU coder
              (standard, transcoder, skip_transcoder) is a jumprelu one with every threshold 0: the same function,
              pre * (pre > 0), with no activation this project would have to train.
    bae       a coder folder of another run of this project, read as it is.

What no `SparseCoder` computes is refused by name (`UnsupportedCoder`): SAELens' gated, abstopk, matching_pursuit
and temporal architectures, its training checkpoints (batchtopk, matryoshka_batchtopk), per-token input
normalisation (layer_norm, constant_norm_rescale), a scaling factor not folded into the weights
(expected_average_only_in, covariance_whitening, finetuning_scaling_factor) and hook_z reshaping; sparsify's
activations other than topk and groupmax and a checkpoint without its decoder. A folder is read without either
package; `bae_core.coders.reference` runs the original package to check the conversion.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from bae_core.coders.coder import SparseCoder
from bae_core.coders.config import CoderConfig

SAELENS_WEIGHTS = "sae_weights.safetensors"
OWN_WEIGHTS = "sae.safetensors"
CFG = "cfg.json"
EXPORTED_ARCHITECTURE = "bae_sparse_coder"
"""The SAELens architecture `bae export --custom-architecture` writes (`bae_core.coders.saelens`)."""

# SAELens architecture -> (our activation, our kind).
SAELENS_ARCHITECTURES = {
    "standard": ("jumprelu", "sae"),
    "topk": ("topk", "sae"),
    "jumprelu": ("jumprelu", "sae"),
    "transcoder": ("jumprelu", "transcoder"),
    "skip_transcoder": ("jumprelu", "skip_transcoder"),
    "jumprelu_transcoder": ("jumprelu", "transcoder"),
    "jumprelu_skip_transcoder": ("jumprelu", "skip_transcoder"),
}
REFUSED_ARCHITECTURES = {
    "gated": "its gate and magnitude paths have separate encoders, which no SparseCoder has",
    "abstopk": "it keeps the k largest |pre-activations| with their signs, which no SparseCoder activation does",
    "matching_pursuit": "its codes come from iterative residual pursuit, not one encoder pass",
    "temporal": "its codes depend on earlier tokens",
    "batchtopk": "this is a training checkpoint; SAELens' save_inference_model writes it as a jumprelu SAE, which "
    "can be imported",
    "matryoshka_batchtopk": "this is a training checkpoint; SAELens' save_inference_model writes it as a jumprelu "
    "SAE, which can be imported",
}
SPARSIFY_ACTIVATIONS = ("topk", "groupmax")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


class UnsupportedCoder(ValueError):
    """A checkpoint whose computation no `SparseCoder` reproduces; the message names the setting."""


@dataclass
class External:
    """A coder read from another package's folder, with what the folder says about where it belongs."""

    coder: SparseCoder
    format: str
    """sparsify, saelens or bae."""
    hook_name: str | None
    """The hookpoint as the folder names it (SAELens' metadata, sparsify's folder name), if it does."""
    model_name: str | None = None
    k_known: bool = True
    """Whether `coder.cfg.k` came from the folder; False for a ReLU or jumprelu coder, whose k the importer sets to
    its held-out L0 (a label: k changes nothing a jumprelu coder computes)."""
    architecture: str | None = None
    """The architecture as the source names it (SAELens' architecture, sparsify's activation)."""
    notes: list[str] = field(default_factory=list)
    """What the conversion folded into the weights."""


def detect_format(folder: Path) -> str | None:
    """sparsify, saelens or bae for a coder folder, None for anything else."""
    if not (folder / CFG).is_file():
        return None
    if (folder / SAELENS_WEIGHTS).is_file():
        return "saelens"
    if (folder / OWN_WEIGHTS).is_file():
        cfg = _json(folder / CFG)
        return "bae" if "kind" in cfg and "surrogate" in cfg else "sparsify"
    return None


def read_external(folder: str | Path, fmt: str | None = None) -> External:
    """The coder in `folder` (format detected when `fmt` is None)."""
    folder = Path(folder)
    fmt = fmt or detect_format(folder)
    if fmt == "sparsify":
        return read_sparsify(folder)
    if fmt == "saelens":
        return read_saelens(folder)
    if fmt == "bae":
        coder = SparseCoder.load(folder)
        return External(coder, "bae", None, architecture=coder.cfg.activation)
    raise FileNotFoundError(
        f"{folder}: not a coder folder; expected {CFG} with {OWN_WEIGHTS} (sparsify, bae) or {SAELENS_WEIGHTS} "
        "(SAELens)"
    )


def read_sparsify(folder: Path) -> External:
    """A sparsify checkpoint folder (`SparseCoder.save_to_disk`)."""
    cfg = _json(folder / CFG)
    activation = cfg.get("activation", "topk")
    if activation not in SPARSIFY_ACTIVATIONS:
        raise UnsupportedCoder(f"{folder}: sparsify activation {activation!r} is not supported (topk, groupmax)")
    tensors = load_file(str(folder / OWN_WEIGHTS))
    if "W_dec" not in tensors:
        raise UnsupportedCoder(f"{folder}: this sparsify checkpoint was saved without its decoder (W_dec)")
    if cfg.get("skip_connection") and not cfg.get("transcode"):
        raise UnsupportedCoder(
            f"{folder}: sparsify skip_connection on an SAE (transcode false) is not supported: its encoder subtracts "
            "b_dec and its output adds a skip term, which no SparseCoder kind does together"
        )
    kind = ("skip_transcoder" if cfg.get("skip_connection") else "transcoder") if cfg.get("transcode") else "sae"
    expected = {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}
    expected |= {"W_skip"} if cfg.get("skip_connection") else set()
    _check_keys(folder, tensors, expected)
    d_in, m = int(cfg["d_in"]), tensors["encoder.weight"].shape[0]
    config = CoderConfig(
        activation=activation,
        kind=kind,
        k=int(cfg["k"]),
        num_latents=m,
        normalize_decoder=bool(cfg.get("normalize_decoder", True)),
    )
    dtype = tensors["encoder.weight"].dtype
    coder = SparseCoder(config, d_in, d_in if config.is_transcoder else None, dtype=dtype)
    coder.load_state_dict(tensors, strict=True)
    notes = ["multi_topk only changes sparsify's training loss"] if cfg.get("multi_topk") else []
    hook = folder.name if bae_hookpoint(folder.name) else None  # load_many names each folder after its hookpoint
    return External(coder, "sparsify", hook, None, True, activation, notes)


def read_saelens(folder: Path) -> External:
    """A SAELens inference folder (`SAE.save_model`, `TrainingSAE.save_inference_model`), v6 or older."""
    cfg = _saelens_config(_json(folder / CFG))
    architecture = cfg.get("architecture", "standard")
    meta = cfg.get("metadata") or {}
    if architecture == EXPORTED_ARCHITECTURE:
        return _read_exported(folder, cfg, meta)
    if architecture in REFUSED_ARCHITECTURES:
        why = REFUSED_ARCHITECTURES[architecture]
        raise UnsupportedCoder(f"{folder}: SAELens architecture {architecture!r} is not supported: {why}")
    if architecture not in SAELENS_ARCHITECTURES:
        raise UnsupportedCoder(
            f"{folder}: SAELens architecture {architecture!r} is not supported; supported: "
            + ", ".join(SAELENS_ARCHITECTURES)
        )
    activation, kind = SAELENS_ARCHITECTURES[architecture]
    _check_saelens_settings(folder, cfg)
    dtype = _dtype(folder, cfg.get("dtype", "float32"))
    relu = architecture in ("standard", "transcoder", "skip_transcoder")
    tensors = _saelens_tensors(folder, cfg, "relu" if relu else activation, kind)
    w_enc, b_enc, w_dec, b_dec = (tensors[n].double() for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    notes = []
    if activation == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        norms = w_dec.norm(dim=-1)
        if (norms == 0).any():
            raise UnsupportedCoder(f"{folder}: rescale_acts_by_decoder_norm with a zero decoder row divides by 0")
        w_enc, b_enc, w_dec = w_enc * norms, b_enc * norms, w_dec / norms[:, None]
        notes.append("rescale_acts_by_decoder_norm folded into the encoder and decoder")
    if kind == "sae" and not cfg.get("apply_b_dec_to_input", True):
        b_enc = b_enc + b_dec @ w_enc  # our SAE encodes x - b_dec
        notes.append("apply_b_dec_to_input=False folded into the encoder bias")
    d_in, m, d_out = w_enc.shape[0], w_enc.shape[1], w_dec.shape[1]
    k_known = activation == "topk"
    k = int(cfg["k"]) if k_known else 1
    state = {"encoder.weight": w_enc.T, "encoder.bias": b_enc, "W_dec": w_dec, "b_dec": b_dec}
    if "W_skip" in tensors:
        state["W_skip"] = tensors["W_skip"]
    if relu:
        state["log_threshold"] = torch.full((m,), -torch.inf, dtype=torch.float64)
        notes.append("ReLU as a jumprelu with every threshold 0 (the same function)")
    elif activation == "jumprelu":
        threshold, trained_as = tensors["threshold"], meta.get("training_architecture")
        details = meta.get("training_architecture_details") or {}
        if trained_as == "batchtopk" and bool((threshold == threshold.flatten()[0]).all()):
            activation = "batchtopk"  # how SAELens saves a batchtopk SAE: one threshold for every latent
            state["batch_threshold"] = threshold.flatten()[0]
        elif "log_threshold" in tensors:  # an older SAELens checkpoint: the same parameter as ours
            state["log_threshold"] = tensors["log_threshold"]
        else:
            state["log_threshold"] = threshold.double().clamp_min(0).log()
        if trained_as in ("batchtopk", "bae:jumprelu") and details.get("k"):  # the k it was trained with
            k, k_known = max(1, round(float(details["k"]))), True
    config = CoderConfig(activation=activation, kind=kind, k=k, num_latents=m, normalize_decoder=False)
    coder = SparseCoder(config, d_in, d_out if config.is_transcoder else None, dtype=dtype)
    coder.load_state_dict({name: t.to(dtype).contiguous() for name, t in state.items()}, strict=True)
    hook = meta.get("hf_hook_name") or meta.get("hook_name")
    return External(coder, "saelens", hook, meta.get("model_name"), k_known, architecture, notes)


def _read_exported(folder: Path, cfg: dict, meta: dict) -> External:
    """This project's architecture in a SAELens folder (`bae export --custom-architecture`)."""
    dtype = _dtype(folder, cfg.get("dtype", "float32"))
    tensors = load_file(str(folder / SAELENS_WEIGHTS))
    config = CoderConfig(activation=cfg["activation"], kind=cfg["kind"], k=int(cfg["k"]), num_latents=cfg["d_sae"])
    state = {"encoder.weight": tensors["W_enc"].T, "encoder.bias": tensors["b_enc"]}
    state |= {n: tensors[n] for n in ("W_dec", "b_dec", "W_skip") if n in tensors}
    if "threshold" in tensors:
        state["log_threshold"] = tensors["threshold"].double().clamp_min(0).log()
    coder = SparseCoder(config, cfg["d_in"], cfg.get("d_out") if config.is_transcoder else None, dtype=dtype)
    coder.load_state_dict({name: t.to(dtype).contiguous() for name, t in state.items()}, strict=True)
    return External(coder, "saelens", meta.get("hook_name"), meta.get("model_name"), True, EXPORTED_ARCHITECTURE)


def _saelens_config(cfg: dict) -> dict:
    """SAELens' own defaulting of a config written before 6.0 (`handle_pre_6_0_config`), enough to read it."""
    from packaging.version import InvalidVersion, Version

    version = cfg.get("sae_lens_version") or (cfg.get("metadata") or {}).get("sae_lens_version")
    try:
        old = not version or Version(str(version)) < Version("6.0.0-rc.0")
    except InvalidVersion:
        old = True
    if not old:
        return cfg
    renames = {"hook_point": "hook_name", "activation_fn_str": "activation_fn"}
    new = {renames.get(k, k): v for k, v in cfg.items()}
    new.setdefault("apply_b_dec_to_input", True)
    new.setdefault("architecture", "standard")
    if new.get("activation_fn") == "topk" and (new.get("activation_fn_kwargs") or {}).get("k") is not None:
        new["architecture"], new["k"] = "topk", new["activation_fn_kwargs"]["k"]
    normalize = new.get("normalize_activations")
    if isinstance(normalize, bool) or normalize is None:
        new["normalize_activations"] = "expected_average_only_in" if normalize else "none"
    new["metadata"] = {k: new[k] for k in ("hook_name", "model_name", "hf_hook_name") if k in new}
    return new


def _check_saelens_settings(folder: Path, cfg: dict) -> None:
    normalize = cfg.get("normalize_activations", "none")
    reasons = {
        "layer_norm": "each token is normalised by its own mean and spread, which no linear encoder reproduces",
        "constant_norm_rescale": "each token is rescaled by its own norm, which no linear encoder reproduces",
        "expected_average_only_in": "the folder does not hold the scaling factor the activations were divided by",
        "covariance_whitening": "the whitening was not folded into the weights",
    }
    if normalize != "none":
        why = reasons.get(normalize, "unknown setting")
        raise UnsupportedCoder(f"{folder}: SAELens normalize_activations={normalize!r} is not supported: {why}")
    if cfg.get("reshape_activations", "none") != "none":
        raise UnsupportedCoder(
            f"{folder}: SAELens reshape_activations={cfg['reshape_activations']!r} (attention heads) is not supported"
        )


def _saelens_tensors(folder: Path, cfg: dict, activation: str, kind: str) -> dict[str, torch.Tensor]:
    tensors = load_file(str(folder / SAELENS_WEIGHTS))
    if "scaling_factor" in tensors:
        if not torch.allclose(tensors["scaling_factor"], torch.ones_like(tensors["scaling_factor"])):
            raise UnsupportedCoder(f"{folder}: SAELens finetuning_scaling_factor is not supported")
        del tensors["scaling_factor"]
    expected = {"W_enc", "b_enc", "W_dec", "b_dec"}
    if activation == "jumprelu":
        expected.add("log_threshold" if "log_threshold" in tensors else "threshold")
    if kind == "skip_transcoder":
        expected.add("W_skip")
    _check_keys(folder, tensors, expected)
    if "log_threshold" in tensors:
        tensors["threshold"] = tensors["log_threshold"].exp()
    return tensors


def _check_keys(folder: Path, tensors: dict, expected: set[str]) -> None:
    missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or extra:
        raise UnsupportedCoder(
            f"{folder}: unexpected weights (missing: {', '.join(missing) or 'none'}; not understood: "
            f"{', '.join(extra) or 'none'})"
        )


def _dtype(folder: Path, name: str) -> torch.dtype:
    dtype = DTYPES.get(str(name).removeprefix("torch."))
    if dtype is None:
        raise UnsupportedCoder(f"{folder}: dtype {name!r} is not supported ({', '.join(DTYPES)})")
    return dtype


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


# ---- hookpoint names --------------------------------------------------------------------------------------------

_LAYER = r"(?:model\.|transformer\.|gpt_neox\.)?(?:layers|h)\.(\d+)"
_HOOK_NAMES = [
    # HF module paths (sparsify's folder names, SAELens' hf_hook_name, our own names): (pattern, SAE, transcoder)
    (re.compile(_LAYER), lambda n: f"layers.{n}", lambda n: None),
    (re.compile(_LAYER + r"\.mlp"), lambda n: f"layers.{n}.mlp", lambda n: f"layers.{n}.mlp"),
    # TransformerLens names (SAELens' hook_name; a transcoder's is its input's)
    (re.compile(r"blocks\.(\d+)\.hook_resid_post"), lambda n: f"layers.{n}", lambda n: None),
    (re.compile(r"blocks\.(\d+)\.hook_resid_pre"), lambda n: f"layers.{n - 1}" if n > 0 else None, lambda n: None),
    (re.compile(r"blocks\.(\d+)\.hook_mlp_out"), lambda n: f"layers.{n}.mlp", lambda n: None),
    (re.compile(r"blocks\.(\d+)\.ln2\.hook_normalized"), lambda n: None, lambda n: f"layers.{n}.mlp"),
]


def bae_hookpoint(name: str | None, transcoder: bool = False) -> str | None:
    """This project's hookpoint for a hook name written by sparsify, SAELens or TransformerLens, None when there is
    no counterpart. layers.N is the residual stream after layer N (blocks.N.hook_resid_post); an SAE at
    layers.N.mlp reconstructs the MLP's output (blocks.N.hook_mlp_out), and a transcoder there maps the MLP's
    input (blocks.N.ln2.hook_normalized) to its output. An SAE on the MLP's input, or on hook_mlp_in (the residual
    before the norm), has none."""
    if not name:
        return None
    for pattern, sae, tc in _HOOK_NAMES:
        match = pattern.fullmatch(name)
        if match:
            return (tc if transcoder else sae)(int(match[1]))
    return None
