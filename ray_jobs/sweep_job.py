"""`bae sweep SPEC.yaml`: Ray Tune over coder and training settings, one trained coder per trial (or a group of
coders that read one stream, `resources.coders_per_trial`; `ray_jobs.sweep_trial`).

    spec (validated) -> the activation cache (`bae cache`, resumed or reused)
      -> Ray Tune: grid search or Optuna (multi-objective with several objectives), at most
         `max_concurrent` trials at once, each holding `workers x (cpus, gpus)_per_worker`
      -> each trial (`ray_jobs.sweep_trial`): builds or restores its coder(s), trains `steps` steps, logs
         training metrics every `log_every` steps, checkpoints every `checkpoint_every` steps
         (sae.safetensors + cfg.json + trainer state + the training log so far, training_log.parquet), then
         measures FVU, L0, dead / frequent / dense fractions on held-out tokens and reports them with the final
         checkpoint
         (one worker: in the trial's own process; several: a data-parallel TorchTrainer)
      -> <run>/trials.parquet: one row per finished or failed coder (config + metrics + checkpoint),
         rewritten as trials finish.

Running the same spec again with the same output resumes the sweep (`Tuner.restore`): finished trials
are kept, interrupted ones continue from their last checkpoint, failed ones are retried from theirs.
While it runs, the sweep holds the run folder's lock (`ray_jobs.lock`): a second command writing the same
folder is refused. A finished cache with a damaged shard is refused too, with the `bae cache` command that
repairs it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from typing import Any

from bae_core.data.cache import open_filesystem, write_bytes_atomic
from bae_core.data.paths import relative_to
from ray_jobs.lock import folder_lock
from ray_jobs.runtime import storage_path
from ray_jobs.spec import SpecError, SweepSpec
from ray_jobs.sweep_trial import GROUP_KEY, run_trial
from ray_jobs.trials import TrialsTable, code_version

log = logging.getLogger(__name__)

TUNE_DIR = "tune"
SPEC_COPY = "spec.json"
# Settings that may change between a sweep and its resumption: they do not change any trial's result.
RESUMABLE_CHANGES = (
    "description",
    "search.max_concurrent",
    "resources.max_failures",
    "training.log_every",
    # Read by `bae score` only.
    "scoring.fidelity_tokens",
    "scoring.ablation_bins",
    "scoring.lm_batch_size",
    "scoring.lm_dtype",
    "scoring.gpus_per_task",
    "probing",  # read by `bae probe` only
)


# ---- the driver ---------------------------------------------------------------------------------------


def param_space(spec: SweepSpec) -> dict[str, Any]:
    """The spec's search space in Tune's terms; with `resources.coders_per_trial` > 1, a grid over the groups of
    points that share a stream (`SweepSpec.trial_groups`)."""
    from ray import tune

    if spec.search.algorithm == "grid" and spec.resources.coders_per_trial > 1:
        return {GROUP_KEY: tune.grid_search(spec.trial_groups())}

    space = {"hookpoint": spec.hookpoints, **{k: v for k, v in spec.space.items() if k != "hookpoint"}}
    if spec.search.algorithm == "grid":
        return {key: tune.grid_search(values) for key, values in space.items()}
    samplers = {
        "uniform": tune.uniform,
        "loguniform": tune.loguniform,
        "int": lambda lo, hi: tune.randint(lo, hi + 1),
        "logint": lambda lo, hi: tune.lograndint(lo, hi + 1),
    }
    out = {}
    for key, values in space.items():
        if isinstance(values, dict):
            ((kind, (lo, hi)),) = values.items()
            out[key] = samplers[kind](lo, hi)
        else:
            out[key] = tune.choice(values)
    return out


def trial_resources(spec: SweepSpec) -> dict[str, float]:
    """What Tune reserves for one trial. A multi-worker trial's own process only drives its TorchTrainer,
    whose workers reserve their resources themselves."""
    res = spec.resources
    if res.workers > 1:
        return {"cpu": 0.01}
    return {"cpu": res.cpus_per_worker, "gpu": res.gpus_per_worker}


def _search_alg(spec: SweepSpec):
    from ray.tune.search import ConcurrencyLimiter

    if spec.search.algorithm != "optuna":
        return None
    from ray.tune.search.optuna import OptunaSearch

    metrics, modes = list(spec.search.objectives), list(spec.search.objectives.values())
    searcher = OptunaSearch(
        metric=metrics if len(metrics) > 1 else metrics[0],
        mode=modes if len(modes) > 1 else modes[0],
        seed=spec.search.seed,
    )
    if spec.search.max_concurrent:
        return ConcurrencyLimiter(searcher, max_concurrent=spec.search.max_concurrent)
    return searcher


def _check_same_spec(spec: SweepSpec, run_dir: str) -> None:
    """Refuse to resume a run folder whose sweep had other settings; name the first difference."""
    fs, base = open_filesystem(run_dir)
    path = f"{base}/{SPEC_COPY}"
    current = _flatten(spec.model_dump(mode="json"))
    info = fs.get_file_info(path)
    if info.type.name == "NotFound":
        write_bytes_atomic(fs, path, json.dumps(spec.model_dump(mode="json"), indent=2).encode())
        return
    with fs.open_input_stream(path) as f:
        saved = _flatten(json.loads(f.read().decode()))
    # A setting added to the spec format after the run began is the same as before when it has its default.
    defaults = _flatten(SweepSpec(name="defaults", cache={}).model_dump(mode="json"))
    for key in sorted(set(saved) | set(current)):
        if key.startswith(RESUMABLE_CHANGES) or key == "output":
            continue
        if key not in saved and key in defaults and current.get(key) == defaults[key]:
            continue
        if saved.get(key) != current.get(key):
            raise SpecError(
                f"spec: {run_dir} holds a sweep with {key}={saved.get(key)!r}, this spec has {current.get(key)!r}; "
                "resume it with the same spec, or choose another output folder"
            )


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict) and key not in ("space",):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


def _keep_credentials_out_of_tune() -> None:
    """Ray Tune copies the driver's AWS credentials into every trial's runtime environment
    (ray.tune.execution.class_cache), which Ray's runtime-env agent logs in plain text and the cluster keeps in
    its state. Trials read shared storage with their node's own credentials instead, as the tasks of `bae cache`
    and `bae score` do."""
    try:
        from ray.tune.execution import class_cache
    except ImportError:
        return
    propagated = getattr(class_cache, "ENV_VARS_TO_PROPAGATE", None)
    if isinstance(propagated, (set, frozenset)):
        class_cache.ENV_VARS_TO_PROPAGATE = set(propagated) - set(CREDENTIAL_VARIABLES)


def run_sweep(spec: SweepSpec, *, cache_progress=None, quiet: bool = False):
    """Run (or resume) the sweep, holding the run folder's lock; returns Tune's ResultGrid. The cache is created
    or resumed first."""
    with folder_lock(storage_path(spec.run_dir), "bae sweep"):
        return _run_sweep(spec, cache_progress=cache_progress, quiet=quiet)


def _run_sweep(spec: SweepSpec, *, cache_progress=None, quiet: bool = False):
    from ray import tune

    from bae_core.data.cache import CacheError
    from ray_jobs.cache_job import cache_command, run_cache

    # Trials checkpoint often by design (a failure loses at most `checkpoint_every` steps).
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    _keep_credentials_out_of_tune()
    run_dir = storage_path(spec.run_dir)
    cache = storage_path(spec.cache_root)
    _check_same_spec(spec, run_dir)
    request = dataclasses.replace(spec.cache_request(), root=cache)
    try:
        # A finished cache is damaged only by something outside the sweep: refused, not rewritten behind its back.
        manifest = run_cache(request, progress=cache_progress, repair=False)
    except CacheError as err:
        generic = "run `bae cache` again with the same arguments"
        if generic not in str(err):
            raise
        raise CacheError(str(err).replace(generic, f"run `{cache_command(request)}`")) from err
    if spec.search.algorithm == "grid":
        for point in spec.grid():
            hp = manifest.hookpoints[point["hookpoint"]]
            spec.check_trial(point, d_in=hp.columns.get("input", hp.columns["output"]))

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, spec_data=spec.model_dump(mode="json"), cache=cache),
        trial_resources(spec),
    )
    provenance = {
        "model": manifest.model,
        "revision": manifest.revision,
        "dataset": manifest.dataset,
        # Relative to the run folder when the cache is inside it, so that the folder can be moved.
        "cache": relative_to(run_dir, cache),
        "sweep": spec.name,
        "code_version": code_version(),
        "spec": spec.model_dump(mode="json"),
    }
    experiment = f"{run_dir.rstrip('/')}/{TUNE_DIR}"
    if tune.Tuner.can_restore(experiment):
        if not quiet:
            print(f"resuming the sweep in {experiment}", file=sys.stderr, flush=True)
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(spec),
            tune_config=tune.TuneConfig(
                search_alg=_search_alg(spec),
                num_samples=spec.search.num_samples,
                max_concurrent_trials=spec.search.max_concurrent if spec.search.algorithm == "grid" else None,
                # A new trial runs in the finished one's process: no process start or imports of torch and
                # the toolkit (about 4 s a trial on 2 cores, see benchmarks/sweep_overhead.py).
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=TUNE_DIR,
                storage_path=run_dir,
                failure_config=tune.FailureConfig(max_failures=spec.resources.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=3),
                callbacks=[TrialsTable(run_dir, spec.num_trials(), provenance, quiet)],
                verbose=0,
            ),
        )
    return tuner.fit()
