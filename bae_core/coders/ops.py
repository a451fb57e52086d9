"""Autograd building blocks of the coders: sparse gradients and straight-through estimators.

- `gather_linear`: selected entries of `x @ W.T + b`, whose backward touches only those entries
  (so a top-k encoder's gradient costs O(N k d), not a second dense matmul).
- `sparse_decode`: the embedding-bag decoder `sum_j values[:, j] W[indices[:, j]]` whose weight gradient is
  one sparse matmul.
- `binary_step`: the hard 0/1 step `pre > theta` with a surrogate derivative (straight-through).
- `jump_relu`: `pre * (pre > theta)` with the surrogate derivative for theta.
- `surrogate_grad`: the surrogates of the step function's derivative.
- `topk_indices`: torch.topk's indices, from a smaller candidate set on the CPU.
"""

from __future__ import annotations

import warnings

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


# Results at least this large (bytes) take the CSR sparse matmul: MKL's, threaded and about twice as fast for
# outputs that leave the cache; below it, the COO one (single-threaded but faster for small outputs on one core).
# Per step of grad_W (4096 tokens, d 576, one thread / two threads): 4608 latents, k 32: COO 14 / 11 ms, CSR
# 22 / 7 ms; 9216, k 64: COO 50 / 53, CSR 35 / 19; 18432, k 128: COO 180 / 182, CSR 91 / 49 (sort included: 6-11).
_CSR_MIN_BYTES = 16 * 2**20


def _selection_matmul(indices: Tensor, values: Tensor, num_rows: int, dense: Tensor) -> Tensor:
    """S @ dense for the sparse S (num_rows x N) with values[n, j] at (indices[n, j], n): row m of the result is
    the sum of values[n, j] * dense[n] over the (n, j) with indices[n, j] = m (the weight gradient of a top-k
    encoder or of an embedding-bag decoder)."""
    n, k = indices.shape
    flat, flat_values = indices.reshape(-1), values.reshape(-1)
    out_bytes = num_rows * dense.shape[1] * dense.element_size()
    if dense.device.type != "cpu":
        rows = torch.arange(n, device=indices.device).repeat_interleave(k)
        coo = torch.sparse_coo_tensor(torch.stack([flat, rows]), flat_values, (num_rows, n), check_invariants=False)
        return torch.sparse.mm(coo, dense)
    if out_bytes >= _CSR_MIN_BYTES and torch.backends.mkl.is_available() and dense.dtype == torch.float32:
        order = torch.argsort(flat, stable=True)  # by row m, tokens in order within each
        crow = flat.new_zeros(num_rows + 1)
        torch.cumsum(torch.bincount(flat, minlength=num_rows), 0, out=crow[1:])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR tensor support is in beta state"
            csr = torch.sparse_csr_tensor(crow, order // k, flat_values[order], (num_rows, n), check_invariants=False)
            return csr @ dense
    rows = torch.arange(n, device=indices.device).repeat_interleave(k)
    coo = torch.sparse_coo_tensor(torch.stack([flat, rows]), flat_values, (num_rows, n), check_invariants=False)
    # An addmm onto an expanded zero: torch.sparse.mm adds to a zeros tensor of the result's size, a second
    # zero-filled M x d allocation.
    zero = dense.new_zeros(1, 1).expand(num_rows, dense.shape[1])
    return torch.sparse.addmm(zero, coo, dense, beta=0)


class _GatherLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, indices, selected, shift):
        ctx.save_for_backward(x, weight, indices)
        ctx.num_bias = bias.shape[0]
        return selected

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, indices = ctx.saved_tensors
        num_latents = ctx.num_bias
        flat_idx = indices.reshape(-1)
        grad = grad.to(weight.dtype)
        grad_x = grad_w = grad_b = grad_shift = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(indices, weight, per_sample_weights=grad, mode="sum").to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = _selection_matmul(indices, grad, num_latents, x.to(weight.dtype))
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[5]:
            grad_b = torch.zeros(num_latents, dtype=weight.dtype, device=weight.device)
            grad_b.index_add_(0, flat_idx, grad.reshape(-1))
        if ctx.needs_input_grad[5]:
            # x = x_0 - shift, so d/d shift = -sum_n grad_x[n] = -sum_m grad_b[m] W[m]: a matvec, not N x k rows.
            grad_shift = -(grad_b @ weight).to(x.dtype)
        return grad_x, grad_w, grad_b if ctx.needs_input_grad[2] else None, None, None, grad_shift


