"""The CPU fast paths of the training step give what the plain computation gives: the two-stage top-k against
torch.topk, the coder's sparse forward and backward (reused buffers, sparse decoder gradient, b_dec as a shift)
against dense autograd, the storage-swapping schedule-free wrapper against schedulefree's own."""

import math

import pytest
import torch
import torch.nn.functional as F
from schedulefree import ScheduleFreeWrapper

from bae_core import CoderConfig, TrainConfig, Trainer, build_coder
from bae_core.coders import ops
from bae_core.coders.coder import thread_workspace
from bae_core.coders.ops import _chunk_size, binary_step, topk_indices
from bae_core.training.config import ScheduleFree, SignSGD


@pytest.mark.parametrize(
    "n, m, k",
    [(3, 2304, 32), (1, 2304, 32), (2, 8192, 128), (4, 4096, 1), (5, 64, 64), (3, 2311, 8), (6, 512, 16)],
)
def test_topk_indices_equal_torch_topk_without_ties(n, m, k):
    scores = torch.randn(n, m, generator=torch.Generator().manual_seed(m + k))
    got = topk_indices(scores, k)
    want = scores.topk(k, dim=-1, sorted=False).indices
    assert torch.equal(got, want)  # the same indices in the same order
    # The first four take the two-stage path; k = M, a prime M and a narrow row take torch.topk itself.
    assert bool(_chunk_size(m, k)) == (m in (2304, 8192, 4096))


def test_topk_indices_with_ties_nan_and_inf_keep_a_valid_top_k():
    k, m = 16, 2048
    g = torch.Generator().manual_seed(0)
    scores = (torch.randn(8, m, generator=g) * 2).bfloat16()  # bf16: many equal values near the k-th
    scores[1] = 0.5  # every entry equal
    scores[2, 7] = float("nan")
    scores[3, [5, 900]] = float("inf")
    scores[4] = float("-inf")
    scores[4, 1000:1005] = 1.0
    scores[5, ::3] = float("nan")  # more NaNs than k: NaN counts as the largest, as in torch.topk
    assert _chunk_size(m, k)
    got = topk_indices(scores, k)
    want = scores.topk(k, dim=-1, sorted=False).values.float()
    values = scores.gather(1, got).float()
    assert torch.equal(values.nan_to_num(9e9), want.nan_to_num(9e9))  # the same values in the same order
    for row, idx in zip(scores.float(), got, strict=True):
        assert idx.unique().numel() == k
        kth = row.nan_to_num(9e9).topk(k).values[-1]
        above = (row.nan_to_num(9e9) > kth).nonzero().flatten()
        assert set(above.tolist()) <= set(idx.tolist())  # every entry above the k-th value is kept


class _ValueOf(torch.autograd.Function):
    """Forward: `value` as float32; backward: the gradient goes to `carrier`, rounded to value's dtype first (what
    a bf16 matmul under autocast receives), then accumulates in float32."""

    @staticmethod
    def forward(ctx, value, carrier):
        ctx.dtype = value.dtype
        return value.float()

    @staticmethod
    def backward(ctx, grad):
        return None, grad.to(ctx.dtype).float()


def _dense_reference(coder, x, target, precision):
    """Output and gradients of the same code by plain dense autograd, at the latents the coder selects: the
    values of the (autocast) encoder matmul, the gradients of its float32 twin."""
    cfg = coder.cfg
    params = {name: p.detach().clone().requires_grad_() for name, p in coder.named_parameters()}
    w, b, w_dec, b_dec = params["encoder.weight"], params["encoder.bias"], params["W_dec"], params["b_dec"]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        pre = F.linear(x - b_dec, w, b)
        code = coder.encode(x)
    selected = _ValueOf.apply(pre.gather(1, code.indices), F.linear(x - b_dec, w, b).gather(1, code.indices))
    if cfg.activation == "topk":
        z = F.relu(selected)
    else:
        theta = params["log_threshold"].exp()
        z = binary_step(selected, theta[code.indices], cfg.surrogate, cfg.temperature)
    out = torch.zeros(x.shape[0], coder.num_latents).scatter_add(1, code.indices, z) @ w_dec + b_dec
    (out - target).pow(2).sum().backward()
    return out.detach(), {name: p.grad for name, p in params.items()}, pre, code


