"""The activations `bae probe` probes: per (model, task), every hookpoint's activation at each prompt's last token,
computed once by `LastTokenWorker` Ray actors (on GPUs with `scoring.gpus_per_task`, `ray_jobs.gpus`) and shared by
every dictionary on that hookpoint, and by later runs of the command.

    RUN/probing/activations/<model>/<hookpoint>/<task>.safetensors   float16 `input`/`output`, `labels`, `train`,
                                                                     `tokens`; the settings that made it (metadata)
"""

from __future__ import annotations

import json
import re

from bae_core.data.cache import open_cache, open_filesystem, write_bytes_atomic
from bae_core.evaluation import probing
from ray_jobs.gpus import fallback_notice, gpu_slots, lm_device

PROBING_DIR = "probing"


def model_key(cache: str) -> tuple[str, str]:
    """(the cache's model and revision as one string, a folder name for it)."""
    manifest = open_cache(cache)
    model = f"{manifest.model}@{manifest.revision}" if manifest.revision else manifest.model
    return model, re.sub(r"[^A-Za-z0-9._-]+", "_", model)


def activations_path(folder: str, hookpoint: str, task: str) -> str:
    return f"{PROBING_DIR}/activations/{folder}/{hookpoint}/{task}.safetensors"


def activation_stale(fs, base: str, name: str, settings: dict) -> str | None:
    """Why an activation file must be (re)made: "missing" or the settings that differ; None when up to date."""
    import struct

    path = f"{base}/{name}"
    if fs.get_file_info(path).type.name == "NotFound":
        return "missing"
    with fs.open_input_file(path) as f:
        (size,) = struct.unpack("<Q", f.read(8))
        recorded = json.loads(json.loads(f.read(size))["__metadata__"]["settings"])
    changed = [k for k in sorted({*settings, *recorded}) if recorded.get(k) != settings.get(k)]
    if not changed:
        return None
    return "made with " + ", ".join(f"{k}={recorded.get(k)!r} (now {settings.get(k)!r})" for k in changed)


class LastTokenWorker:
    """A Ray actor holding one cache's language model: the last-token activations of every hookpoint of a task."""

    def __init__(self, cache: str, gpus: float = 0.0):
        from bae_core.data.lm import resolve_hookpoints
        from ray_jobs.score_tasks import _load_model

        self.device, self.note = lm_device(gpus)  # on a GPU when Ray gave the actor one; float32 on either
        self.loaded = _load_model(cache, device=self.device)
        self.resolve = lambda names: resolve_hookpoints(self.loaded, names)

    def run(self, run_dir: str, folder: str, model: str, hookpoints: list[str], task: str, options) -> tuple:
        import numpy as np
        from safetensors.numpy import save

        data = probing.load_task(task, options.max_examples, options.seed)
        captured, lengths = probing.last_token_activations(
            self.loaded,
            self.resolve(hookpoints),
            data.prompts,
            max_tokens=options.max_tokens,
            batch_size=options.lm_batch_size,
        )
        fs, base = open_filesystem(run_dir)
        metadata = {"settings": json.dumps(options.activation_settings(model)), "positive": data.positive}
        for hookpoint, columns in captured.items():
            arrays = {c: v.astype(np.float16) for c, v in columns.items()}
            arrays.update(labels=data.labels, train=data.train.astype(np.int8), tokens=lengths.astype(np.int32))
            payload = save(arrays, metadata=metadata)
            write_bytes_atomic(fs, f"{base}/{activations_path(folder, hookpoint, task)}", payload)
        return task, self.note


def read_activations(run_dir: str, folder: str, hookpoint: str, task: str) -> tuple[dict, str]:
    """A task's stored activations at a hookpoint (float32 `input`/`output`, `labels`, boolean `train`, `tokens`)
    and its positive class."""
    import struct

    import numpy as np
    from safetensors.numpy import load

    fs, base = open_filesystem(run_dir)
    with fs.open_input_stream(f"{base}/{activations_path(folder, hookpoint, task)}") as f:
        payload = f.read()
    (size,) = struct.unpack("<Q", payload[:8])
    positive = json.loads(payload[8 : 8 + size])["__metadata__"]["positive"]
    arrays = load(payload)
    for column in ("input", "output"):
        if column in arrays:
            arrays[column] = arrays[column].astype(np.float32)
    arrays["train"] = arrays["train"].astype(bool)
    return arrays, positive


def capture_activations(run_dir: str, cache: str, hookpoints: list[str], names: list[str], options, *, step, notice):
    """The activations of the tasks `names` at `hookpoints` of one cache, by a pool of `LastTokenWorker` actors
    (each with `options.gpus_per_task` GPUs); `step(what)` after each task, `notice(text)` once per reason an actor
    that asked for a GPU runs on the CPU."""
    import ray
    from ray.util import ActorPool

    model, folder = model_key(cache)
    slots = max(1, int(ray.available_resources().get("CPU", 1)))
    if options.gpus_per_task:  # an actor still waiting for a GPU would hold its share of the tasks until the end
        slots = min(slots, max(1, gpu_slots(options.gpus_per_task)))
    gpus = options.gpus_per_task
    worker = ray.remote(num_cpus=1, num_gpus=gpus, max_restarts=1, max_task_retries=2)(LastTokenWorker)
    actors = [worker.remote(cache, gpus) for _ in range(min(slots, len(names)))]
    notes = set()
    try:
        for name, note in ActorPool(actors).map_unordered(
            lambda actor, name, args=(run_dir, folder, model, hookpoints): actor.run.remote(*args, name, options), names
        ):
            if note and note not in notes and notice is not None:
                notice(fallback_notice(gpus, note))
            notes.add(note)
            step(f"activations {name}")
    finally:
        for actor in actors:  # their CPUs and GPUs go to the probes and other work
            ray.kill(actor)
