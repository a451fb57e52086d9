"""Sweep specs: the YAML files under `sweeps/`, validated before anything runs.

A spec names the activations to cache, the fixed coder and training settings, the search space and
the search algorithm, the training budget per trial and the resources per trial:

    name: quickstart
    output: runs/quickstart              # run folder: trials.parquet, tune/ (local path or URI)
    cache: {hookpoints: [layers.9.mlp], train_tokens: 65536}   # CacheRequest fields
    coder: {expansion_factor: 8}         # CoderConfig fields shared by every trial
    train: {optimizer: signum}           # TrainConfig fields shared by every trial
    space:                               # searched: a list of values, or {uniform|loguniform|int|logint: [low, high]}
      activation: [topk, binary_topk]
      k: [16, 32]
    search: {algorithm: grid, objectives: {fvu: min}, max_concurrent: 2}
    training: {steps: 500, batch_size: 1024, checkpoint_every: 100, log_every: 10, eval_tokens: 16384}
    resources: {workers: 1, cpus_per_worker: 1, gpus_per_worker: 0, max_failures: 2}
    probing: {tasks: all, ks: [1, 2, 5, 20]}   # optional: `bae probe`'s defaults (scoring: `bae score`'s)

Every error names the field (dotted, e.g. `search.algorithm`) and what is allowed there.
Nothing here imports Ray: specs validate on a laptop without a cluster.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt, PositiveInt, ValidationError

from bae_core.coders.config import CoderConfig
from bae_core.evaluation import probing
from bae_core.training import TrainConfig
from ray_jobs.cache_job import CacheRequest

CODER_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(CoderConfig))
# Per-trial settings a sweep decides itself: the device follows the trial's resources, logging is off.
TRAIN_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(TrainConfig) if f.name not in ("device", "log_every"))
CACHE_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(CacheRequest) if f.name != "device")
SPACE_FIELDS: tuple[str, ...] = ("hookpoint", *CODER_FIELDS, *TRAIN_FIELDS)
DISTRIBUTIONS: tuple[str, ...] = ("uniform", "loguniform", "int", "logint")
_DISTRIBUTION_FORMS = ", ".join(f"{{{d}: [low, high]}}" for d in DISTRIBUTIONS)

Metric = Literal[
    "fvu",
    "l0",
    "dead_fraction",
    "frequent_fraction",
    "dense_fraction",
    "lexical_auroc",
    "lexical_auroc_weighted",
    "lexical_coverage",
]
"""Held-out metrics every trial reports; any of them can be an objective. The lexical ones (evaluation.md §3a,
"lexical explainability (token/bigram rules)") are measured on `scoring.trial_latents` sampled latents."""
LEXICAL_METRICS: tuple[str, ...] = ("lexical_auroc", "lexical_auroc_weighted", "lexical_coverage")
METRICS: tuple[str, ...] = Metric.__args__


class SpecError(ValueError):
    """A spec that cannot run; the message names the file, the field and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SearchSpec(_Section):
    """How trials are chosen."""

    algorithm: Literal["grid", "optuna"] = "grid"
    """grid: every combination of the space's lists; optuna: Optuna's TPE sampler (multi-objective
    when two or more objectives are named)."""
    num_samples: PositiveInt = 1
    """grid: how many times the whole grid runs; optuna: the number of trials."""
    objectives: dict[Metric, Literal["min", "max"]] = Field(default_factory=lambda: {"fvu": "min"}, min_length=1)
    """Metric -> min|max. The first one is the headline; Optuna optimises all of them."""
    max_concurrent: PositiveInt | None = None
    """At most this many trials at once (default: as many as the cluster's resources allow)."""
    seed: int = 0
    """Seed of Optuna's sampler."""


class TrainingSpec(_Section):
    """The budget of each trial."""

    steps: PositiveInt = 1000
    batch_size: PositiveInt = 4096
    """Tokens per optimiser step (split across workers when there are several)."""
    checkpoint_every: PositiveInt = 200
    """Steps between trial checkpoints; a failed or interrupted trial resumes from the last one."""
    log_every: PositiveInt = 10
    """Steps between rows of each trial's training log (train FVU and L0 averaged over those steps, the fraction
    of latents never fired so far, the learning rate, wall time; the last step always has a row). The log is
    saved inside every checkpoint, so it costs no Tune report and resumes with the trial;
    `analysis.training_curves` reads it and `analysis.convergence` judges from it whether FVU levelled off."""
    eval_tokens: PositiveInt | None = 50_000
    """Held-out tokens for the final metrics (null: the whole held-out split)."""


