"""Hooks into a loaded language model: capture hookpoint activations, splice a coder in place of a module's
output, zero-ablate a module, and read the MLP's hidden neurons.

`capture` stops the forward pass after the deepest hooked layer, so an early hookpoint costs a fraction of a
full forward. `splice` and `zero_ablate` replace a module's output while their context is active.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import torch
from torch import Tensor, nn

from bae_core.coders.coder import SparseCoder
from bae_core.data.lm import Hookpoint, LoadedModel


def _hidden_states(layer_output: Tensor | tuple) -> Tensor:
    # Decoder layers return the hidden states (transformers 5) or a tuple that starts with them (transformers 4).
    return layer_output[0] if isinstance(layer_output, tuple) else layer_output


# ---- capture ----------------------------------------------------------------------------------------------------


class _StopForward(Exception):
    """Raised by a hook after the deepest hooked layer: nothing the model computes later is needed."""


def capture(
    loaded: LoadedModel,
    input_ids: Tensor,
    hookpoints: list[Hookpoint],
    attention_mask: Tensor | None = None,
) -> dict[str, dict[str, Tensor]]:
    """Activations at `hookpoints` for a batch of token ids (B, T).

    Returns, per hookpoint name, {"input": (B, T, d_in), "output": (B, T, d_out)} for MLP hookpoints and
    {"output": (B, T, d_out)} for residual ones: float32 copies on the CPU, ordinary tensors (not inference
    tensors), so they can feed training directly. The forward pass stops after the deepest hooked layer. The
    residual stream equals `output_hidden_states=True`'s hidden_states[N + 1], except for the last layer, where
    transformers reports the stream after the final norm and this reports it before.
    """
    if not hookpoints:
        raise ValueError("hookpoints: name at least one, e.g. resolve_hookpoints(loaded, ['layers.9.mlp'])")
    if input_ids.ndim != 2 or input_ids.dtype.is_floating_point:
        raise ValueError(
            f"input_ids: expected integer token ids of shape (batch, seq), got {input_ids.dtype} "
            f"{tuple(input_ids.shape)}"
        )
    model = loaded.model
    raw: dict[str, dict[str, Tensor]] = {h.name: {} for h in hookpoints}

    def recorder(store: dict[str, Tensor], has_input: bool) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if has_input:
                store["input"] = args[0]
            store["output"] = _hidden_states(output)

        return hook

    def stop(module: nn.Module, args: tuple, output: Any) -> None:
        raise _StopForward

    handles = []
    try:
        for h in hookpoints:
            module = model.get_submodule(h.module_path)
            handles.append(module.register_forward_hook(recorder(raw[h.name], h.has_input)))
        # Registered last, so on the deepest layer the recorders run before the pass stops.
        handles.append(loaded.layers[max(h.layer for h in hookpoints)].register_forward_hook(stop))
        with torch.inference_mode():
            mask = None if attention_mask is None else attention_mask.to(model.device)
            with suppress(_StopForward):
                model(input_ids=input_ids.to(model.device), attention_mask=mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    # Copied outside inference mode: inference tensors cannot be saved for backward, so training would fail.
    return {
        name: {column: t.to(device="cpu", dtype=torch.float32, copy=True) for column, t in columns.items()}
        for name, columns in raw.items()
    }


# ---- splicing ---------------------------------------------------------------------------------------------------


@contextmanager
def _replaced_output(
    loaded: LoadedModel, hookpoint: Hookpoint, replace: Callable[[Tensor | None, Tensor], Tensor]
) -> Iterator[None]:
    """While active, the hooked module's output becomes `replace(module input or None, module output)`."""

    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        new = replace(args[0] if hookpoint.has_input else None, _hidden_states(output))
        return (new, *output[1:]) if isinstance(output, tuple) else new

    # Prepended so that other hooks on the module (a capture, transformers' own output_hidden_states
    # recorders) see the replaced output.
    handle = loaded.model.get_submodule(hookpoint.module_path).register_forward_hook(hook, prepend=True)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def splice(
    loaded: LoadedModel, hookpoint: Hookpoint, coder: SparseCoder, *, ablate: Tensor | None = None
) -> Iterator[None]:
    """While active, the module at `hookpoint` outputs the coder's reconstruction instead of its own output.

    An SAE reconstructs the module's output (`coder(output)`); a transcoder or skip transcoder on an MLP
    hookpoint predicts it from the MLP's input (`coder(input, output)`). The coder runs in eval mode (restored
    on exit), in its own dtype and device; the result is cast back to the model's. `ablate`, a boolean mask over
    the coder's latents, zeroes those latents in the code before decoding (ablation inside the spliced coder,
    evaluation.md §5); a skip transcoder keeps its skip term.
    """
    kind = coder.cfg.kind
    if coder.cfg.is_transcoder:
        if not hookpoint.has_input:
            raise ValueError(
                f"coder: a {kind} predicts a module's output from its input, and hookpoint {hookpoint.name!r} "
                f"(the residual stream) has no input; use an MLP hookpoint such as layers.{hookpoint.layer}.mlp"
            )
        expected = (hookpoint.d_in, hookpoint.d_out)
    else:
        expected = (hookpoint.d_out, hookpoint.d_out)
    if (coder.d_in, coder.d_out) != expected:
        raise ValueError(
            f"coder: a {kind} with d_in={coder.d_in}, d_out={coder.d_out} does not fit hookpoint "
            f"{hookpoint.name!r}, which needs d_in={expected[0]}, d_out={expected[1]}"
        )

    def to_coder(t: Tensor) -> Tensor:
        return t.reshape(-1, t.shape[-1]).to(device=coder.device, dtype=coder.dtype)

    if ablate is not None:
        ablate = torch.as_tensor(ablate, dtype=torch.bool, device=coder.device)
        if ablate.shape != (coder.num_latents,):
            raise ValueError(
                f"ablate: need a boolean mask over the coder's {coder.num_latents} latents, got shape "
                f"{tuple(ablate.shape)}"
            )

    def reconstruct(module_input: Tensor | None, output: Tensor) -> Tensor:
        x = to_coder(module_input if coder.cfg.is_transcoder else output)
        code = coder.encode(x)
        if ablate is not None:
            keep = ~(ablate[code.indices] if code.indices is not None else ablate)
            code = code._replace(values=code.values * keep.to(code.values.dtype))
        y_hat = coder.decode(code, x)
        return y_hat.reshape(output.shape).to(device=output.device, dtype=output.dtype)

    # Training mode would sample (binary_groupmax) or move the batch threshold (batchtopk).
    was_training = coder.training
    coder.eval()
    try:
        with _replaced_output(loaded, hookpoint, reconstruct):
            yield
    finally:
        coder.train(was_training)


