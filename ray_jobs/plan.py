"""The plan of a sweep, printed by `bae sweep --dry-run`: trials, coder sizes and the resources they need.

Nothing here imports Ray."""

from __future__ import annotations

from bae_core.coders.coder import SPARSE_CODE_ACTIVATIONS
from bae_core.coders.config import CoderConfig
from bae_core.training import TrainConfig
from ray_jobs.cost import Shape, coder_input_width, describe_cost
from ray_jobs.spec import SweepSpec


def coder_parameters(kind: str, d_in: int, d_out: int, num_latents: int, has_threshold: bool) -> int:
    """Trainable parameters of one coder: encoder, decoder, biases, skip matrix and thresholds."""
    n = num_latents * d_in + num_latents + num_latents * d_out + d_out
    if kind == "skip_transcoder":
        n += d_in * d_out
    return n + (num_latents if has_threshold else 0)


def trial_memory_bytes(
    parameters: int, batch_size: int, num_latents: int, activation: str, precision: str, optimizer: str
) -> int:
    """Rough peak memory of training one coder, from what a step allocates (an estimate, not measured on a GPU).

    Per parameter: the fp32 weight and its gradient, the optimiser's state (schedule-free sign-SGD keeps z, Adam
    two moments) and, in bf16, the weights' bf16 copies. Per batch row and latent: a sparse code (topk, groupmax)
    keeps only the pre-activations that choose the latents, in the matmul's dtype, and binary_topk its scores
    too (no dense gradient: the backward touches the k selected latents); a dense code runs autograd through the
    matmul: its output, an fp32 copy, the code and their gradients, about 12 bytes in fp32 and 16 in bf16."""
    bf16 = precision == "bf16"
    per_parameter = 8 + (4 if optimizer == "signum" else 8) + (2 if bf16 else 0)
    if activation in SPARSE_CODE_ACTIVATIONS:
        per_latent = (2 if bf16 else 4) * (2 if activation == "binary_topk" else 1)
    else:
        per_latent = 16 if bf16 else 12
    return per_parameter * parameters + per_latent * batch_size * num_latents


