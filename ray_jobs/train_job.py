"""`bae train`: one coder per hookpoint with Ray Train's `TorchTrainer`.

cache shards of the hookpoint (Ray Data, read_parquet) -> split across the workers
  -> each worker: its batches fetched, shuffled and decoded a few ahead in a background thread while it trains
  -> each worker: bae_core Trainer, data-parallel (DistributedDataParallel) when there are several
  -> every `checkpoint_every` steps rank 0 reports a checkpoint (sae.safetensors + cfg.json + the
     trainer's state + the training log); after an interruption the run resumes from the last one.

`TrainingLog` (also used by `bae sweep`'s trials) keeps a row of training metrics every `log_every` steps and
saves it into every checkpoint, as training_log.parquet.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from bae_core.coders.config import CoderConfig, check_positive
from bae_core.data.cache import ShardRecord, open_cache, read_shard, unpack_activations
from bae_core.data.reader import TRAINING_PREFETCH, Prefetcher, coder_columns
from bae_core.training import StepMetrics, TrainConfig, Trainer
from ray_jobs.runtime import storage_path

log = logging.getLogger(__name__)

TRAINING_LOG = "training_log.parquet"
"""The training log's file in a checkpoint folder (`analysis.run.training_curves` reads it)."""


class TrainingLog:
    """Training metrics every `every` steps, one row per logged step (and one at the last step):

    step, tokens        the trainer's counts after that step
    fvu, l0             train-batch FVU and L0, averaged over the `interval_steps` steps since the row before
                        (and over the workers of a data-parallel run)
    dead_fraction       latents that have not fired once in training so far
    lr                  the optimiser's learning rate at that step
    seconds             wall-clock seconds of training so far, summed over attempts

    The rows stay in memory and are saved into each checkpoint folder (`save`), so logging costs no Tune report
    and no extra checkpoint. A run resumed from a checkpoint continues that checkpoint's log (`load`): the rows an
    interrupted attempt logged after its last checkpoint went with it, and are logged once more by the attempt that
    redoes those steps. (When `every` does not divide the checkpoint interval, the first row after a resume
    averages fewer steps; `interval_steps` says how many.)
    """

    COLUMNS = ("step", "tokens", "fvu", "l0", "dead_fraction", "lr", "seconds", "interval_steps")

    def __init__(self, every: int, rows: list[dict] | None = None):
        check_positive("log_every", every, integer=True)
        self.every = every
        self.rows: list[dict] = list(rows or [])
        self._seconds_before = float(self.rows[-1]["seconds"]) if self.rows else 0.0
        self._started = time.perf_counter()
        self._fvu = self._l0 = 0.0
        self._steps = 0

    def add(self, trainer: Trainer, metrics: StepMetrics, *, last: bool = False) -> None:
        """Count one step's metrics; on every `every`-th step, and on the `last`, append a row. In a data-parallel
        run every worker calls it (the averages over workers are a collective operation)."""
        self._fvu += metrics.fvu
        self._l0 += metrics.l0
        self._steps += 1
        if trainer.step_count % self.every and not last:
            return
        means = [self._fvu / self._steps, self._l0 / self._steps]
        if trainer.forward_module is not trainer.coder:  # data-parallel: the mean over the workers' batches
            t = torch.tensor(means, dtype=torch.float64, device=trainer.device)
            torch.distributed.all_reduce(t)
            means = (t / torch.distributed.get_world_size()).tolist()
        self.rows.append(
            {
                "step": trainer.step_count,
                "tokens": trainer.tokens_seen,
                "fvu": means[0],
                "l0": means[1],
                "dead_fraction": (trainer.firing_counts == 0).double().mean().item(),
                "lr": float(metrics.lr),
                "seconds": self._seconds_before + time.perf_counter() - self._started,
                "interval_steps": self._steps,
            }
        )
        self._fvu = self._l0 = 0.0
        self._steps = 0

    def save(self, directory: str | Path) -> Path:
        """The rows so far as DIRECTORY/training_log.parquet (a checkpoint folder)."""
        path = Path(directory) / TRAINING_LOG
        columns = {name: [row[name] for row in self.rows] for name in self.COLUMNS}
        pq.write_table(pa.table(columns, schema=_LOG_SCHEMA), path)
        return path

    @classmethod
    def load(cls, directory: str | Path, every: int) -> TrainingLog:
        """The log saved in a checkpoint folder; an empty one when the checkpoint has none (an older run)."""
        path = Path(directory) / TRAINING_LOG
        return cls(every, pq.read_table(path).to_pylist() if path.exists() else None)


_LOG_SCHEMA = pa.schema(
    [
        (name, pa.int64() if name in ("step", "tokens", "interval_steps") else pa.float64())
        for name in TrainingLog.COLUMNS
    ]
)


@dataclass
class TrainJob:
    """One coder on one hookpoint of a cache."""

    cache: str
    hookpoint: str
    out: str
    """Run folder: Ray Train's storage for checkpoints and results."""
    coder: dict = field(default_factory=dict)
    """`CoderConfig` fields."""
    train: dict = field(default_factory=dict)
    """`TrainConfig` fields."""
    steps: int = 1000
    batch_size: int = 4096
    checkpoint_every: int = 200
    log_every: int = 10
    """Steps between rows of the training log saved with each checkpoint (`TrainingLog`)."""
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_failures: int = 2
    """Restarts from the last checkpoint after a worker or node dies."""
    name: str | None = None

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "checkpoint_every", "log_every", "workers"):
            check_positive(key, getattr(self, key), integer=True)
        check_positive("cpus_per_worker", self.cpus_per_worker)
        CoderConfig.from_dict(self.coder)  # fail here, with the field named, not inside a worker
        TrainConfig.from_dict(self.train)

    @property
    def run_name(self) -> str:
        return self.name or self.hookpoint