@pytest.mark.parametrize("activation", ["topk", "binary_topk"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("batch, latents, k", [(64, 2304, 32), (1, 2304, 32), (16, 64, 63)])
def test_coder_training_forward_and_backward_match_dense_autograd(activation, precision, batch, latents, k):
    cfg = CoderConfig(activation=activation, k=k, num_latents=latents, init_threshold=0.05)
    coder = build_coder(cfg, 16, seed=1)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(batch, 16, generator=g) * 2 + 0.3
    target = torch.randn(batch, 16, generator=g)
    with torch.no_grad():
        coder.b_dec.copy_(x.mean(0) * 0.5)
    trainer = Trainer(coder, TrainConfig(precision=precision, log_every=0))
    with trainer.autocast():
        out = coder(x, workspace=thread_workspace())  # the reused buffers that Trainer.step passes on the CPU
        plain = coder(x)  # no workspace: fresh buffers, the same results
    assert torch.equal(out.output, plain.output) and torch.equal(out.pre_acts, plain.pre_acts)
    assert torch.equal(out.fvu, plain.fvu)
    (out.output - target).pow(2).sum().backward()
    want_out, want_grads, want_pre, code = _dense_reference(coder, x, target, precision)
    assert torch.equal(out.code.indices, code.indices) and torch.equal(out.pre_acts, want_pre)
    # The selection is a top-k of the (bf16 under autocast) pre-activations, minus theta for binary_topk.
    scores = want_pre if activation == "topk" else want_pre - coder.threshold.detach().to(want_pre.dtype)
    kth = scores.topk(k, dim=-1).values[:, -1:]
    assert torch.equal(scores.gather(1, out.code.indices).min(1, keepdim=True).values, kth)
    assert ((scores > kth).sum(1) < k).all()
    torch.testing.assert_close(out.output, want_out, rtol=1e-5, atol=1e-5)
    if batch > 1:
        torch.testing.assert_close(out.fvu, (x - want_out).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    for name, p in coder.named_parameters():
        torch.testing.assert_close(p.grad, want_grads[name], rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("min_bytes", [0, math.inf], ids=["csr", "coo"])
def test_selection_matmul_sums_each_latents_tokens_on_both_paths(monkeypatch, min_bytes):
    monkeypatch.setattr(ops, "_CSR_MIN_BYTES", min_bytes)  # the wide coders' CSR path, or the COO one
    g = torch.Generator().manual_seed(4)
    indices = torch.randn(50, 40, generator=g).topk(6, dim=-1).indices
    values, dense = torch.randn(50, 6, generator=g), torch.randn(50, 7, generator=g)
    want = torch.zeros(50, 40).scatter_(1, indices, values).T @ dense
    torch.testing.assert_close(ops._selection_matmul(indices, values, 40, dense), want)


def test_blockwise_decoder_gradient_projection_equals_the_whole_matrix_one():
    coder = build_coder(CoderConfig(activation="topk", k=8, num_latents=2500), 64)  # 1024-row blocks: 3
    coder.W_dec.grad = torch.randn(2500, 64, generator=torch.Generator().manual_seed(5))
    grad, w = coder.W_dec.grad.clone(), coder.W_dec.detach()
    coder.remove_gradient_parallel_to_decoder_directions()
    assert torch.equal(coder.W_dec.grad, grad - (grad * w).sum(1, keepdim=True) * w)


def test_storage_swapping_schedule_free_matches_schedulefree_exactly():
    g = torch.Generator().manual_seed(3)
    start = [torch.randn(6, 5, generator=g), torch.randn(5, generator=g)]
    runs = []
    for wrapper in (ScheduleFreeWrapper, ScheduleFree):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        opt = wrapper(SignSGD(params, lr=0.1), momentum=0.9)
        opt.train()
        for step in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step))
            opt.step()
            opt.zero_grad()
            if step == 1:
                opt.eval()
                opt.train()
        runs.append([p.detach().clone() for p in params] + [opt.state[p]["z"].clone() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def test_finite_batch_whose_sum_overflows_is_accepted():
    trainer = Trainer(build_coder(CoderConfig(activation="topk", k=2, num_latents=8), 4), TrainConfig(log_every=0))
    x = torch.full((3, 4), 3e38)  # finite, but the one-pass check's sum overflows: the exact count decides
    trainer._prepare(x, None)
    x[1, 2] = math.inf
    with pytest.raises(ValueError, match="x: training batch 0 contains 1 NaN or inf"):
        trainer._prepare(x, None)
