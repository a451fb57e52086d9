"""What a sweep costs before it runs, for `bae sweep --dry-run`: tokens to cache and the forward passes that takes,
the cache's size on disk, what each trial reads, and device-hours of training and caching from stated rates
(ray_jobs/rates.py), with reading and decoding set against compute.

FLOPs are counted per token, a multiply-add as 2, for the arithmetic this project's coders do (bae_core/coders):

- topk, binary_topk, groupmax (a sparse code of k latents): the dense encoder matmul runs once without autograd to
  choose the latents, 2 M d_in; the backward touches only the k selected latents' encoder rows, 2 k d_in (no gradient
  flows to the input: the coder's input is data); the decoder is an embedding bag of k rows, forward and backward
  (decoder rows and code values), 6 k d_out. Total 2 M d_in + 2 k d_in + 6 k d_out: the dense 6 M (d_in + d_out) of
  an autograd SAE is not spent.
- batchtopk, jumprelu, binary_threshold, binary_groupmax (a dense code): encoder and decoder matmuls forward and
  backward, 6 M (d_in + d_out).
- a skip transcoder adds its d_out x d_in matrix, forward and weight gradient: 4 d_in d_out.

Not counted: the optimiser and decoder normalisation (per step, not per token: about 10 parameter-sized passes, under
0.1% at the paper's shape), AuxK (off by default), the held-out evaluation at the end of each trial. The language
model's forward counts 2 (4 d^2 + 3 d d_mlp) + 2 seq_len d per token and layer (attention projections as if every
head had its own keys and values: an upper bound for grouped-query models; gated MLP; causal attention over half the
context on average), through the deepest hooked layer (the cache's forward stops there). Nothing here imports Ray.
"""

from __future__ import annotations

import math
import re
import textwrap
from dataclasses import dataclass, field

from bae_core.coders.coder import SPARSE_CODE_ACTIVATIONS
from bae_core.coders.config import CoderConfig
from bae_core.training import TrainConfig
from ray_jobs import rates as R
from ray_jobs.spec import SweepSpec


def training_flops(activation: str, kind: str, d_in: int, d_out: int, num_latents: int, k: int) -> int:
    """Counted FLOPs per token of one training step of one coder (see the module docstring)."""
    skip = 4 * d_in * d_out if kind == "skip_transcoder" else 0
    if activation in SPARSE_CODE_ACTIVATIONS:
        return 2 * num_latents * d_in + 2 * k * d_in + 6 * k * d_out + skip
    return 6 * num_latents * (d_in + d_out) + skip


def forward_flops(d_model: int, d_mlp: int, layers: int, seq_len: int) -> int:
    """Counted FLOPs per token of the language model's forward through `layers` layers."""
    return layers * (2 * (4 * d_model * d_model + 3 * d_model * d_mlp) + 2 * seq_len * d_model)