class ResourcesSpec(_Section):
    """What one trial occupies."""

    workers: PositiveInt = 1
    """1: the trial trains in its own process; more: a data-parallel Ray Train TorchTrainer per trial."""
    cpus_per_worker: float = Field(1.0, gt=0)
    """Fractional values pack several small trials onto one core."""
    gpus_per_worker: NonNegativeFloat = 0.0
    """Fractional values (e.g. 0.25) pack several small coders onto one GPU."""
    max_failures: NonNegativeInt = 2
    """Retries of a failed trial, each from its last checkpoint."""
    coders_per_trial: PositiveInt = 1
    """Grid search: up to this many coders in one Tune trial when they read the same stream (the same hookpoint
    and the same `seed`, hence the same batches): each batch is read and decoded once and stepped through all of
    them. trials.parquet still has one row per coder; a failed or interrupted trial resumes (or is lost) as a
    group. With one worker only (a data-parallel trial trains one coder)."""


class ScoringSpec(_Section):
    """How latents are scored: in each trial (the lexical objectives) and by `bae score` afterwards."""

    trial_latents: NonNegativeInt = 256
    """Latents each trial samples (among those that fire) for its lexical_* metrics; 0 turns them off."""
    min_examples: PositiveInt | None = None
    """Activating windows a latent needs to be scored (null: delphi's 200 per 10M tokens, at least 5)."""
    test_windows: PositiveInt = 50
    """Activating test windows per latent (and as many non-activating ones)."""
    fidelity_tokens: PositiveInt = 16384
    """`bae score`: held-out tokens on which the spliced model's CE, KL and top-1 are measured."""
    ablation_bins: NonNegativeInt = 5
    """`bae score`: bins of equal firing mass for the ablation by score (evaluation.md §5); 0 skips it."""
    lm_batch_size: PositiveInt = 8
    """`bae score`: sequences per language-model forward."""
    lm_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """`bae score`: the language model's precision for fidelity and ablation (bfloat16 is about 3x faster on
    CPUs with bf16 matrix units, at the cost of rounding in the CE)."""
    gpus_per_task: NonNegativeFloat = 0.0
    """`bae score` and `bae probe`: GPUs for each task that runs the language model (spliced fidelity and
    ablation, probing's activations); fractional values (e.g. 0.25) share one GPU between tasks. 0: CPUs."""


class ProbingSpec(_Section):
    """`bae probe`: sparse probing on labelled text tasks (evaluation.md §7); each can be overridden on its
    command line."""

    tasks: list[str] | Literal["all"] = Field(default_factory=lambda: list(probing.DEFAULT_TASKS), min_length=1)
    """Binary tasks of the sae-probes wheel (e.g. 113_movie_sent, or movie_sent), or `all` (113 tasks)."""
    ks: list[PositiveInt] = Field(default_factory=lambda: list(probing.DEFAULT_KS), min_length=1)
    """Latents per probe."""
    max_examples: int = Field(probing.DEFAULT_MAX_EXAMPLES, ge=6)
    """Prompts per task, half of each class; a third of them test."""
    max_tokens: PositiveInt = probing.DEFAULT_MAX_TOKENS
    """A longer prompt keeps its last this many tokens."""
    seed: int = 0
    """Seed of the prompts' draw and split."""


