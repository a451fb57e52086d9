"""Framework-agnostic training of one sparse coder on any iterable of (x, y) batches.

The `Trainer` owns the coder, the optimiser and the running statistics (dead latents, firing
counts). `Trainer.step` takes one batch; `Trainer.fit` drives an iterable. Ray Train and Ray Tune
call these same methods from their workers, so nothing here knows about Ray.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from schedulefree import ScheduleFreeWrapper
from torch import Tensor

from bae_core.coders.coder import Code, ForwardOutput, SparseCoder, thread_workspace
from bae_core.coders.config import FREE_L0_ACTIVATIONS
from bae_core.coders.ops import binary_step
from bae_core.training.config import ScheduleFree, SignSGD, TrainConfig, default_lr

log = logging.getLogger(__name__)


@dataclass
class StepMetrics:
    """What one training step measured."""

    step: int
    tokens: int
    loss: float
    fvu: float
    auxk_loss: float
    entropy: float
    l0: float
    dead_fraction: float
    lr: float


def build_coder(cfg, d_in: int, d_out: int | None = None, *, seed: int = 0, device: str = "cpu") -> SparseCoder:
    """A freshly initialised coder whose initialisation depends only on `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SparseCoder(cfg, d_in, d_out).to(device)


class Trainer:
    """Trains one `SparseCoder`: loss, optimiser, decoder normalisation, dead-latent tracking."""

    def __init__(self, coder: SparseCoder, cfg: TrainConfig | None = None):
        self.cfg = cfg = cfg or TrainConfig()
        self.device = torch.device(cfg.device)
        self.coder = coder.to(self.device)
        ccfg = coder.cfg
        if cfg.auxk_alpha and ccfg.activation not in ("topk", "groupmax"):
            raise ValueError(f"auxk_alpha: AuxK is defined for continuous topk/groupmax codes, not {ccfg.activation}")
        if cfg.entropy_coef and not ccfg.is_binary:
            raise ValueError(f"entropy_coef: the entropy term is for binary codes, not {ccfg.activation}")
        self.l0_coef = cfg.l0_coef
        if self.l0_coef and ccfg.activation not in FREE_L0_ACTIVATIONS:
            raise ValueError(f"l0_coef: the L0 penalty is for jumprelu and binary_threshold, not {ccfg.activation}")
        # The controller applies to the activations whose L0 is learned; the others fix it by construction.
        self.l0_control = cfg.l0_control if ccfg.activation in FREE_L0_ACTIVATIONS else 0.0

        self.lr = cfg.lr if cfg.lr is not None else default_lr(coder, cfg.optimizer)
        params = list(coder.parameters())
        if cfg.optimizer == "signum":
            self.optimizer = ScheduleFree(SignSGD(params, lr=self.lr), momentum=cfg.momentum)
            self.scheduler = None
        else:
            self.optimizer = torch.optim.Adam(params, lr=self.lr)
            warmup = max(cfg.lr_warmup_steps, 1)
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warmup))

        # What runs the forward pass: the coder itself, or a DistributedDataParallel wrapper of it
        # (`distribute`), which averages gradients across workers during backward.
        self.forward_module: torch.nn.Module = coder
        self.initialized = False

        m = coder.num_latents
        self.step_count = 0
        self.tokens_seen = 0
        self.tokens_since_fired = torch.zeros(m, dtype=torch.long, device=self.device)
        self.firing_counts = torch.zeros(m, dtype=torch.long, device=self.device)
        self.l0_running = math.nan  # exponential moving average of the training L0 (free-L0 codes' check)

    # ---- modes -----------------------------------------------------------------------------------

    def train_mode(self) -> None:
        """Parameters at the optimiser's training point (schedule-free: y)."""
        self.coder.train()
        if isinstance(self.optimizer, ScheduleFreeWrapper):
            self.optimizer.train()

    def eval_mode(self) -> None:
        """Parameters at the point to evaluate and save: the schedule-free average x, or the training point.

        A constraint applied after each step (unit-norm decoder rows, the L0 controller's thresholds)
        holds at the training point y only, not at the schedule-free average x: a topk SAE's rows at x
        had norm 0.80 after 300 steps and 0.54 after 2,000, and its held-out FVU at x worsened with
        training (0.136 -> 0.256) while at y it improved (0.118 -> 0.110). Rescaling the rows at x would
        change which latents a top-k selects, so such coders are evaluated and saved at y
        (`saves_training_point`). Projecting x and z instead is no better: on the quickstart's cache (topk,
        k=32, 2304 latents) held-out FVU 0.1053 / 0.0996 at y after 300 / 1,000 steps, 0.1057 / 0.1007 at a
        projected x, and 0.1188 / 0.1482 at the unprojected x.
        """
        self.coder.eval()
        thread_workspace().clear()  # the step buffers go when training pauses (a checkpoint) or ends
        if isinstance(self.optimizer, ScheduleFreeWrapper):
            if self.saves_training_point:
                self.optimizer.train()
            else:
                self.optimizer.eval()

    @property
    def saves_training_point(self) -> bool:
        """Whether evaluation and checkpoints use the schedule-free training point y instead of the average x:
        for continuous SAEs with unit-norm decoder rows and for codes whose L0 the controller holds."""
        return isinstance(self.optimizer, ScheduleFreeWrapper) and (
            self.coder.normalizes_decoder or bool(self.l0_control)
        )

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.cfg.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @property
    def dead_mask(self) -> Tensor:
        return self.tokens_since_fired >= self.cfg.dead_tokens

    # ---- one step --------------------------------------------------------------------------------

    def step(self, x: Tensor, y: Tensor | None = None) -> StepMetrics:
        """One optimiser step on the batch `x` (N x d_in), target `y` (defaults to x for SAEs)."""
        coder = self.coder
        x, y = self._prepare(x, y)
        self.train_mode()

        with self.autocast():
            # On the CPU the N x M pre-activations reuse this thread's buffers (a fresh one costs its page faults).
            out = self.forward_module(x, y, workspace=thread_workspace() if self.device.type == "cpu" else None)
            loss = out.fvu
            auxk = self._auxk_loss(x, y, out) if self.cfg.auxk_alpha else None
            if auxk is not None:
                loss = loss + self.cfg.auxk_alpha * auxk
            entropy = batch_entropy(out.code, coder.num_latents) if self.cfg.entropy_coef else None
            if entropy is not None:
                loss = loss + self.cfg.entropy_coef * entropy
            if self.l0_coef:
                loss = loss + self.l0_coef * self._l0_penalty(out)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss: became {loss.item()} at step {self.step_count}; no update was made "
                f"(lr={self.lr:g} may be too high for this coder)"
            )

        loss.backward()
        if coder.normalizes_decoder:
            coder.remove_gradient_parallel_to_decoder_directions()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        # Constraints that hold at the training point, which is therefore also the saved one (eval_mode).
        if coder.normalizes_decoder:
            coder.set_decoder_norm_to_unit_norm()
        if self.l0_control:
            self._control_l0(x)

        n = x.shape[0]
        with torch.no_grad():
            fired = out.code.firing_counts(coder.num_latents)
            if self.forward_module is not coder:
                # Data-parallel: every worker counts every worker's tokens, so token counts, firing counts
                # and the dead latents that AuxK revives are global and the same on every worker.
                counts = torch.cat([fired, fired.new_tensor([n])])
                torch.distributed.all_reduce(counts)
                fired, n = counts[:-1], int(counts[-1])
            self.firing_counts += fired
            self.tokens_since_fired += n
            self.tokens_since_fired[fired > 0] = 0
            l0 = out.code.l0().float().mean().item()
        self.l0_running = l0 if math.isnan(self.l0_running) else 0.9 * self.l0_running + 0.1 * l0
        self.step_count += 1
        self.tokens_seen += n
        metrics = StepMetrics(
            step=self.step_count,
            tokens=self.tokens_seen,
            loss=loss.item(),
            fvu=out.fvu.item(),
            auxk_loss=auxk.item() if auxk is not None else 0.0,
            entropy=entropy.item() if entropy is not None else 0.0,
            l0=l0,
            dead_fraction=self.dead_mask.float().mean().item(),
            lr=self.optimizer.param_groups[0]["lr"],
        )
        if self.cfg.log_every and self.step_count % self.cfg.log_every == 0:
            log.info(
                "step %d  fvu %.4f  l0 %.1f  dead %.3f", metrics.step, metrics.fvu, metrics.l0, metrics.dead_fraction
            )
        return metrics

    def distribute(self, first_batch: Tensor | tuple[Tensor, Tensor] | None = None, **ddp_kwargs) -> None:
        """Train data-parallel in an initialised `torch.distributed` process group (Ray Train sets one up).

        The data-dependent initialisation runs on `first_batch` first (unless resuming), then the coder is
        wrapped in `DistributedDataParallel`, whose constructor broadcasts rank 0's parameters, so every
        worker starts from the same point and gradients are averaged in every backward pass.
        """
        from torch.nn.parallel import DistributedDataParallel

        if first_batch is not None:
            self._prepare(*_split_batch(first_batch))
        device_ids = [self.device.index or 0] if self.device.type == "cuda" else None
        self.forward_module = DistributedDataParallel(self.coder, device_ids=device_ids, **ddp_kwargs)

    def _prepare(self, x: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor]:
        """The batch on the coder's device and dtype, checked for NaN/inf; the first one initialises."""
        x = x.to(self.device, self.coder.dtype, non_blocking=True)
        y = x if y is None else y.to(self.device, self.coder.dtype, non_blocking=True)
        for name, t in (("x", x),) if y is x else (("x", x), ("y", y)):
            # One pass: a NaN or inf makes the sum non-finite (so can an overflow; then count exactly).
            bad = 0 if torch.isfinite(t.sum()) else (~torch.isfinite(t)).sum().item()
            if bad:
                raise ValueError(
                    f"{name}: training batch {self.step_count} contains {bad} NaN or inf values; "
                    "no update was made (check the activation source or cache)"
                )
        if self.step_count == 0 and not self.initialized:
            self._init_from_batch(x, y)
        return x, y

    @torch.no_grad()
    def _init_from_batch(self, x: Tensor, y: Tensor) -> None:
        """Data-dependent initialisation (method.md): b_dec = mean(y); transcoders centre pre."""
        self.initialized = True
        coder = self.coder
        coder.b_dec.data.copy_(y.mean(0))
        if coder.cfg.is_transcoder:
            coder.encoder.bias.data.copy_(-(x.mean(0) @ coder.encoder.weight.T))

    @torch.no_grad()
    def _control_l0(self, x: Tensor) -> None:
        """Scale every threshold so that the batch `x`, at the updated weights, fires k latents per token.

        Both free-L0 codes fire latent i where pre_i > theta_i, so the factor c that every threshold needs is
        the (k n)-th largest pre_i / theta_i; log theta moves by l0_control * log c (log c clipped to +-1).
        Measured after the update, so the update's own drift is corrected too. Under the schedule-free wrapper
        the shift is made at the training point and at the base iterate z alike (so at the average x too): at
        y alone, z's thresholds would follow the reconstruction's pull towards firing more, unchecked, and
        drag y along.
        """
        with self.autocast():
            pre = self.coder.pre_activations(x)
        ratio = (pre.float() / self.coder.threshold.float()).flatten()
        fired = min(self.coder.cfg.k * x.shape[0], ratio.numel())
        log_c = ratio.kthvalue(ratio.numel() - fired + 1).values.clamp_min(1e-30).log().clamp(-1.0, 1.0)
        if self.forward_module is not self.coder:  # data-parallel: one correction for every worker
            torch.distributed.all_reduce(log_c)
            log_c /= torch.distributed.get_world_size()
        shift = self.cfg.l0_control * log_c.item()
        log_theta = self.coder.log_threshold
        log_theta.add_(shift)
        if isinstance(self.optimizer, ScheduleFreeWrapper) and "z" in self.optimizer.state.get(log_theta, {}):
            self.optimizer.state[log_theta]["z"].add_(shift)

    def _auxk_loss(self, x: Tensor, y: Tensor, out: ForwardOutput) -> Tensor | None:
        dead = self.dead_mask
        num_dead = int(dead.sum())
        if num_dead == 0:
            return None
        k_aux = min(self.coder.d_out // 2, num_dead)
        scale = min(num_dead / (self.coder.d_out // 2), 1.0)
        residual = (y - out.output).detach()
        values, indices = self.coder.dead_latent_code(x, out.pre_acts, dead, k_aux)
        residual_hat = F.embedding_bag(indices, self.coder.W_dec, per_sample_weights=values, mode="sum")
        total = (y - y.mean(0)).pow(2).sum()
        return scale * (residual_hat - residual).pow(2).sum() / total

    def _l0_penalty(self, out: ForwardOutput) -> Tensor:
        # Differentiable L0 through the step's surrogate gradient. A binary_threshold code is the gate
        # itself, so the penalty reaches the encoder as the reconstruction does; through theta alone,
        # encoder and threshold grow together without bound (the step is scale-invariant) and L0 escapes.
        # jumprelu keeps the usual form: the L0 gradient reaches theta only.
        cfg = self.coder.cfg
        if cfg.activation == "binary_threshold":
            gates = out.code.values
        else:
            gates = binary_step(out.pre_acts, self.coder.threshold, cfg.surrogate, cfg.temperature)
        return (gates.sum(-1).mean() / cfg.k - 1).pow(2)

    # ---- loops -----------------------------------------------------------------------------------

    def fit(self, batches: Iterable[Tensor | tuple[Tensor, Tensor]], max_steps: int | None = None) -> list[StepMetrics]:
        """Train on `batches` (each `x` or `(x, y)`) for at most `max_steps`; ends in eval mode."""
        history = []
        for batch in batches:
            if max_steps is not None and self.step_count >= max_steps:
                break
            history.append(self.step(*_split_batch(batch)))
        self.eval_mode()
        self.check_sparsity()
        return history

    def check_sparsity(self) -> str | None:
        """Warn (and return the message) when a free-L0 code's running training L0 is over 10% off k."""
        cfg = self.coder.cfg
        if cfg.activation not in FREE_L0_ACTIVATIONS or math.isnan(self.l0_running):
            return None
        if abs(self.l0_running / cfg.k - 1) <= 0.1:
            return None
        how = "the L0 controller is off (l0_control=0)" if not self.l0_control else "the L0 controller did not hold it"
        message = (
            f"{cfg.activation} {cfg.kind} (k={cfg.k}, {self.coder.num_latents} latents): training L0 is "
            f"{self.l0_running:.1f} at step {self.step_count}, {abs(self.l0_running / cfg.k - 1):.0%} off its "
            f"target k={cfg.k}; {how}"
        )
        log.warning(message)
        return message

    # ---- checkpoints -----------------------------------------------------------------------------

    def save_checkpoint(self, path: str | Path) -> Path:
        """The coder (at its evaluation point, see `eval_mode`) plus optimiser and statistics, to resume exactly."""
        path = Path(path)
        self.eval_mode()
        self.check_sparsity()
        self.coder.save(path)
        state = self.optimizer.state_dict()
        tensors = {"tokens_since_fired": self.tokens_since_fired, "firing_counts": self.firing_counts}
        param_state = {}
        for pid, entries in state["state"].items():
            for key, value in entries.items():
                if isinstance(value, Tensor):
                    tensors[f"optimizer.{pid}.{key}"] = value
                else:
                    param_state.setdefault(str(pid), {})[key] = value
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path / "trainer.safetensors"))
        meta = {
            "step": self.step_count,
            "tokens": self.tokens_seen,
            "l0_running": None if math.isnan(self.l0_running) else self.l0_running,
            # Which point the saved parameters are, so loading restores the optimiser's mode exactly.
            "saved_point": "training" if self.saves_training_point else "average",
            "train_config": asdict(self.cfg),
            "param_groups": state["param_groups"],
            "param_state": param_state,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
        }
        (path / "trainer.json").write_text(json.dumps(meta, indent=2, default=_json_scalar) + "\n")
        return path

    @classmethod
    def load_checkpoint(cls, path: str | Path, device: str | None = None) -> Trainer:
        """Rebuild a trainer from `save_checkpoint`; training continues where it stopped."""
        path = Path(path)
        meta = json.loads((path / "trainer.json").read_text())
        cfg = TrainConfig.from_dict({**meta["train_config"], **({"device": device} if device else {})})
        trainer = cls(SparseCoder.load(path, device=cfg.device), cfg)
        tensors = load_file(str(path / "trainer.safetensors"), device=cfg.device)
        trainer.tokens_since_fired.copy_(tensors.pop("tokens_since_fired"))
        trainer.firing_counts.copy_(tensors.pop("firing_counts"))
        state: dict[int, dict[str, Any]] = {int(pid): dict(v) for pid, v in meta["param_state"].items()}
        for key, value in tensors.items():
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
        trainer.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        if isinstance(trainer.optimizer, ScheduleFreeWrapper):
            # The saved parameters are y ("training") or x ("average"; also every checkpoint older than the
            # field), and the wrapper converts between the two from its mode flag.
            trainer.optimizer.train_mode = meta.get("saved_point", "average") == "training"
        if trainer.scheduler is not None and meta["scheduler"] is not None:
            trainer.scheduler.load_state_dict(meta["scheduler"])
        trainer.step_count, trainer.tokens_seen = meta["step"], meta["tokens"]
        if meta.get("l0_running") is not None:
            trainer.l0_running = meta["l0_running"]
        return trainer


def _json_scalar(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in trainer.json")


def _split_batch(batch: Tensor | tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor | None]:
    """`(x, y)` from a batch given as `x` (SAE) or `(x, y)` (transcoder)."""
    return tuple(batch) if isinstance(batch, (tuple, list)) else (batch, None)


def batch_entropy(code: Code, num_latents: int) -> Tensor:
    """Sum over latents of the Bernoulli entropy of each latent's batch firing rate."""
    values = code.values.float()
    if code.indices is None:
        p = values.mean(0)
    else:
        p = torch.zeros(num_latents, device=values.device).index_add_(0, code.indices.flatten(), values.flatten())
        p = p / values.shape[0]
    p = p.clamp(1e-6, 1 - 1e-6)
    return -(p * p.log() + (1 - p) * (1 - p).log()).sum()
