"""`SparseCoder`: one module for binary and continuous SAEs, transcoders and skip transcoders.

    pre   = W_enc x' + b_enc          x' = x - b_dec (SAE) or x (transcoder)
    z     = act(pre)                  topk, groupmax, batchtopk, jumprelu, binary_*
    y_hat = z W_dec + b_dec (+ x W_skip)

Fixed-count activations (topk, groupmax, binary_topk, and binary_groupmax at eval) produce a
sparse code (values and indices, N x k): the decoder is an embedding bag and the encoder's backward
touches only the selected latents. The others produce a dense code (N x M).

Checkpoints are a folder with `sae.safetensors` and `cfg.json`, the layout EleutherAI's sparsify
and delphi read; never pickle.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from bae_core.coders.config import CoderConfig
from bae_core.coders.ops import binary_step, gather_linear, jump_relu, sparse_decode, topk_indices

# Activations whose code is (values, indices) with k entries per row during training.
SPARSE_CODE_ACTIVATIONS = frozenset({"topk", "groupmax", "binary_topk"})


class Code(NamedTuple):
    """Latent code of a batch: sparse (values and indices, N x k) or dense (values N x M, indices None)."""

    values: Tensor
    indices: Tensor | None

    def to_dense(self, num_latents: int) -> Tensor:
        if self.indices is None:
            return self.values
        dense = self.values.new_zeros(self.values.shape[0], num_latents)
        return dense.scatter_add_(1, self.indices, self.values)

    def firing_counts(self, num_latents: int) -> Tensor:
        """How many rows of the batch each latent is non-zero on."""
        if self.indices is None:
            return (self.values != 0).sum(0)
        active = self.indices[self.values != 0]
        return torch.bincount(active, minlength=num_latents)

    def l0(self) -> Tensor:
        """Number of non-zero latents per row."""
        return (self.values != 0).sum(-1)


@dataclass
class ForwardOutput:
    """Everything one forward pass computes that training and evaluation read."""

    output: Tensor
    """Reconstruction y_hat (N x d_out)."""
    code: Code
    """The latent code z."""
    fvu: Tensor
    """Fraction of variance unexplained: sum ||y - y_hat||^2 / sum ||y - mean(y)||^2."""
    pre_acts: Tensor
    """Dense pre-activations (N x M), without autograd history (in the `workspace` when `forward` was given one)."""


class SparseCoder(nn.Module):
    """A sparse autoencoder or (skip) transcoder with a continuous or binary latent activation."""

    def __init__(
        self,
        cfg: CoderConfig,
        d_in: int,
        d_out: int | None = None,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if isinstance(d_in, bool) or not isinstance(d_in, int) or d_in <= 0:
            raise ValueError(f"d_in: must be a positive integer, got {d_in!r}")
        if cfg.is_transcoder and d_out is None:
            raise ValueError(f"d_out: a {cfg.kind} predicts another module's output, so it needs an output dimension")
        d_out = d_in if d_out is None else d_out
        if isinstance(d_out, bool) or not isinstance(d_out, int) or d_out <= 0:
            raise ValueError(f"d_out: must be a positive integer, got {d_out!r}")
        if not cfg.is_transcoder and d_out != d_in:
            raise ValueError(f"d_out: an sae reconstructs its input, so d_out must equal d_in={d_in}, got {d_out}")

        self.cfg = cfg
        self.d_in, self.d_out = d_in, d_out
        self.num_latents = cfg.latents_for(d_in)

        self.encoder = nn.Linear(d_in, self.num_latents, device=device, dtype=dtype)
        self.encoder.bias.data.zero_()
        if cfg.is_transcoder or cfg.activation == "binary_groupmax":
            # Transcoders start from a zero decoder (method.md). So does a Gumbel binary SAE: it fires
            # exactly one latent per group on every token, so a tied unit-norm start would add k random
            # unit vectors to every reconstruction; from zero, each group can learn a "nothing" latent.
            self.W_dec = nn.Parameter(torch.zeros(self.num_latents, d_out, device=device, dtype=dtype))
        else:
            self.W_dec = nn.Parameter(self.encoder.weight.data.clone())
            if cfg.normalize_decoder:
                self.set_decoder_norm_to_unit_norm()
        self.b_dec = nn.Parameter(torch.zeros(d_out, device=device, dtype=dtype))
        self.W_skip = nn.Parameter(torch.zeros(d_out, d_in, device=device, dtype=dtype)) if cfg.has_skip else None
        self.log_threshold = (
            nn.Parameter(torch.full((self.num_latents,), math.log(cfg.init_threshold), device=device, dtype=dtype))
            if cfg.has_threshold
            else None
        )
        if cfg.activation == "batchtopk":
            # Inference threshold: running mean of the smallest activation the batch top-k kept.
            self.register_buffer("batch_threshold", torch.zeros((), device=device, dtype=dtype))
        else:
            self.batch_threshold = None

    # ---- properties ------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.encoder.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.weight.dtype

    @property
    def normalizes_decoder(self) -> bool:
        # A binary latent's magnitude lives in its decoder row, so only continuous SAEs are normalised.
        return not self.cfg.is_transcoder and not self.cfg.is_binary and self.cfg.normalize_decoder

    @property
    def threshold(self) -> Tensor | None:
        return None if self.log_threshold is None else self.log_threshold.exp()

    # ---- forward ---------------------------------------------------------------------------------

    def encoder_input(self, x: Tensor) -> Tensor:
        return x if self.cfg.is_transcoder else x - self.b_dec

    def pre_activations(self, x: Tensor) -> Tensor:
        """Dense pre-activations W_enc x' + b_enc, without autograd (for selection and analysis)."""
        with torch.no_grad():
            return F.linear(self.encoder_input(x), self.encoder.weight, self.encoder.bias)

    def _pre_activations_into(self, xin: Tensor, workspace: dict) -> Tensor:
        """`F.linear(xin, W_enc, b_enc)` without autograd, written into the reused buffer `workspace["pre"]`
        (a fresh N x M tensor costs its page faults on every call on the CPU). Autocast does not apply to
        `out=` calls, so its cast is made here: the same addmm on the same operands as F.linear under autocast."""
        w, b = self.encoder.weight, self.encoder.bias
        with torch.no_grad():
            device = xin.device.type
            if torch.is_autocast_enabled(device):
                dtype = torch.get_autocast_dtype(device)
                xin, w, b = xin.to(dtype), w.to(dtype), b.to(dtype)
            out = _reused(workspace, "pre", (xin.shape[0], w.shape[0]), xin)
            return torch.addmm(b, xin, w.t(), out=out)

    def _sparse_encoder_input(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """The encoder input for `gather_linear` and the `shift` it takes: an SAE's b_dec gets its gradient as
        a shift (a matvec) instead of through an N x d grad_x, unless x itself needs a gradient."""
        shift = None if self.cfg.is_transcoder or x.requires_grad else self.b_dec
        with torch.set_grad_enabled(torch.is_grad_enabled() and shift is None):
            return self.encoder_input(x), shift

    def encode(self, x: Tensor) -> Code:
        """Latent code of `x` (N x d_in)."""
        return self._encode(x)[0]

    def _encode(self, x: Tensor, workspace: dict | None = None) -> tuple[Code, Tensor]:
        """The code and the dense pre-activations (detached) of `x`; `workspace`: see `forward`."""
        cfg, k, act = self.cfg, self.cfg.k, self.cfg.activation
        w, b = self.encoder.weight, self.encoder.bias

        if act in SPARSE_CODE_ACTIVATIONS or (act == "binary_groupmax" and not self.training):
            # The dense matmul runs once without autograd to choose the latents; gradients flow only
            # through the selected entries (`gather_linear`), so backward costs O(N k d).
            xin, shift = self._sparse_encoder_input(x)
            if workspace is None:
                with torch.no_grad():
                    pre = F.linear(xin, w, b)
            else:
                pre = self._pre_activations_into(xin.detach(), workspace)

            def selected(indices: Tensor) -> Tensor:
                return gather_linear(xin, w, b, indices, pre.gather(1, indices), shift).to(self.dtype)

            if act == "topk":
                indices = topk_indices(pre, k)
                return Code(F.relu(selected(indices)), indices), pre
            if act == "groupmax":
                indices = self._group_argmax(pre)
                return Code(F.relu(selected(indices)), indices), pre
            if act == "binary_topk":
                theta = self.threshold
                theta_sel = theta.detach().to(pre.dtype)
                if workspace is None:
                    scores = pre - theta_sel
                else:
                    scores = torch.sub(pre, theta_sel, out=_reused(workspace, "scores", pre.shape, pre))
                indices = topk_indices(scores, k)
                z = binary_step(selected(indices), theta[indices], cfg.surrogate, cfg.temperature)
                return Code(z, indices), pre
            indices = self._group_argmax(pre)  # binary_groupmax at eval: argmax of each group
            return Code(torch.ones(indices.shape, dtype=self.dtype, device=x.device), indices), pre

        # Dense codes: the gradient reaches every latent, so autograd runs through the matmul.
        dense_pre = F.linear(self.encoder_input(x), w, b).to(self.dtype)
        pre = dense_pre.detach()
        if act == "binary_groupmax":
            # Hard Gumbel-softmax sample per group; the gradient is the soft sample's.
            logits = dense_pre.float().unflatten(-1, (k, -1))
            z = F.gumbel_softmax(logits, tau=cfg.gumbel_tau, hard=True, dim=-1)
            return Code(z.flatten(1).to(self.dtype), None), pre
        if act == "binary_threshold":
            return Code(binary_step(dense_pre, self.threshold, cfg.surrogate, cfg.temperature), None), pre
        if act == "jumprelu":
            return Code(jump_relu(dense_pre, self.threshold, cfg.surrogate, cfg.temperature), None), pre
        if act == "batchtopk":
            acts = F.relu(dense_pre)
            if not self.training:
                return Code(acts * (pre > self.batch_threshold), None), pre
            top = pre.flatten().topk(k * pre.shape[0], sorted=False)
            mask = torch.zeros(pre.numel(), dtype=torch.bool, device=pre.device).index_fill_(0, top.indices, True)
            kept = top.values[top.values > 0]
            if kept.numel():
                with torch.no_grad():
                    smallest = kept.min().to(self.batch_threshold.dtype)
                    if self.batch_threshold == 0:  # first training batch
                        self.batch_threshold.copy_(smallest)
                    else:
                        self.batch_threshold.lerp_(smallest, 0.01)
            return Code(acts * mask.view_as(acts), None), pre
        raise AssertionError(f"unhandled activation {act}")  # CoderConfig validates the name

    def dead_latent_code(self, x: Tensor, pre: Tensor, dead: Tensor, k_aux: int) -> tuple[Tensor, Tensor]:
        """ReLU values and indices of the top `k_aux` dead latents per row (for the AuxK loss)."""
        masked = torch.where(dead, pre, torch.finfo(pre.dtype).min)
        indices = masked.topk(k_aux, dim=-1, sorted=False).indices
        w, b = self.encoder.weight, self.encoder.bias
        xin, shift = self._sparse_encoder_input(x)
        values = gather_linear(xin, w, b, indices, pre.gather(1, indices), shift).to(self.dtype)
        return F.relu(values), indices

    def _group_argmax(self, pre: Tensor) -> Tensor:
        k = self.cfg.k
        group = self.num_latents // k
        offsets = torch.arange(0, self.num_latents, group, device=pre.device)
        return pre.unflatten(-1, (k, group)).argmax(-1) + offsets

    def decode(self, code: Code, x: Tensor | None = None) -> Tensor:
        """y_hat from a code; `x` is needed for the skip term of a skip transcoder."""
        if code.indices is None:
            out = code.values.to(self.W_dec.dtype) @ self.W_dec
        elif torch.is_grad_enabled() and self.W_dec.device.type == "cpu":
            # The same embedding bag with a faster weight gradient (one sparse matmul) on the CPU.
            out = sparse_decode(code.values, code.indices, self.W_dec)
        else:
            out = F.embedding_bag(
                code.indices, self.W_dec, per_sample_weights=code.values.to(self.W_dec.dtype), mode="sum"
            )
        out = out + self.b_dec
        if self.W_skip is not None:
            if x is None:
                raise ValueError("x: a skip transcoder's decode needs the input for its skip term")
            out = out + F.linear(x.to(self.W_skip.dtype), self.W_skip)
        return out

    def forward(self, x: Tensor, y: Tensor | None = None, *, workspace: dict | None = None) -> ForwardOutput:
        """Encode and decode `x`; FVU is measured against `y` (defaults to `x` for an SAE).

        `workspace`: a dict of buffers that the caller keeps from call to call, so that the N x M pre-activations
        (and scores) reuse their memory; the returned `pre_acts` then live in it and are overwritten by the next
        call with the same workspace. The trainer passes one on the CPU; the results are the same without.
        """
        if x.ndim != 2 or x.shape[-1] != self.d_in:
            raise ValueError(f"x: expected shape (batch, {self.d_in}), got {tuple(x.shape)}")
        if y is None:
            if self.cfg.is_transcoder:
                raise ValueError(f"y: a {self.cfg.kind} needs the target activations y")
            y = x
        elif y.shape != (x.shape[0], self.d_out):
            raise ValueError(f"y: expected shape ({x.shape[0]}, {self.d_out}), got {tuple(y.shape)}")
        code, pre = self._encode(x, workspace)
        out = self.decode(code, x)
        fvu = fraction_of_variance_unexplained(y, out)
        return ForwardOutput(out, code, fvu, pre)

    # ---- decoder norm ----------------------------------------------------------------------------

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        eps = torch.finfo(self.W_dec.dtype).eps
        self.W_dec.data /= self.W_dec.data.norm(dim=1, keepdim=True) + eps

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        if self.W_dec.grad is None:
            return
        # On the CPU block by block of rows: the same values, with temporaries that stay in cache (an M x d
        # temporary costs its page faults on every step); on a GPU in one go (a block is a kernel launch).
        rows = max(1, 2**16 // self.W_dec.shape[1]) if self.W_dec.device.type == "cpu" else self.num_latents
        for grad, w in zip(self.W_dec.grad.split(rows), self.W_dec.data.split(rows), strict=True):
            grad -= (grad * w).sum(1, keepdim=True) * w

    # ---- save / load -----------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write `sae.safetensors` and `cfg.json` into the folder `path` (created if needed)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().contiguous() for name, t in self.state_dict().items()}
        save_file(tensors, str(path / "sae.safetensors"), metadata={"format": "pt"})
        meta = {**self.cfg.to_dict(), "d_in": self.d_in, "d_out": self.d_out, "num_latents": self.num_latents}
        (path / "cfg.json").write_text(json.dumps(meta, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> SparseCoder:
        """Read a coder written by `save` (or a continuous coder written by sparsify) exactly."""
        path = Path(path)
        cfg_path, weights_path = path / "cfg.json", path / "sae.safetensors"
        for p in (cfg_path, weights_path):
            if not p.is_file():
                raise FileNotFoundError(f"{p}: missing; a coder folder holds sae.safetensors and cfg.json")
        meta = json.loads(cfg_path.read_text())
        d_in = meta.pop("d_in")
        d_out = meta.pop("d_out", d_in)
        cfg = CoderConfig.from_dict(meta)
        tensors = load_file(str(weights_path), device=str(device))
        dtype = tensors["encoder.weight"].dtype
        coder = cls(cfg, d_in, d_out if cfg.is_transcoder else None, device=device, dtype=dtype)
        coder.load_state_dict(tensors, strict=True)
        return coder


def fraction_of_variance_unexplained(y: Tensor, y_hat: Tensor) -> Tensor:
    """sum ||y - y_hat||^2 / sum ||y - mean_batch(y)||^2."""
    y = y.to(y_hat.dtype)
    with torch.autocast(y_hat.device.type, enabled=False):  # in y_hat's dtype, as (y - y_hat).pow(2).sum() would be
        # mse_loss: the same squares and sum in one pass each way (forward and backward) instead of three.
        total = F.mse_loss(y, y.mean(0).expand_as(y), reduction="sum")
        return F.mse_loss(y_hat, y, reduction="sum") / total.clamp_min(torch.finfo(total.dtype).tiny)


_THREAD_LOCAL = threading.local()


def thread_workspace() -> dict:
    """This thread's dict of reusable buffers for `SparseCoder.forward`'s `workspace`: the trainers that step in one
    thread (one at a time) share one set, so a process holds one N x M buffer per thread, not one per coder;
    `Trainer.eval_mode` (checkpoints, the end of `fit`) empties it."""
    if not hasattr(_THREAD_LOCAL, "workspace"):
        _THREAD_LOCAL.workspace = {}
    return _THREAD_LOCAL.workspace


def _reused(workspace: dict, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """The buffer `workspace[name]` of `shape` with `like`'s dtype and device, (re)allocated when it does not fit."""
    buf = workspace.get(name)
    if buf is None or buf.shape != shape or buf.dtype != like.dtype or buf.device != like.device:
        buf = workspace[name] = torch.empty(shape, dtype=like.dtype, device=like.device)
    return buf
