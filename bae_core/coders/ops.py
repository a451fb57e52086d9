"""Autograd building blocks of the coders: sparse gradients and straight-through estimators.

- `gather_linear`: selected entries of `x @ W.T + b`, whose backward touches only those entries
  (so a top-k encoder's gradient costs O(N k d), not a second dense matmul).
- `binary_step`: the hard 0/1 step `pre > theta` with a surrogate derivative (straight-through).
- `jump_relu`: `pre * (pre > theta)` with the surrogate derivative for theta.
- `surrogate_grad`: the surrogates of the step function's derivative.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

SURROGATE_IDS = {"sigmoid": 0, "rectangle": 1, "identity": 2}


def surrogate_grad(u: Tensor, surrogate: str, temperature: float) -> Tensor:
    """Surrogate s(u) for d step(u) / du at u = pre - theta (method.md)."""
    if surrogate == "sigmoid":
        sig = torch.sigmoid(u / temperature)
        return sig * (1 - sig)
    if surrogate == "rectangle":
        return ((u / temperature).abs() < 0.5).to(u.dtype)
    if surrogate == "identity":
        return torch.ones_like(u)
    raise ValueError(f"surrogate: {surrogate!r} is not allowed; choose one of {', '.join(SURROGATE_IDS)}")


class _BinaryStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre: Tensor, theta: Tensor, surrogate: str, temperature: float) -> Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.surrogate, ctx.temperature = surrogate, temperature
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, theta = ctx.saved_tensors
        s = grad * surrogate_grad(pre - theta, ctx.surrogate, ctx.temperature)
        grad_theta = -s if ctx.needs_input_grad[1] else None
        if grad_theta is not None and theta.shape != pre.shape:
            grad_theta = grad_theta.sum_to_size(theta.shape)
        return s, grad_theta, None, None


def binary_step(pre: Tensor, theta: Tensor, surrogate: str, temperature: float) -> Tensor:
    """z = 1[pre > theta]; backward: dz/dpre = s(u), dz/dtheta = -s(u), u = pre - theta."""
    return _BinaryStep.apply(pre, theta, surrogate, temperature)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre: Tensor, theta: Tensor, surrogate: str, temperature: float) -> Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.surrogate, ctx.temperature = surrogate, temperature
        return pre * (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, theta = ctx.saved_tensors
        gate = (pre > theta).to(pre.dtype)
        grad_theta = None
        if ctx.needs_input_grad[1]:
            # d/dtheta of pre * H(pre - theta) = -pre * delta(pre - theta) ~ -theta * s(u)
            grad_theta = -(grad * theta * surrogate_grad(pre - theta, ctx.surrogate, ctx.temperature))
            grad_theta = grad_theta.sum_to_size(theta.shape)
        return grad * gate, grad_theta, None, None


def jump_relu(pre: Tensor, theta: Tensor, surrogate: str, temperature: float) -> Tensor:
    """JumpReLU: exact gradient for pre where the gate is open, surrogate gradient for theta."""
    return _JumpReLU.apply(pre, theta, surrogate, temperature)


class _GatherLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, indices: Tensor, selected: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight, indices)
        ctx.num_bias = bias.shape[0]
        return selected

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, indices = ctx.saved_tensors
        n, k = indices.shape
        num_latents = ctx.num_bias
        flat_idx = indices.reshape(-1)
        flat_grad = grad.reshape(-1).to(weight.dtype)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(indices, weight, per_sample_weights=grad.to(weight.dtype), mode="sum")
            grad_x = grad_x.to(x.dtype)
        if ctx.needs_input_grad[1]:
            rows = torch.arange(n, device=x.device).repeat_interleave(k)
            g = torch.sparse_coo_tensor(
                torch.stack([flat_idx, rows]), flat_grad, (num_latents, n), check_invariants=False
            )
            grad_w = torch.sparse.mm(g, x.to(weight.dtype))
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(num_latents, dtype=weight.dtype, device=weight.device)
            grad_b.index_add_(0, flat_idx, flat_grad)
        return grad_x, grad_w, grad_b, None, None


def gather_linear(x: Tensor, weight: Tensor, bias: Tensor, indices: Tensor, selected: Tensor) -> Tensor:
    """`(x @ weight.T + bias).gather(1, indices)` given its already computed value `selected`.

    The forward pass reuses `selected` (the dense pre-activations were computed once, without
    autograd, to choose `indices`); the backward pass only touches the selected entries:
    grad_weight = G.T @ x with G sparse (N x M, N*k non-zeros), grad_x by an embedding bag.
    """
    return _GatherLinear.apply(x, weight, bias, indices, selected)