def describe_plan(
    spec: SweepSpec,
    widths: dict[str, dict[str, int]] | None,
    *,
    source: str = "",
    shape: Shape | None = None,
    rates: dict | None = None,
) -> str:
    """What `bae sweep --dry-run` prints: the trials, the budget, the resources and the cost of a sweep.

    `widths` ({hookpoint: {"input": d_in, "output": d_out}}) comes from the cache manifest or the model's
    config; without it the dictionary sizes are given as multiples of the (unknown) input width. `shape` adds
    what the cost estimate knows beyond the widths (where they come from, the model's layers); `rates` replace
    rates of ray_jobs/rates.py (`describe_cost`'s keywords).
    """
    if shape is None and widths is not None:
        shape = Shape(widths, "")
    cache, training, res, search = spec.cache_request(), spec.training, spec.resources, spec.search
    n = spec.num_trials()
    lines = [f"sweep {spec.name}" + (f" ({source})" if source else "")]
    if spec.description:
        lines.append(f"  {spec.description}")
    tokens = lambda v: "all" if v is None else f"{v:,}"  # noqa: E731
    if shape is not None and shape.source:
        lines.append(f"  widths     {shape.source}")
    lines += [
        f"  output     {spec.run_dir}  (trials.parquet, spec.json, tune/)",
        f"  cache      {spec.cache_root}: {cache.model} on {cache.dataset}, {', '.join(cache.hookpoints)}; "
        f"{tokens(cache.train_tokens)} train + {tokens(cache.heldout_tokens)} held-out tokens in sequences of "
        f"{cache.seq_len}; {cache.actors} actor(s) x ({cache.cpus_per_actor:g} CPU, {cache.gpus_per_actor:g} GPU)",
    ]
    objectives = ", ".join(f"{m} ({mode})" for m, mode in search.objectives.items())
    if search.algorithm == "grid":
        grid = len(spec.grid())
        how = f"grid, {n} trials ({search.num_samples} x {grid} combinations)"
    else:
        how = f"optuna (TPE{', multi-objective' if len(search.objectives) > 1 else ''}), {n} trials, seed {search.seed}"
    lines.append(f"  search     {how}; objectives {objectives}")
    per_trial = training.steps * training.batch_size
    epochs = f" = {per_trial / cache.train_tokens:.1f} passes over the train split" if cache.train_tokens else ""
    lines.append(
        f"  training   {training.steps:,} steps x {training.batch_size:,} tokens = {per_trial:,} tokens per trial"
        f"{epochs}; checkpoint every {training.checkpoint_every:,} steps, training log every "
        f"{training.log_every:,}; held-out metrics on "
        f"{tokens(training.eval_tokens)} tokens"
    )
    cpus, gpus = res.workers * res.cpus_per_worker, res.workers * res.gpus_per_worker
    tune = spec.num_tune_trials()  # fewer than n when resources.coders_per_trial groups coders
    at_once = min(tune, search.max_concurrent or tune)
    mode = "in the trial's process" if res.workers == 1 else "a data-parallel TorchTrainer"
    lines.append(
        f"  resources  per trial {res.workers} worker(s) x ({res.cpus_per_worker:g} CPU, {res.gpus_per_worker:g} GPU), "
        f"{mode}; up to {at_once} at once{'' if search.max_concurrent else ' as the cluster allows'}: "
        f"{at_once * cpus:g} CPU, {at_once * gpus:g} GPU; {res.max_failures} retries per trial"
        + (f"; {tune} Tune trials of up to {res.coders_per_trial} coders" if tune != n else "")
    )
    lines.append(f"  total      {n * per_trial:,} training tokens over {n} trials")
    if search.algorithm != "grid":
        lines.append("  space")
        for key, values in {"hookpoint": spec.hookpoints, **spec.space}.items():
            lines.append(f"    {key}: {values}")
        return "\n".join([*lines, "", *describe_cost(spec, shape, **(rates or {}))])

    rows = []
    for i, point in enumerate(spec.grid(), start=1):
        hookpoint, coder, train = spec.trial_settings(point)
        cfg = CoderConfig(**coder)
        w = (widths or {}).get(hookpoint)
        if w is None:
            latents, params, memory = (
                f"{cfg.num_latents:,}" if cfg.num_latents else f"{cfg.expansion_factor} x d_in",
                "?",
                "?",
            )
        else:
            m, p = _size(cfg, w)
            latents, params = f"{m:,}", f"{p / 1e6:.1f}M"
            memory = f"{_memory(p, training.batch_size // res.workers, m, cfg, train) / 2**30:.1f} GiB"
        rows.append(
            [str(i), hookpoint, cfg.activation, cfg.kind, str(cfg.k), latents, params, memory]
            + [str(point[k]) for k in point if k not in ("hookpoint", "activation", "kind", "k")]
        )
    extra = [k for k in spec.grid()[0] if k not in ("hookpoint", "activation", "kind", "k")]
    header = ["#", "hookpoint", "activation", "kind", "k", "latents", "parameters", "memory/trial", *extra]
    widths_ = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines.append("")
    for r in [header, *rows]:
        lines.append("  " + "  ".join(c.ljust(wd) for c, wd in zip(r, widths_, strict=True)).rstrip())
    if search.num_samples > 1:
        lines.append(f"  (each of the {len(rows)} combinations runs {search.num_samples} times)")
    if widths is None:
        lines.append("  (the model's config is not available offline: sizes are shown as multiples of d_in)")
    elif res.coders_per_trial > 1:
        lines.extend(f"  {line}" for line in _group_memory(spec, widths))
    return "\n".join([*lines, "", *describe_cost(spec, shape, **(rates or {}))])


def _size(cfg: CoderConfig, widths: dict[str, int]) -> tuple[int, int]:
    """(latents, parameters) of a coder on a hookpoint of these widths ({"input": d_in, "output": d_out})."""
    d_in = coder_input_width(cfg, widths)
    m = cfg.latents_for(d_in)
    return m, coder_parameters(cfg.kind, d_in, widths["output"], m, cfg.has_threshold)


def _memory(parameters: int, batch: int, num_latents: int, cfg: CoderConfig, train: dict) -> int:
    precision, optimizer = (train.get(key, getattr(TrainConfig, key)) for key in ("precision", "optimizer"))
    return trial_memory_bytes(parameters, batch, num_latents, cfg.activation, precision, optimizer)


def _group_memory(spec: SweepSpec, widths: dict[str, dict[str, int]]) -> list[str]:
    """The memory of the largest trial of grouped coders: each coder's weights, gradients and optimiser state, and
    one coder's step at a time (the coders step in turn; the largest step of the group)."""
    batch = spec.training.batch_size // spec.resources.workers
    peak = 0
    for group in spec.trial_groups():
        weights = step = 0
        for point in group:
            hookpoint, coder, train = spec.trial_settings(point)
            cfg = CoderConfig(**coder)
            m, p = _size(cfg, widths[hookpoint])
            weights += _memory(p, 0, m, cfg, train)
            step = max(step, _memory(0, batch, m, cfg, train))
        peak = max(peak, weights + step)
    return [
        f"(memory/trial is one coder's; a trial of up to {spec.resources.coders_per_trial} coders holds each one's "
        "weights and optimiser state",
        f" and one coder's step at a time: up to {peak / 2**30:.1f} GiB; estimates, not measured on a GPU)",
    ]