@contextmanager
def zero_ablate(loaded: LoadedModel, hookpoint: Hookpoint) -> Iterator[None]:
    """While active, the module at `hookpoint` outputs zeros (for an MLP: as if it were removed)."""
    with _replaced_output(loaded, hookpoint, lambda module_input, output: torch.zeros_like(output)):
        yield


@torch.no_grad()
def mlp_neurons(loaded: LoadedModel, hookpoint: Hookpoint, mlp_input: Tensor) -> Tensor:
    """The MLP's own neurons on `mlp_input` (tokens x d_model, the hookpoint's input): the input of its output
    projection, e.g. act(gate_proj(x)) * up_proj(x) for a Llama MLP. The baseline dictionary of
    evaluation.md §3a, once made sparse per token."""
    if not hookpoint.has_input:
        raise ValueError(f"hookpoint {hookpoint.name!r}: MLP neurons need an MLP hookpoint, e.g. layers.N.mlp")
    mlp = loaded.model.get_submodule(hookpoint.module_path)
    linears = [m for m in mlp.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"hookpoint {hookpoint.name!r}: its MLP has no linear output projection")
    seen: list[Tensor] = []
    handle = linears[-1].register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
    try:
        param = next(mlp.parameters())
        mlp(mlp_input.to(param.device, param.dtype))
    finally:
        handle.remove()
    return seen[0].float()