class SweepSpec(_Section):
    """A whole sweep; `load_spec` reads one from YAML."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    output: str | None = None
    """Run folder (local path or pyarrow URI). Default: runs/<name>."""
    cache: dict[str, Any]
    """`CacheRequest` fields; `root` defaults to <output>/cache."""
    coder: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict)
    space: dict[str, Any] = Field(default_factory=dict)
    search: SearchSpec = Field(default_factory=SearchSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    scoring: ScoringSpec = Field(default_factory=ScoringSpec)
    probing: ProbingSpec = Field(default_factory=ProbingSpec)

    # ---- derived --------------------------------------------------------------------------------

    @property
    def run_dir(self) -> str:
        return self.output or f"runs/{self.name}"

    @property
    def cache_root(self) -> str:
        return self.cache.get("root") or f"{self.run_dir.rstrip('/')}/cache"

    def cache_request(self) -> CacheRequest:
        return CacheRequest(**{**self.cache, "root": self.cache_root})

    @property
    def hookpoints(self) -> list[str]:
        return list(self.space.get("hookpoint") or self.cache["hookpoints"])

    def num_trials(self) -> int:
        """Coders the sweep trains: the rows of trials.parquet."""
        if self.search.algorithm == "optuna":
            return self.search.num_samples
        return len(self.grid()) * self.search.num_samples

    def num_tune_trials(self) -> int:
        """Tune trials: `num_trials()` unless `resources.coders_per_trial` groups coders."""
        if self.search.algorithm == "optuna":
            return self.search.num_samples
        return len(self.trial_groups()) * self.search.num_samples

    def stream_key(self, point: dict[str, Any]) -> tuple[str, int]:
        """What fixes a coder's training batches: its hookpoint and its seed (the batch size and the steps are the
        same for every trial)."""
        hookpoint, _, train = self.trial_settings(point)
        return hookpoint, int(train.get("seed", 0))

    def trial_groups(self) -> list[list[dict[str, Any]]]:
        """The grid's points as Tune trials: points of one stream (`stream_key`), at most
        `resources.coders_per_trial` per trial. Within a stream the coders that read only the output (SAEs) come
        before those that also read the input (transcoders), each in grid order, so that as few trials as the
        grouping allows read the input column too; the groups come in the order of their streams' first points."""
        size = self.resources.coders_per_trial
        streams: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for point in self.grid():
            streams.setdefault(self.stream_key(point), []).append(point)
        groups = []
        for points in streams.values():
            points = sorted(points, key=lambda p: CoderConfig(**self.trial_settings(p)[1]).is_transcoder)
            groups += [points[i : i + size] for i in range(0, len(points), size)]
        return groups

    def grid(self) -> list[dict[str, Any]]:
        """Every combination of the space's lists, in spec order (grid search only)."""
        space = {"hookpoint": self.hookpoints, **{k: v for k, v in self.space.items() if k != "hookpoint"}}
        keys = list(space)
        return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(space[k] for k in keys))]

    def trial_settings(self, config: dict[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any]]:
        """A trial's sampled values -> (hookpoint, CoderConfig fields, TrainConfig fields)."""
        coder = {**self.coder, **{k: v for k, v in config.items() if k in CODER_FIELDS}}
        train = {**self.train, **{k: v for k, v in config.items() if k in TRAIN_FIELDS}}
        hookpoint = config.get("hookpoint") or self.hookpoints[0]
        return hookpoint, coder, train

    # ---- cross-field checks (field errors come from pydantic and from the configs' own checks) ----

    def check(self) -> SweepSpec:
        _check_keys("cache", self.cache, CACHE_FIELDS, required=("hookpoints",))
        try:
            self.cache_request()
        except (ValueError, TypeError) as err:
            raise SpecError(f"cache.{err}") from None
        _check_keys("coder", self.coder, CODER_FIELDS)
        _check_keys("train", self.train, TRAIN_FIELDS)
        # A bad fixed value is named where it is written, not as a fault of the first searched value.
        for section, config in (("coder", CoderConfig), ("train", TrainConfig)):
            fixed = getattr(self, section)
            try:
                config(**fixed)
            except ValueError as err:
                if str(err).split(":", 1)[0] in fixed:
                    raise SpecError(f"{section}.{err}") from None
        self._check_space()
        for key in ("coder", "train"):
            overlap = sorted(set(getattr(self, key)) & set(self.space))
            if overlap:
                raise SpecError(f"space.{overlap[0]}: also fixed in {key}; keep it in one of the two")
        missing = sorted(set(self.hookpoints) - set(self.cache["hookpoints"]))
        if missing:
            raise SpecError(
                f"space.hookpoint: {', '.join(missing)} not in cache.hookpoints ({', '.join(self.cache['hookpoints'])})"
            )
        if self.search.algorithm == "grid":
            for point in self.grid():
                self.check_trial(point)
        if self.training.checkpoint_every > self.training.steps:
            raise SpecError(
                f"training.checkpoint_every: {self.training.checkpoint_every} is more than training.steps "
                f"({self.training.steps}); a trial would never checkpoint before it ends"
            )
        lexical = [m for m in self.search.objectives if m in LEXICAL_METRICS]
        if lexical and not self.scoring.trial_latents:
            raise SpecError(
                f"scoring.trial_latents: search.objectives names {lexical[0]}, which trials measure on "
                "scoring.trial_latents sampled latents; give it a positive number (e.g. 256)"
            )
        if self.resources.coders_per_trial > 1 and self.search.algorithm != "grid":
            raise SpecError(
                f"resources.coders_per_trial: {self.resources.coders_per_trial} groups grid points that share a "
                "stream; with search.algorithm: optuna every trial is one suggested point (use 1)"
            )
        if self.resources.coders_per_trial > 1 and self.resources.workers > 1:
            raise SpecError(
                f"resources.coders_per_trial: {self.resources.coders_per_trial} needs resources.workers: 1; a "
                f"data-parallel trial (workers={self.resources.workers}) trains one coder"
            )
        if self.resources.workers > 1 and self.training.batch_size % self.resources.workers:
            raise SpecError(
                f"training.batch_size: {self.training.batch_size} does not split evenly over "
                f"resources.workers={self.resources.workers}"
            )
        return self

    def check_trial(self, config: dict[str, Any], d_in: int | None = None) -> None:
        """Raise SpecError naming the trial's values when its coder or training settings are invalid."""
        problem = self.trial_problem(config, d_in)
        if problem:
            values = ", ".join(f"{k}={v}" for k, v in config.items() if k != "hookpoint")
            raise SpecError(f"space: the trial with {values or 'the fixed settings'} is invalid: {problem}")

    def trial_problem(self, config: dict[str, Any], d_in: int | None = None) -> str | None:
        """Why a trial with these sampled values cannot run (None when it can)."""
        _, coder, train = self.trial_settings(config)
        try:
            cfg = CoderConfig(**coder)
            TrainConfig(**train)
            if d_in is not None:
                cfg.latents_for(d_in)
        except ValueError as err:
            return str(err)
        return None

    def _check_space(self) -> None:
        for key, values in self.space.items():
            where = f"space.{key}"
            if key not in SPACE_FIELDS:
                raise SpecError(f"{where}: not a searchable setting; choose from {', '.join(SPACE_FIELDS)}")
            if isinstance(values, dict):
                if self.search.algorithm == "grid":
                    raise SpecError(
                        f"{where}: grid search needs a list of values; distributions such as "
                        f"{{{next(iter(values), 'uniform')}: [low, high]}} need search.algorithm: optuna"
                    )
                _check_distribution(where, values)
            elif not isinstance(values, list) or not values:
                raise SpecError(
                    f"{where}: give a non-empty list of values, or one of {_DISTRIBUTION_FORMS}; got {values!r}"
                )
            else:
                for value in values:
                    problem = self.trial_problem({key: value})
                    if problem:
                        raise SpecError(f"{where}: {value!r} is invalid: {problem}")


