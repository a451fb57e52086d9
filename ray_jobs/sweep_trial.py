"""One Tune trial of `bae sweep`: a coder, or a group of coders that read one stream of batches
(`resources.coders_per_trial`), trained, checkpointed and evaluated on held-out tokens.

    config {hookpoint, activation, k, ...}         one coder (the trial's config is its grid point)
    config {"coders": [{hookpoint, ...}, ...]}     a group: points of one hookpoint and seed (`trial_groups`)

A group reads each batch once (the union of its coders' columns: an SAE trains on `output`, a transcoder on
`input` -> `output`) and steps it through every coder in turn, so each coder sees exactly the batches it would see
alone. Its checkpoints hold one complete coder checkpoint per coder, `coder_0/`, `coder_1/`, ... in the group's
order, each with its training log, and its final report gives each coder's held-out results under `coders`
(`ray_jobs.trials` turns them into one row of trials.parquet per coder). A group fails, retries and resumes as one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bae_core.coders.config import CoderConfig
from bae_core.data.cache import open_cache
from bae_core.data.reader import TRAINING_PREFETCH, coder_columns, iter_activation_batches
from bae_core.training import TrainConfig
from ray_jobs.runtime import storage_path
from ray_jobs.spec import LEXICAL_METRICS, SweepSpec
from ray_jobs.train_job import TrainingLog

log = logging.getLogger(__name__)

GROUP_KEY = "coders"
"""The config key of a grouped trial, and the key of its final report's per-coder results."""