def gather_linear(
    x: Tensor, weight: Tensor, bias: Tensor, indices: Tensor, selected: Tensor, shift: Tensor | None = None
) -> Tensor:
    """`(x @ weight.T + bias).gather(1, indices)` given its already computed value `selected`.

    The forward pass reuses `selected` (the dense pre-activations were computed once, without
    autograd, to choose `indices`); the backward pass only touches the selected entries:
    grad_weight = G.T @ x with G sparse (N x M, N*k non-zeros), grad_x by an embedding bag.
    `shift`, when given, is a vector that `x` was computed from as `x = x_0 - shift` (an SAE's encoder
    input `x - b_dec`): it gets its gradient `-sum_n grad_x[n]` as `-(grad_bias @ weight)`, without the N x d
    grad_x (pass `x` detached then).
    """
    return _GatherLinear.apply(x, weight, bias, indices, selected, shift)


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values: Tensor, indices: Tensor, weight: Tensor) -> Tensor:
        n, k = indices.shape
        flat_idx = indices.reshape(-1)
        offsets = torch.arange(0, n * k, k, device=indices.device)
        per_sample = values.reshape(-1).to(weight.dtype)
        out, offset2bag, _, _ = torch.ops.aten._embedding_bag(weight, flat_idx, offsets, False, 0, False, per_sample)
        ctx.save_for_backward(per_sample, indices, weight, offsets, offset2bag)
        ctx.values_dtype = values.dtype
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        per_sample, indices, weight, offsets, offset2bag = ctx.saved_tensors
        grad_values = grad_w = None
        if ctx.needs_input_grad[0]:
            # What F.embedding_bag's own backward computes for per_sample_weights: grad[n] . W[indices[n, j]].
            grad_values = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                grad, weight, indices.reshape(-1), offsets, offset2bag, 0
            )
            grad_values = grad_values.view(indices.shape).to(ctx.values_dtype)
        if ctx.needs_input_grad[2]:
            # The sums of embedding_bag's dense weight backward, as a sparse matmul: 2-3x faster on the CPU.
            grad_w = _selection_matmul(indices, per_sample, weight.shape[0], grad.to(weight.dtype))
        return grad_values, None, grad_w


def sparse_decode(values: Tensor, indices: Tensor, weight: Tensor) -> Tensor:
    """`F.embedding_bag(indices, weight, per_sample_weights=values, mode="sum")`: row n is
    `sum_j values[n, j] * weight[indices[n, j]]`; the weight's gradient is one sparse matmul."""
    return _SparseDecode.apply(values, indices, weight)


def topk_indices(scores: Tensor, k: int) -> Tensor:
    """`scores.topk(k, dim=-1, sorted=False).indices` (N x M scores), faster on the CPU for rows much wider than k.

    The fast path returns the k largest entries of each row, NaN counted as the largest, in descending order of
    value, which is what torch.topk returns on the CPU in that regime (k * 64 <= M, where it partial-sorts): the
    same indices in the same order whenever a row's top k + 1 values are distinct. Among equal values, torch.topk
    defines no rule and neither does this: every entry larger than the row's k-th largest value is kept, and as
    many of those equal to it as make k, but which of the equal ones (and their order) may differ from
    torch.topk's choice; with bf16 scores such ties are common.

    How: the columns are cut into G strided chunks of S (chunk c holds columns c, c + G, c + 2G, ...). The k
    chunks with the largest maxima hold every entry above the k-th largest chunk maximum t and k entries >= t,
    and the row's k-th largest value is >= t, so the k largest entries of the row are among their k * S entries;
    torch.topk runs on those G maxima and k * S candidates instead of all M entries.
    """
    n, m = scores.shape
    chunk = _chunk_size(m, k) if scores.device.type == "cpu" and scores.is_contiguous() else 0
    if not chunk:
        return scores.topk(k, dim=-1, sorted=False).indices
    groups = m // chunk
    strided = scores.view(n, chunk, groups)  # [n, s, c] = scores[n, s * G + c]
    best = strided.amax(1).topk(k, dim=-1, sorted=False).indices  # N x k chunks
    candidates = strided.gather(2, best.unsqueeze(1).expand(n, chunk, k))  # [n, s, j]: entry s of chunk best[n, j]
    picked = candidates.view(n, chunk * k).topk(k, dim=-1, sorted=True).indices  # s * k + j
    return best.gather(1, picked % k) + (picked // k) * groups


def _chunk_size(m: int, k: int) -> int:
    """The chunk size S (a divisor of m) that makes G + k * S, the entries both topk calls read, smallest; 0 (one
    torch.topk) unless k * 64 <= m (torch.topk's partial-sort regime) and G + k * S <= m / 3."""
    if k * 64 > m:
        return 0
    best = min((s for s in range(2, m // k + 1) if m % s == 0), key=lambda s: m // s + k * s, default=0)
    return best if best and m // best + k * best <= m // 3 else 0