def _check_keys(section: str, given: dict[str, Any], allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> None:
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise SpecError(f"{section}.{unknown[0]}: unknown setting; allowed: {', '.join(allowed)}")
    for key in required:
        if key not in given:
            raise SpecError(f"{section}.{key}: required")


def _check_distribution(where: str, dist: dict[str, Any]) -> None:
    if len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
        raise SpecError(
            f"{where}: a distribution is one of {', '.join(f'{{{d}: [low, high]}}' for d in DISTRIBUTIONS)}"
        )
    ((kind, bounds),) = dist.items()
    ok = isinstance(bounds, list) and len(bounds) == 2 and all(isinstance(b, (int, float)) for b in bounds)
    if not ok or not all(math.isfinite(b) for b in bounds) or bounds[0] >= bounds[1]:
        raise SpecError(f"{where}.{kind}: give [low, high] with low < high, got {bounds!r}")
    if kind in ("int", "logint") and not all(isinstance(b, int) for b in bounds):
        raise SpecError(f"{where}.{kind}: bounds must be integers, got {bounds!r}")
    if kind in ("loguniform", "logint") and bounds[0] <= 0:
        raise SpecError(f"{where}.{kind}: a log scale needs low > 0, got {bounds!r}")


def parse_spec(data: Any, source: str = "<spec>") -> SweepSpec:
    """Validate a spec given as a dict (parsed YAML); errors are `SpecError`s that start with `source`."""
    if not isinstance(data, dict):
        raise SpecError(f"spec {source}: expected a mapping of sections (name, cache, space, ...), got {data!r}")
    try:
        return SweepSpec.model_validate(data).check()
    except ValidationError as err:
        raise SpecError(f"spec {source}: {_describe(err)}") from None
    except SpecError as err:
        raise SpecError(f"spec {source}: {err}") from None


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a YAML sweep spec."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise SpecError(f"spec {path}: cannot read it ({err.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SpecError(f"spec {path}: not valid YAML: {err}") from None
    return parse_spec(data, str(path))


def _describe(err: ValidationError) -> str:
    """pydantic's first error as `field.path: what is wrong (allowed: ...)`."""
    first = err.errors()[0]
    loc = ".".join(str(part) for part in first["loc"] if part != "[key]")
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        model: type[BaseModel] = SweepSpec
        for part in first["loc"][:-1]:
            model = model.model_fields[part].annotation
        msg = f"unknown setting; allowed: {', '.join(model.model_fields)}"
    elif first["type"] == "missing":
        msg = "required"
    elif "input" in first and first["type"] not in ("model_type", "dict_type"):
        msg = f"{msg} (got {first['input']!r})"
    return f"{loc}: {msg}"