def trial_points(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The grid points a trial trains: its group's, or its own config."""
    return list(config[GROUP_KEY]) if GROUP_KEY in config else [config]


def coder_folder(index: int) -> str:
    """A group member's folder inside the group's checkpoint."""
    return f"coder_{index}"


@dataclass
class _Member:
    """One coder of a trial: its trainer, training log, recent train FVU and the seconds it cost."""

    trainer: Any
    history: TrainingLog
    recent: list[float] = field(default_factory=list)
    seconds: float = 0.0
    l0: float = math.nan
    """The last step's train-batch L0."""
    """Its own steps, plus its share of reading and decoding the stream."""

    @property
    def train_fvu(self) -> float:
        return sum(self.recent) / len(self.recent) if self.recent else math.nan


def run_trial(config: dict[str, Any], *, spec_data: dict[str, Any], cache: str) -> None:
    """The Tune function trainable: its coders trained, checkpointed, evaluated on held-out tokens and reported
    with the final checkpoint."""
    from ray import tune

    from bae_core.evaluation.metrics import evaluate_coder

    spec = SweepSpec.model_validate(spec_data)
    grouped = GROUP_KEY in config
    points = trial_points(config)
    hookpoint = spec.trial_settings(points[0])[0]
    manifest = open_cache(cache)
    if spec.resources.workers > 1:
        _, coder, train = spec.trial_settings(points[0])
        members = [_train_distributed(spec, cache, hookpoint, coder, train)]
    else:
        members = _train_in_process(spec, cache, manifest, hookpoint, points, grouped)

    finals = []
    for member in members:
        started = time.perf_counter()
        trainer = member.trainer
        held_out = iter_activation_batches(
            cache,
            hookpoint,
            split="heldout",
            batch_size=min(spec.training.batch_size, 8192),
            transcoder=trainer.coder.cfg.is_transcoder,
            shuffle_seed=None,
            manifest=manifest,
        )
        evaluation = evaluate_coder(trainer.coder, held_out, max_tokens=spec.training.eval_tokens)
        lexical = {}
        if spec.scoring.trial_latents:
            from bae_core.evaluation.interp import ExampleOptions, lexical_summary

            options = ExampleOptions(min_examples=spec.scoring.min_examples, test_windows=spec.scoring.test_windows)
            lexical = lexical_summary(trainer.coder, cache, hookpoint, options, max_latents=spec.scoring.trial_latents)
        member.seconds += time.perf_counter() - started
        finals.append(
            {
                **_trial_facts(trainer, hookpoint),
                **evaluation.summary(),
                **lexical,
                "train_fvu": member.train_fvu,
                "train_seconds": member.seconds,
                "split": "heldout",
            }
        )
    with tempfile.TemporaryDirectory() as d:
        _save(members, d, grouped)
        report = _group_report(finals, "heldout") if grouped else finals[0]
        tune.report(report, checkpoint=tune.Checkpoint.from_directory(d))


def _group_report(results: list[dict[str, Any]], split: str) -> dict[str, Any]:
    """A group's report: each coder's results under `coders` ({"0": {...}, "1": {...}}), with the trial's
    step and split at the top."""
    return {
        GROUP_KEY: {str(i): r for i, r in enumerate(results)},
        "steps": results[0]["steps"],
        "split": split,
    }


def _save(members: list[_Member], directory: str, grouped: bool) -> None:
    for i, member in enumerate(members):
        folder = Path(directory) / coder_folder(i) if grouped else Path(directory)
        folder.mkdir(exist_ok=True)
        member.trainer.save_checkpoint(folder)
        member.history.save(folder)


def _trial_facts(trainer, hookpoint: str) -> dict[str, Any]:
    coder = trainer.coder
    return {
        "hookpoint": hookpoint,
        "num_latents": coder.num_latents,
        "d_in": coder.d_in,
        "d_out": coder.d_out,
        "lr": trainer.lr,
        "steps": trainer.step_count,
        "tokens": trainer.tokens_seen,
    }


def _progress(member: _Member, hookpoint: str) -> dict[str, Any]:
    """A checkpoint's report of one coder: train-batch metrics (the held-out ones come at the end)."""
    trainer = member.trainer
    rates = (trainer.firing_counts.double() / max(trainer.tokens_seen, 1)).cpu()
    return {
        **_trial_facts(trainer, hookpoint),
        "fvu": member.train_fvu,
        "l0": member.l0,
        "dead_fraction": float((trainer.firing_counts == 0).double().mean()),
        "frequent_fraction": float((rates > 0.01).double().mean()),
        "dense_fraction": float((rates > 0.10).double().mean()),
        # Measured once, on the final coder: Tune wants every objective in every report.
        **dict.fromkeys(LEXICAL_METRICS, math.nan),
        "split": "train",
    }


def _restore_or_build(folder: Path | None, coder: dict, train: dict, widths, manifest, hookpoint, device, every):
    from bae_core.training import Trainer, build_coder

    if folder is not None:
        return _Member(Trainer.load_checkpoint(folder, device=device), TrainingLog.load(folder, every))
    ccfg = CoderConfig(**coder)
    tcfg = TrainConfig(**{**train, "device": device, "log_every": 0})
    x_col, y_col = coder_columns(manifest, hookpoint, ccfg.is_transcoder)
    built = build_coder(ccfg, widths[x_col], widths[y_col] if y_col else None, seed=tcfg.seed)
    return _Member(Trainer(built, tcfg), TrainingLog(every))


def _train_in_process(
    spec: SweepSpec, cache: str, manifest, hookpoint: str, points: list[dict[str, Any]], grouped: bool
) -> list[_Member]:
    """Train the trial's coders in its own process on one stream read with pyarrow; checkpoints, with each
    coder's training log so far, go to Tune."""
    import torch
    from ray import tune

    widths = manifest.hookpoints[hookpoint].columns
    device = "cuda" if spec.resources.gpus_per_worker and torch.cuda.is_available() else "cpu"
    every = spec.training.log_every
    settings = [spec.trial_settings(p)[1:] for p in points]
    checkpoint = tune.get_checkpoint()
    with checkpoint.as_directory() if checkpoint is not None else contextlib.nullcontext() as d:
        folders = [None if d is None else Path(d) / coder_folder(i) if grouped else Path(d) for i in range(len(points))]
        members = [
            _restore_or_build(folder, coder, train, widths, manifest, hookpoint, device, every)
            for folder, (coder, train) in zip(folders, settings, strict=True)
        ]
    counts = {m.trainer.step_count for m in members}
    if len(counts) != 1:
        raise RuntimeError(f"trial checkpoint: its coders are at different steps {sorted(counts)}")
    start = counts.pop()
    if start:
        log.info("trial resumes at step %d", start)
    transcoders = [m.trainer.coder.cfg.is_transcoder for m in members]
    seed = members[0].trainer.cfg.seed  # one seed per group (`SweepSpec.stream_key`)
    steps, every_ckpt = spec.training.steps, spec.training.checkpoint_every
    # A resumed trial reads the data in a fresh order rather than repeating the batches it has seen. A background
    # thread reads and decodes TRAINING_PREFETCH batches ahead, so reading overlaps the coders' steps.
    batches = iter_activation_batches(
        cache,
        hookpoint,
        batch_size=spec.training.batch_size,
        transcoder=any(transcoders),
        shuffle_seed=seed * 1_000_003 + start,
        epochs=None,
        manifest=manifest,
        prefetch=TRAINING_PREFETCH,
    )
    with batches:
        step = start
        while step < steps:
            started = time.perf_counter()
            batch = next(batches)  # the wait for the reader: what reading costs beyond the overlap
            columns = batch if isinstance(batch, tuple) else (None, batch)  # (input, output)
            inputs, outputs = (c if c is None else c.to(device, non_blocking=True) for c in columns)
            shared = (time.perf_counter() - started) / len(members)
            step += 1
            for member, transcoder in zip(members, transcoders, strict=True):
                started = time.perf_counter()
                m = member.trainer.step(*((inputs, outputs) if transcoder else (outputs,)))
                member.seconds += time.perf_counter() - started + shared
                member.history.add(member.trainer, m, last=step == steps)
                member.recent = [*member.recent[-(every_ckpt - 1) :], m.fvu] if every_ckpt > 1 else [m.fvu]
                member.l0 = m.l0
            if step % every_ckpt == 0 and step < steps:
                progress = [_progress(member, hookpoint) for member in members]
                with tempfile.TemporaryDirectory() as d:
                    _save(members, d, grouped)
                    report = _group_report(progress, "train") if grouped else progress[0]
                    tune.report(report, checkpoint=tune.Checkpoint.from_directory(d))
    for member in members:
        member.trainer.eval_mode()
    return members


def _train_distributed(spec: SweepSpec, cache: str, hookpoint: str, coder: dict, train: dict) -> _Member:
    """Run a data-parallel TorchTrainer for this trial; it checkpoints into the run folder and resumes."""
    from ray import tune

    from bae_core.training import Trainer
    from ray_jobs.train_job import TrainJob, run_train

    res = spec.resources
    trial_id = tune.get_context().get_trial_id()
    job = TrainJob(
        cache=cache,
        hookpoint=hookpoint,
        out=f"{storage_path(spec.run_dir).rstrip('/')}/train",
        coder=coder,
        train=train,
        steps=spec.training.steps,
        batch_size=spec.training.batch_size // res.workers,
        checkpoint_every=spec.training.checkpoint_every,
        log_every=spec.training.log_every,
        workers=res.workers,
        cpus_per_worker=res.cpus_per_worker,
        gpus_per_worker=res.gpus_per_worker,
        max_failures=res.max_failures,
        name=f"trial-{trial_id}",
    )
    started = time.perf_counter()
    result = run_train(job)
    with result.checkpoint.as_directory() as d:
        trainer = Trainer.load_checkpoint(d, device="cpu")
        history = TrainingLog.load(d, spec.training.log_every)
    reports = result.metrics_dataframe
    train_fvu = float(reports["fvu"].iloc[-1]) if reports is not None and len(reports) else math.nan
    return _Member(trainer, history, [train_fvu], time.perf_counter() - started)