def column_bytes(width: int, dtype: str) -> int:
    """Bytes per token of one activation column as stored: float32, or float16 packed two to a uint32."""
    return 4 * width if dtype == "float32" else 4 * -(-width // 2)


def split_plan(budget: int | None, seq_len: int, per_unit: int, per_forward: int) -> tuple[int, int]:
    """(sequences, forward passes) of one split: whole sequences of the budget (the cache drops the partial one),
    cut into units of `per_unit` sequences, each run `per_forward` sequences at a time."""
    seqs = budget // seq_len
    full, rest = divmod(seqs, per_unit)
    return seqs, full * math.ceil(per_unit / per_forward) + math.ceil(rest / per_forward)


@dataclass
class Shape:
    """What the estimate knows about the model: hookpoint widths, and (for the forward) its layers."""

    widths: dict[str, dict[str, int]]
    source: str
    """Where the widths come from, in words."""
    num_layers: int | None = None
    d_model: int | None = None
    d_mlp: int | None = None
    cached_bytes: int | None = None
    """The bytes of the cache's shards on disk, when a finished cache exists."""


SAME_ARCHITECTURE_AS_EMBEDDED = ("HuggingFaceTB/SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M-Instruct")
"""Hub models whose config is the embedded SmolLM2-135M-Instruct's (the Instruct model is the base model
fine-tuned: 30 layers, d_model 576, d_mlp 1536, the same attention): their shape is known offline."""


def resolve_shape(spec: SweepSpec, d_model: int | None = None) -> Shape | None:
    """The model's shape for a dry run, and where it comes from: the existing cache's manifest, else the model's
    config (local), else `d_model` (the command line's --d-model), else the embedded model's config when the spec's
    model has its architecture; None when nothing says. Validates the hookpoint names where the layers are known."""
    from bae_core.data.cache import load_manifest
    from bae_core.data.lm import EMBEDDED_MODEL, ModelShape, model_shape

    cache = spec.cache_request()
    try:
        manifest = load_manifest(spec.cache_root)
    except ValueError:
        manifest = None
    model = model_shape(cache.model, revision=cache.revision)
    source = "the model's config"
    if model is None and d_model is None and cache.model in SAME_ARCHITECTURE_AS_EMBEDDED:
        try:
            model = model_shape(EMBEDDED_MODEL)
        except (ImportError, OSError, ValueError):  # the embedded model's package is not installed
            model = None
        source = (
            f"the embedded SmolLM2-135M-Instruct's config, the same architecture as {cache.model} (whose own "
            "config is not available offline)"
        )
    if manifest is not None and set(cache.hookpoints) <= set(manifest.hookpoints):  # else the sweep will refuse it
        widths = {name: info.columns for name, info in manifest.hookpoints.items()}
        if d_model is not None and any(w != d_model for cols in widths.values() for w in cols.values()):
            raise ValueError(f"--d-model: {d_model}, but the cache at {spec.cache_root} has widths {widths}; drop it")
        bytes_ = sum(s.bytes for s in manifest.shards) if manifest.complete else None
        source = f"the cache's manifest ({spec.cache_root})"
        shape = model or ModelShape(0, 0, 0)
        return Shape(widths, source, shape.num_layers or None, shape.d_model, shape.d_mlp, bytes_)
    if model is None and d_model is not None:
        if d_model <= 0:
            raise ValueError(f"--d-model: must be a positive width, got {d_model}")
        layers = [int(m[1]) for h in cache.hookpoints if (m := re.fullmatch(r"layers\.(\d+)(\.mlp)?", str(h)))]
        widths = ModelShape(1 + max(layers, default=0), d_model, 0).hookpoint_widths(cache.hookpoints)
        return Shape(widths, f"--d-model {d_model} (the model's config is not available offline)")
    if model is None:
        return None
    if d_model is not None and d_model != model.d_model:
        raise ValueError(f"--d-model: {d_model}, but {source} says {model.d_model}; drop it")
    widths = model.hookpoint_widths(cache.hookpoints)
    return Shape(widths, source, model.num_layers, model.d_model, model.d_mlp)


@dataclass
class TrialCost:
    """One Tune trial: its coders train on one stream of batches, read once."""

    coders: int
    columns: tuple[str, ...]
    read_bytes: int
    compute_s: float
    """Seconds of arithmetic on the trial's devices (all its coders, every step)."""
    read_s: float
    """Seconds of reading and decoding its batches (one thread per worker)."""


@dataclass
class SweepCost:
    """The numbers the dry run prints; None where the model's shape or a token budget is not known."""

    train_sequences: int
    heldout_sequences: int
    seq_len: int
    forward_passes: int
    hookpoints: int
    layers_run: int | None = None
    forward_flops_per_token: int | None = None
    bytes_per_token: dict[str, float] | None = None
    """Per hookpoint, on disk: its activation columns and the parquet overhead."""
    trials: list[TrialCost] | None = None
    training_flops: float | None = None
    """Counted FLOPs of every coder's training."""
    device: str = "GPU"
    devices_per_trial: float = 1.0
    overlap: bool = True
    """Whether reading can run beside the arithmetic (a GPU, or more than one CPU per worker)."""
    write_s: float | None = None
    """Seconds of one core to pack and write every shard."""
    forward_s: float | None = None
    """Seconds of one actor's device (GPU, or its CPU threads together) for every forward pass."""
    rates: list[R.Rate] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return (self.train_sequences + self.heldout_sequences) * self.seq_len

    @property
    def storage_bytes(self) -> float | None:
        return None if self.bytes_per_token is None else sum(self.bytes_per_token.values()) * self.tokens

    def device_hours(self) -> tuple[float, float, float]:
        """Device-hours of training: computing, held with reading overlapped (prefetch), held without."""
        share = self.devices_per_trial / 3600
        return (
            sum(t.compute_s for t in self.trials) * share,
            sum(max(t.compute_s, t.read_s) if self.overlap else t.compute_s + t.read_s for t in self.trials) * share,
            sum(t.compute_s + t.read_s for t in self.trials) * share,
        )


def sweep_cost(spec: SweepSpec, shape: Shape | None, *, train_rate=None, forward_rate=None) -> SweepCost | None:
    """The cost of `spec` (None when a split's token budget is 'all'). `train_rate` / `forward_rate` (a `Rate`)
    replace ray_jobs/rates.py's."""
    cache, training, res = spec.cache_request(), spec.training, spec.resources
    if cache.train_tokens is None or cache.heldout_tokens is None:
        return None
    plans = [
        split_plan(b, cache.seq_len, cache.sequences_per_unit, cache.batch_size)
        for b in (cache.train_tokens, cache.heldout_tokens)
    ]
    cost = SweepCost(plans[0][0], plans[1][0], cache.seq_len, plans[0][1] + plans[1][1], len(cache.hookpoints))
    if shape is None:
        return cost
    if shape.num_layers:
        cost.layers_run = 1 + max(int(h.split(".")[1]) for h in cache.hookpoints)
        cost.forward_flops_per_token = forward_flops(shape.d_model, shape.d_mlp, cost.layers_run, cache.seq_len)
    overhead = R.PARQUET_ROW_OVERHEAD
    cost.bytes_per_token = {
        h: sum(column_bytes(w, cache.dtype) for w in shape.widths[h].values()) + overhead.value
        for h in cache.hookpoints
    }
    if spec.search.algorithm != "grid":
        cost.rates.append(overhead)
        return cost

    gpu = res.gpus_per_worker > 0
    cost.device = "GPU" if gpu else "CPU core"
    cost.devices_per_trial = res.workers * (res.gpus_per_worker if gpu else res.cpus_per_worker)
    cost.overlap = gpu or res.cpus_per_worker >= 2
    rows = training.steps * training.batch_size
    cost.trials, cost.training_flops, used = [], 0.0, {}
    for group in spec.trial_groups():
        seconds, columns = 0.0, {"output"}
        for point in group:
            hook, coder, train = spec.trial_settings(point)
            cfg = CoderConfig(**coder)
            rate = train_rate or (R.gpu_train_rate if gpu else R.cpu_train_rate)(
                train.get("precision", TrainConfig.precision)
            )
            used[rate.source] = rate
            flops = _coder_flops(cfg, shape.widths[hook]) * rows
            cost.training_flops += flops * spec.search.num_samples
            seconds += flops / rate.value
            columns |= {"input"} if cfg.is_transcoder else set()
        read_bytes = rows * sum(column_bytes(shape.widths[hook][c], cache.dtype) for c in columns)
        read_rate = R.READ_DECODE[cache.dtype][len(columns)]
        used[read_rate.source] = read_rate
        trial = TrialCost(
            len(group),
            tuple(sorted(columns)),
            read_bytes,
            seconds / cost.devices_per_trial,
            # Reading and decoding runs on one thread per worker (numpy), whatever the trial's CPUs.
            rows / read_rate.value / res.workers,
        )
        cost.trials += [trial] * spec.search.num_samples
    cost.rates += [*used.values(), overhead]

    if shape.cached_bytes is not None:  # nothing to cache
        return cost
    cost.write_s = cost.storage_bytes / R.SHARD_WRITE.value
    cost.rates.append(R.SHARD_WRITE)
    if cost.forward_flops_per_token is not None:
        cache_gpu = cache.gpus_per_actor > 0
        rate = forward_rate or (R.gpu_forward_rate() if cache_gpu else R.CPU_FORWARD)
        threads = 1 if cache_gpu else cache.cpus_per_actor
        cost.forward_s = cost.forward_flops_per_token * cost.tokens / (rate.value * threads)
        cost.rates.append(rate)
    return cost


def coder_input_width(cfg: CoderConfig, widths: dict[str, int]) -> int:
    """d_in of a coder on a hookpoint of these widths ({"input": ..., "output": ...}): a transcoder reads the
    input (the output where the hookpoint has only that), an SAE the output."""
    return widths.get("input", widths["output"]) if cfg.is_transcoder else widths["output"]


def _coder_flops(cfg: CoderConfig, widths: dict[str, int]) -> int:
    d_in = coder_input_width(cfg, widths)
    return training_flops(cfg.activation, cfg.kind, d_in, widths["output"], cfg.latents_for(d_in), cfg.k)


def _si(x: float, unit: str) -> str:
    for scale, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= scale:
            return f"{x / scale:,.{1 if x / scale < 100 else 0}f} {prefix}{unit}"
    return f"{x:,.0f} {unit}"


def _time(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.2g} s"
    return f"{seconds / 3600:,.1f} h" if seconds >= 5400 else f"{seconds / 60:,.0f} min"


def _h(hours: float) -> str:
    """Device-hours: one decimal, or two significant digits below 0.1."""
    return f"{hours:,.1f}" if hours >= 0.1 else f"{hours:.2g}"


def _wrap(head: str, text: str) -> list[str]:
    return textwrap.wrap(text, 118, initial_indent=f"  {head:<9s}", subsequent_indent=" " * 11, break_on_hyphens=False)


def describe_cost(spec: SweepSpec, shape: Shape | None, **rates) -> list[str]:
    """The dry run's cost lines (see `sweep_cost`; `rates` are its keywords)."""
    cost = sweep_cost(spec, shape, **rates)
    lines = ["cost       an estimate; every rate it uses is listed under 'rates', measured or assumed as it says"]
    if cost is None:
        return lines + _wrap("cache", "a split of 'all' documents: its tokens are known only once tokenised")
    cache, training = spec.cache_request(), spec.training
    text = (
        f"{cost.tokens:,} tokens at most (a dataset may run out): {cost.train_sequences * cost.seq_len:,} train + "
        f"{cost.heldout_sequences * cost.seq_len:,} held-out ({cost.train_sequences:,} + {cost.heldout_sequences:,} "
        f"sequences of {cost.seq_len:,}); {cost.forward_passes:,} forward passes of up to {cache.batch_size} "
        f"sequences, each capturing all {cost.hookpoints} hookpoint(s)"
    )
    if cost.forward_flops_per_token is not None:
        text += (
            f", through {cost.layers_run} of {shape.num_layers} layers: {_si(cost.forward_flops_per_token, 'FLOP')} "
            f"per token, {_si(cost.forward_flops_per_token * cost.tokens, 'FLOP')}"
        )
    lines += _wrap("cache", text)
    if cost.bytes_per_token is None:
        return lines + _wrap(
            "storage", "unknown: so are the hookpoint widths (the model's config is not available offline); give "
            "--d-model N for storage, reads and hours"
        )  # fmt: skip
    layouts = {}
    for h, b in cost.bytes_per_token.items():
        cols = " + ".join(f"{c} {w}" for c, w in shape.widths[h].items())
        layouts.setdefault(f"{cols} wide: {b:,.1f} bytes/token, {_si(b * cost.tokens, 'B')}", []).append(h)
    per = "; ".join(f"{', '.join(hs)}: {layout}" for layout, hs in layouts.items())
    dtype = "float16 (2 bytes, packed two to a uint32)" if cache.dtype == "float16" else "float32 (4 bytes)"
    on_disk = f" (on disk now: {_si(shape.cached_bytes, 'B')})" if shape.cached_bytes is not None else ""
    lines += _wrap(
        "storage", f"{dtype} activations + {R.PARQUET_ROW_OVERHEAD.value} bytes/token of parquet per hookpoint; "
        f"{per}; in all {_si(cost.storage_bytes, 'B')}{on_disk}"
    )  # fmt: skip
    if cost.trials is None:
        return lines + _wrap("training", "optuna: each trial's size is sampled, not estimated") + _rate_lines(cost)
    rows = training.steps * training.batch_size
    groups: dict[tuple, list[TrialCost]] = {}
    for t in cost.trials:
        groups.setdefault(t.columns, []).append(t)
    reads = "; ".join(f"{len(ts)} read {' + '.join(c)} ({_si(ts[0].read_bytes, 'B')} each)" for c, ts in groups.items())
    n_coders = sum(t.coders for t in cost.trials)
    lines += _wrap(
        "reads", f"{len(cost.trials)} Tune trial(s) of {training.steps:,} steps x {training.batch_size:,} tokens = "
        f"{rows:,} tokens ({n_coders} coders, up to {spec.resources.coders_per_trial} per trial sharing its reads): "
        f"{reads}; in all {_si(sum(t.read_bytes for t in cost.trials), 'B')}"
    )  # fmt: skip
    busy, overlapped, serial = cost.device_hours()
    dev = cost.device
    lines += _wrap(
        "training", f"{_si(cost.training_flops, 'FLOP')} counted (per coder and token: {_flops(spec, shape)}): "
        f"{_h(busy)} {dev}-hours computing, {cost.devices_per_trial:g} {dev}(s) per trial"
    )  # fmt: skip
    worst = max(cost.trials, key=lambda t: t.read_s / t.compute_s)
    step_c, step_r = worst.compute_s / training.steps, worst.read_s / training.steps
    bound = f"reading is the bound, {step_r / step_c:.1f}x" if step_r > step_c else "compute is the bound"
    waiting = sum(1 for t in cost.trials if t.read_s > t.compute_s)
    io = (
        f"per step of a trial of {worst.coders} coder(s) reading {' + '.join(worst.columns)}: compute {step_c:.3g} s, "
        f"read + decode {step_r:.3g} s on one core"
    )
    if cost.overlap:
        io += (
            f" ({bound}); {waiting} of {len(cost.trials)} trials wait on reading: trials hold {_h(overlapped)} "
            f"{dev}-hours with reading overlapped (a prefetching reader), {_h(serial)} without; a trial takes "
            f"{_time(max(worst.compute_s, worst.read_s))} overlapped"
        )
    else:
        io += (
            f", the trial's only core: the two add up, so trials hold {_h(serial)} {dev}-hours and a trial takes "
            f"{_time(worst.compute_s + worst.read_s)}"
        )
    lines += _wrap("I/O", io)
    if shape.cached_bytes is not None:
        return lines + _wrap("caching", "none: the cache exists") + _rate_lines(cost)
    text = f"{_h(cost.write_s / 3600)} core-hours packing and writing {_si(cost.storage_bytes, 'B')} of shards"
    if cost.forward_s is not None:
        gpu = cache.gpus_per_actor > 0
        per_actor = cache.gpus_per_actor if gpu else cache.cpus_per_actor
        text += (
            f" (one core per actor) and {_h(cost.forward_s * (1 if gpu else per_actor) / 3600)} "
            f"{'GPU' if gpu else 'CPU core'}-hours of forward passes; an actor does the two in turn: {cache.actors} "
            f"actor(s) take about {_time((cost.forward_s + cost.write_s) / cache.actors)} and hold "
            f"{_h((cost.forward_s + cost.write_s) * per_actor / 3600)} {'GPU' if gpu else 'CPU core'}-hours"
        )
    else:
        text += "; the forward passes need the model's layers (not known offline)"
    return lines + _wrap("caching", text) + _rate_lines(cost)


def _flops(spec: SweepSpec, shape: Shape) -> str:
    """The range of counted FLOPs per token of each kind of coder in the grid."""
    by_kind: dict[str, list[int]] = {}
    for point in spec.grid():
        hook, coder, _ = spec.trial_settings(point)
        cfg = CoderConfig(**coder)
        by_kind.setdefault(cfg.kind, []).append(_coder_flops(cfg, shape.widths[hook]))
    return ", ".join(f"{kind} {_span(min(v), max(v), 'FLOP')}" for kind, v in by_kind.items())


def _span(lo: float, hi: float, unit: str) -> str:
    """'42.6-43.2 MFLOP' (one prefix for both ends, the larger one's), or one value when they agree."""
    top = _si(hi, unit)
    if _si(lo, unit) == top:
        return top
    number, rest = top.split(" ", 1)
    scale = hi / float(number.replace(",", ""))
    return f"{lo / scale:,.1f}-{number} {rest}"


def _rate_lines(cost: SweepCost) -> list[str]:
    lines, seen = [], set()
    for rate in cost.rates:
        if rate.source in seen:
            continue
        seen.add(rate.source)
        fmt = (
            _si(rate.value, rate.unit)
            if rate.unit.split(" ", 1)[0] in ("FLOP/s", "B/s")
            else f"{rate.value:,.4g} {rate.unit}"
            if rate.value < 1e3
            else f"{rate.value:,.0f} {rate.unit}"
        )
        lines += _wrap("rates" if not lines else "", f"{fmt}: {rate.source}")
    return lines
