"""`bae probe RUN`: sparse probing of a run's dictionaries on labelled text tasks, with Ray (evaluation.md §7).

    the dictionaries of `ray_jobs.score_plan.plan` (trained coders and the MLP-neuron baselines; not the controls)
    and, per hookpoint, the raw activations it offers (MLP input, MLP output, the MLP's neurons, dense)
      -> per (model, task), a Ray actor holding the language model (on a GPU with `scoring.gpus_per_task`): every
         hookpoint's activations at each prompt's last token (`ray_jobs.probe_activations`)
                                   -> RUN/probing/activations/<model>/<hookpoint>/<task>.safetensors
      -> per dictionary, a Ray task: its features on each task and the k-sparse probes
                                   -> RUN/probing/results/<coder id>/<task>.json
      -> RUN/probing.parquet (one row per dictionary x task x k) and, when RUN/coders.parquet exists, the per-coder
         mean accuracies with 95% t-intervals over tasks merged into it (`with_probing`; `bae score` merges them too)

The activations of a task are the same for every dictionary on that hookpoint, so they are computed once and shared
(and by later runs of the command). Every file records the settings that made it; running `bae probe` again does
only the (dictionary, task) results that are missing or were made with other settings, and says why it redoes one.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace

from bae_core.data.cache import open_cache, open_filesystem, write_bytes_atomic
from bae_core.evaluation import probing
from ray_jobs.gpus import check_gpus_per_task, require_gpus
from ray_jobs.lock import folder_lock
from ray_jobs.probe_activations import (
    PROBING_DIR,
    activation_stale,
    activations_path,
    capture_activations,
    model_key,
    read_activations,
)
from ray_jobs.score_plan import CODERS_TABLE, ScoreTask, plan, read_table, stale_reason
from ray_jobs.sweep_job import SPEC_COPY
from ray_jobs.trials import TRIALS_TABLE, write_parquet_atomic

PROBING_TABLE = "probing.parquet"
RAW = {"raw_input": "input", "raw_output": "output", "mlp_neurons_dense": "input"}
"""Baseline dictionaries made of a hookpoint's raw activations, and the activation each is read from."""

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeOptions:
    """How `bae probe` probes; `from_run` takes the defaults from the sweep spec's `probing` section."""

    tasks: tuple[str, ...] = probing.DEFAULT_TASKS
    """Task names as given: full (113_movie_sent), without their number (movie_sent), or `all`."""
    ks: tuple[int, ...] = probing.DEFAULT_KS
    max_examples: int = probing.DEFAULT_MAX_EXAMPLES
    max_tokens: int = probing.DEFAULT_MAX_TOKENS
    seed: int = 0
    lm_batch_size: int = 16
    gpus_per_task: float = 0.0
    """GPUs of each actor computing activations (the spec's `scoring.gpus_per_task`); changes no setting below."""

    def __post_init__(self):
        if not self.tasks:
            raise ValueError("tasks: name at least one task, or all")
        if not self.ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.ks):
            raise ValueError(f"k: give positive whole numbers, got {list(self.ks)}")
        if self.max_examples < 6:
            raise ValueError(f"max_examples: must be >= 6 (3 prompts per class), got {self.max_examples}")
        for name in ("max_tokens", "lm_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        check_gpus_per_task(self.gpus_per_task)

    def activation_settings(self, model: str) -> dict:
        """What a task's activation file depends on."""
        return {
            "probing_version": probing.PROBING_VERSION,
            "model": model,
            "max_examples": self.max_examples,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
        }

    def result_settings(self, model: str) -> dict:
        """What a (dictionary, task) result depends on."""
        return {
            **self.activation_settings(model),
            "ks": sorted(set(self.ks)),
            "probe_c": probing.PROBE_C,
            "full_cs": list(probing.FULL_CS),
            "shuffles": probing.SHUFFLES,
        }

    @classmethod
    def from_run(cls, run_dir: str, **overrides) -> ProbeOptions:
        """The run's `probing` settings (RUN/spec.json), with `overrides` that are not None on top; `tasks` resolved
        to binary task names (`bae_core.evaluation.probing.resolve_tasks`)."""
        fs, base = open_filesystem(run_dir)
        spec, gpus = {}, None
        if fs.get_file_info(f"{base}/{SPEC_COPY}").type.name != "NotFound":
            with fs.open_input_stream(f"{base}/{SPEC_COPY}") as f:
                whole = json.loads(f.read().decode())
            spec, gpus = whole.get("probing") or {}, (whole.get("scoring") or {}).get("gpus_per_task")
        values = {k: spec[k] for k in ("tasks", "ks", "max_examples", "max_tokens", "seed") if spec.get(k) is not None}
        values.update({"gpus_per_task": gpus} if gpus is not None else {})
        values.update({k: v for k, v in overrides.items() if v is not None})
        for name in ("tasks", "ks"):
            if name in values:
                values[name] = tuple([values[name]] if isinstance(values[name], (str, int)) else values[name])
        options = cls(**values)
        tasks, _ = probing.resolve_tasks(options.tasks)
        return replace(options, tasks=tuple(tasks), ks=tuple(sorted(set(options.ks))))


# ---- what to probe -------------------------------------------------------------------------------------------


def probe_plan(run_dir: str, options: ProbeOptions) -> list[ScoreTask]:
    """The run's dictionaries to probe: `plan`'s coders and neuron baselines (not its controls), then per
    (cache, hookpoint) the raw baselines (`RAW`; a residual hookpoint has only its output). A k larger than a
    dictionary is a ValueError that names it."""
    from bae_core.data.lm import model_shape

    tasks = [t for t in plan(run_dir) if t.kind != "control"]
    hookpoints = sorted({(t.cache, t.hookpoint) for t in tasks})
    for cache, hookpoint in hookpoints:
        columns = open_cache(cache).hookpoints[hookpoint].columns
        for activation, column in RAW.items():
            if column in columns:
                width = columns[column] if activation != "mlp_neurons_dense" else None
                coder_id = f"{activation.replace('_', '-')}-{hookpoint}"
                tasks.append(
                    ScoreTask(
                        coder_id=coder_id,
                        trial_id=None,
                        cache=cache,
                        hookpoint=hookpoint,
                        k=0,
                        checkpoint=None,
                        activation=activation,
                        kind="baseline",
                        num_latents=width,
                    )
                )
    shapes = {}
    for t in tasks:
        width = t.num_latents
        if width is None and t.activation.startswith("mlp_neurons"):
            manifest = open_cache(t.cache)
            shape = shapes.setdefault(t.cache, model_shape(manifest.model))
            width = shape.d_mlp if shape else None
        if width is not None and max(options.ks) > width:
            raise ValueError(
                f"--k: {max(options.ks)} is more than the {width} latents of {t.coder_id}; choose k <= {width}"
            )
    return tasks


def result_path(coder_id: str, task: str) -> str:
    return f"{PROBING_DIR}/results/{coder_id}/{task}.json"


# ---- the Ray work --------------------------------------------------------------------------------------------


def probe_task(task: ScoreTask, run_dir: str, options: ProbeOptions, names: list[str]) -> int:
    """Probe one dictionary on the tasks `names`, writing RUN/probing/results/<coder id>/<task>.json for each;
    returns how many it wrote."""
    model, folder = model_key(task.cache)
    coder = loaded = hook = None
    if task.checkpoint is not None:
        from ray_jobs.score_tasks import _load_coder

        coder = _load_coder(task.checkpoint)
        if max(options.ks) > coder.num_latents:
            raise ValueError(f"--k: {max(options.ks)} is more than the {coder.num_latents} latents of {task.coder_id}")
    elif task.activation.startswith("mlp_neurons"):
        from bae_core.data.lm import resolve_hookpoints
        from ray_jobs.score_tasks import _load_model

        loaded = _load_model(task.cache)
        (hook,) = resolve_hookpoints(loaded, [task.hookpoint])
    fs, base = open_filesystem(run_dir)
    for name in names:
        arrays, positive = read_activations(run_dir, folder, task.hookpoint, name)
        if coder is not None:
            x = probing.coder_features(coder, arrays)
        elif loaded is not None:
            x = probing.neuron_features(loaded, hook, arrays["input"], None if task.activation in RAW else task.k)
        else:
            x = arrays[RAW[task.activation]]
        rows = probing.probe(
            x, arrays["labels"], arrays["train"], options.ks, seed=options.seed, full=task.activation in RAW
        )
        result = {
            "coder_id": task.coder_id,
            "task": name,
            "positive": positive,
            "mean_tokens": float(arrays["tokens"].mean()),
            "settings": options.result_settings(model),
            "rows": rows,
        }
        write_bytes_atomic(fs, f"{base}/{result_path(task.coder_id, name)}", json.dumps(result).encode())
    return len(names)


def run_probe(run_dir: str, options: ProbeOptions, *, progress=None, notice=None):
    """Probe every dictionary of the run on `options.tasks` (Ray) where its result is missing or stale, holding
    the run folder's lock; writes RUN/probing.parquet and refreshes RUN/coders.parquet; returns the probing table."""
    with folder_lock(run_dir, "bae probe"):
        return _run_probe(run_dir, options, progress=progress, notice=notice)


def _run_probe(run_dir: str, options: ProbeOptions, *, progress=None, notice=None):
    import ray

    dictionaries = probe_plan(run_dir, options)
    fs, base = open_filesystem(run_dir)
    keys = {t.cache: model_key(t.cache) for t in dictionaries}

    redone: dict[tuple[str, str], list[str]] = {}  # (what, reason) -> which: one notice per reason

    def redo(reason: str | None, what: str, which: str) -> bool:
        if reason not in (None, "missing"):
            redone.setdefault((what, reason), []).append(which)
        return reason is not None

    hookpoints = {}
    for t in dictionaries:
        hookpoints.setdefault(t.cache, set()).add(t.hookpoint)
    capture = []  # (cache, task) pairs whose activations must be (re)made, at every hookpoint of the cache
    for cache, names in hookpoints.items():
        model, folder = keys[cache]
        for task in options.tasks:
            settings = options.activation_settings(model)
            reasons = {activation_stale(fs, base, activations_path(folder, h, task), settings) for h in names}
            reason = next((r for r in sorted(reasons, key=str) if r is not None), None)
            if redo(reason, "activations", task):
                capture.append((cache, task))
    work = {}
    for t in dictionaries:
        model, _ = keys[t.cache]
        settings = options.result_settings(model)
        todo = [
            n
            for n in options.tasks
            if (t.cache, n) in capture
            or redo(
                stale_reason(fs, base, result_path(t.coder_id, n), settings), "probe results", f"{t.coder_id} on {n}"
            )
        ]
        if todo:
            work[t.coder_id] = (t, todo)
    for (what, reason), which in redone.items():
        if notice is not None:
            notice(f"redoing {len(which)} {what} ({which[0]}{', ...' if len(which) > 1 else ''}): {reason}")
    total, done = len(capture) + len(work), 0

    def step(what: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total, what)

    if capture:  # a cluster that can never give the GPUs fails before any work
        waits = require_gpus(options.gpus_per_task, "the probing activations")
        if waits is not None:
            (notice or log.warning)(waits)
    for cache in sorted({c for c, _ in capture}):
        names = [n for c, n in capture if c == cache]
        capture_activations(run_dir, cache, sorted(hookpoints[cache]), names, options, step=step, notice=notice)
    remote = ray.remote(num_cpus=1, max_retries=2)(probe_task)
    pending = {remote.remote(t, run_dir, options, todo): t.coder_id for t, todo in work.values()}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        ray.get(ready[0])
        step(f"probes {pending.pop(ready[0])}")
    table = write_probing_table(run_dir, dictionaries, options)
    refresh_coders(run_dir)
    return table


# ---- tables --------------------------------------------------------------------------------------------------


def write_probing_table(run_dir: str, dictionaries: list[ScoreTask], options: ProbeOptions):
    """RUN/probing.parquet from the result files of `options.tasks`: one row per dictionary x task x probe."""
    import pandas as pd

    trials = read_table(run_dir, TRIALS_TABLE)
    seeds = dict(zip(trials["trial_id"], trials["seed"], strict=True)) if "seed" in trials else {}
    rows = []
    fs, base = open_filesystem(run_dir)
    for t in dictionaries:
        for name in options.tasks:
            with fs.open_input_stream(f"{base}/{result_path(t.coder_id, name)}") as f:
                result = json.loads(f.read().decode())
            about = {
                "coder_id": t.coder_id,
                "trial_id": t.trial_id,
                "dictionary": t.activation if t.checkpoint is None else f"{t.activation} {t.kind}",
                "activation": t.activation,
                "kind": t.kind,
                "hookpoint": t.hookpoint,
                "k": t.k if t.activation not in RAW else None,
                "num_latents": t.num_latents,
                "seed": seeds.get(t.trial_id),
                "origin": getattr(t, "origin", None),
                "task": name,
                "positive": result["positive"],
                "mean_tokens": result["mean_tokens"],
            }
            settings = json.dumps(result["settings"], sort_keys=True)
            rows += [{**about, **row, "probing_settings": settings} for row in result["rows"]]
    table = pd.DataFrame(rows)
    write_parquet_atomic(run_dir, PROBING_TABLE, table)
    return table


def with_probing(run_dir: str, coders):
    """`coders` with the per-coder probing means of RUN/probing.parquet (`analysis.probing.coder_summary`), when
    `bae probe` has run; earlier probing columns are replaced."""
    from analysis.probing import coder_summary

    coders = coders.drop(columns=[c for c in coders.columns if c.startswith("probe_")])
    fs, base = open_filesystem(run_dir)
    if fs.get_file_info(f"{base}/{PROBING_TABLE}").type.name == "NotFound":
        return coders
    return coders.merge(coder_summary(read_table(run_dir, PROBING_TABLE)), on="coder_id", how="left")


def refresh_coders(run_dir: str) -> None:
    """Rewrite RUN/coders.parquet with the probing means, when `bae score` has written it."""
    fs, base = open_filesystem(run_dir)
    if fs.get_file_info(f"{base}/{CODERS_TABLE}").type.name != "NotFound":
        write_parquet_atomic(run_dir, CODERS_TABLE, with_probing(run_dir, read_table(run_dir, CODERS_TABLE)))