SHUFFLE_BUFFER_BATCHES = 8
SHUFFLE_BUFFER_ROWS = 65_536
"""A worker shuffles its rows in a buffer of at least this many rows (and of 8 batches)."""


def _batches(job: TrainJob, dtype: str, widths: dict[str, int], x_col: str, y_col: str | None) -> Prefetcher:
    """Endless (x, y) float32 batches from this worker's dataset shard (epochs repeat), fetched, shuffled and
    decoded TRAINING_PREFETCH batches ahead in a background thread while the worker trains."""
    import ray.train

    shard = ray.train.get_dataset_shard("train")
    # Rows of several shards mix in a local buffer, so a batch is not a run of consecutive sequences of one shard
    # (the in-process reader mixes a window of shards the same way).
    buffer = max(SHUFFLE_BUFFER_BATCHES * job.batch_size, SHUFFLE_BUFFER_ROWS)
    seed = TrainConfig.from_dict(job.train).seed

    def decoded():
        epoch = 0
        while True:
            epoch += 1
            for batch in shard.iter_batches(
                batch_size=job.batch_size,
                batch_format="numpy",
                drop_last=True,
                local_shuffle_buffer_size=buffer,
                local_shuffle_seed=seed * 1_000_003 + epoch,
            ):
                x = torch.from_numpy(unpack_activations(batch[x_col], dtype, widths[x_col]))
                y = torch.from_numpy(unpack_activations(batch[y_col], dtype, widths[y_col])) if y_col else None
                yield x, y

    return Prefetcher(decoded(), TRAINING_PREFETCH)


def train_loop_per_worker(config: dict) -> None:
    """The Ray Train worker: builds or restores the coder and trains it for `job.steps` steps."""
    import ray.train
    from ray.train import Checkpoint

    from bae_core.training import build_coder

    job = TrainJob(**config["job"])
    manifest = open_cache(job.cache)
    ccfg = CoderConfig.from_dict(job.coder)
    x_col, y_col = coder_columns(manifest, job.hookpoint, ccfg.is_transcoder)
    widths = manifest.hookpoints[job.hookpoint].columns
    ctx = ray.train.get_context()
    device = "cuda" if job.gpus_per_worker and torch.cuda.is_available() else "cpu"
    tcfg = TrainConfig.from_dict({**job.train, "device": device})

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            trainer = Trainer.load_checkpoint(d, device=device)
            history = TrainingLog.load(d, job.log_every)
        log.info("resuming %s at step %d", job.run_name, trainer.step_count)
    else:
        trainer = Trainer(build_coder(ccfg, widths[x_col], widths[y_col] if y_col else None, seed=tcfg.seed), tcfg)
        history = TrainingLog(job.log_every)
    batches = _batches(job, manifest.dtype, widths, x_col, y_col)
    if ctx.get_world_size() > 1:
        trainer.distribute(next(batches))

    while trainer.step_count < job.steps:
        x, y = next(batches)
        m = trainer.step(x, y)
        history.add(trainer, m, last=trainer.step_count == job.steps)
        if trainer.step_count % job.checkpoint_every == 0 or trainer.step_count == job.steps:
            metrics = {**dataclasses.asdict(m), "hookpoint": job.hookpoint}
            if ctx.get_world_rank() == 0:
                with tempfile.TemporaryDirectory() as d:
                    trainer.save_checkpoint(d)  # the next step returns to training mode
                    history.save(d)
                    ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))
            else:
                ray.train.report(metrics)


def _read_shards(batch, root: str, columns: list[str]):
    """Ray Data map: shard records -> the shards' activation columns (one arrow table)."""
    return pa.concat_tables([read_shard(root, ShardRecord(**row), columns) for row in batch.to_pylist()])


def run_train(job: TrainJob):
    """Train `job` with a `TorchTrainer`; returns Ray's `Result` (its checkpoint holds the coder)."""
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    manifest = open_cache(job.cache)
    x_col, y_col = coder_columns(manifest, job.hookpoint, CoderConfig.from_dict(job.coder).is_transcoder)
    shards = [dataclasses.asdict(record) for record in manifest.shards_of("train", job.hookpoint)]
    # One read task per shard, each a fraction of a CPU: reading is light next to training, and the reads must
    # stay schedulable when the workers (and, in a sweep, the trial that drives them) hold nearly every CPU of
    # a small node. (`ray.data.read_parquet` lists files in a task that always asks for a whole CPU.)
    ds = ray.data.from_items(shards, override_num_blocks=len(shards)).map_batches(
        _read_shards,
        fn_kwargs={"root": job.cache, "columns": [x_col] + ([y_col] if y_col else [])},
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=0.25,
    )
    resources = {"CPU": job.cpus_per_worker}
    if job.gpus_per_worker:
        resources["GPU"] = job.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": dataclasses.asdict(job)},
        scaling_config=ScalingConfig(
            num_workers=job.workers, use_gpu=bool(job.gpus_per_worker), resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=job.run_name,
            storage_path=storage_path(job.out),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=job.max_failures),
        ),
        datasets={"train": ds},
    )
    return trainer.fit()


def export_coder(result, dest: str | Path) -> Path | str:
    """Copy the final coder (sae.safetensors + cfg.json + trainer state) out of a Ray result into `dest`, a local
    folder or a URI (s3://...)."""
    from bae_core.data.paths import copy_folder, is_uri

    with result.checkpoint.as_directory() as d:
        if is_uri(str(dest)):
            copy_folder(d, str(dest))
            return str(dest)
        shutil.copytree(d, dest, dirs_exist_ok=True)
    return Path(dest)
