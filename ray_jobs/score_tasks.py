"""The Ray tasks of `bae score`: a dictionary's lexical scores, its spliced fidelity and ablation, and the LLM
judge on a sample of its latents; each writes its per-coder file atomically, with the settings it used."""

from __future__ import annotations

import json
import math

import numpy as np

from bae_core.data.cache import open_filesystem, write_bytes_atomic
from bae_core.data.paths import local_folder
from ray_jobs.gpus import device_name, lm_device
from ray_jobs.score_plan import (
    EVALUATION_DIR,
    LLM_DIR,
    SCORES_DIR,
    ScoreOptions,
    ScoreTask,
    _settings_text,
    read_table,
)
from ray_jobs.trials import write_parquet_atomic


def _load_model(cache: str, dtype: str = "float32", device: str = "cpu"):
    import torch

    from bae_core.data.cache import open_cache
    from bae_core.data.lm import EMBEDDED_MODEL, load_model

    manifest = open_cache(cache)
    revision = None if manifest.model == EMBEDDED_MODEL else manifest.revision
    return load_model(manifest.model, revision=revision, dtype=getattr(torch, dtype), device=device)


def lexical_task(task: ScoreTask, run_dir: str, options: ScoreOptions, start: int = 0, stop: int | None = None) -> str:
    """Score the latents start..stop (all when `stop` is None) of one dictionary and write their rows to
    RUN/scores/<coder id>.parquet, or for a slice to RUN/scores/<coder id>/part-<start>.parquet; returns the path."""
    import pandas as pd

    from bae_core.evaluation.interp import ExampleOptions, coder_latent_scores, control_scores, neuron_baseline_scores

    loaded = _load_model(task.cache)
    decode = loaded.tokenizer.decode
    examples = ExampleOptions(min_examples=options.min_examples, test_windows=options.test_windows, seed=options.seed)
    latents = None if stop is None else np.arange(start, stop)
    if task.kind == "control":
        rows = control_scores(task.cache, task.hookpoint, task.activation, examples, decode=decode, latents=latents)
    elif task.checkpoint is None:
        rows = neuron_baseline_scores(
            loaded, task.cache, task.hookpoint, task.k, examples, decode=decode, latents=latents
        )
    else:
        coder = _load_coder(task.checkpoint)
        rows = coder_latent_scores(coder, task.cache, task.hookpoint, examples, decode=decode, latents=latents)
    frame = pd.DataFrame(rows)
    frame.insert(0, "coder_id", task.coder_id)
    frame.insert(1, "trial_id", task.trial_id)
    frame.insert(2, "hookpoint", task.hookpoint)
    frame.insert(3, "dictionary", _dictionary(task))
    frame.insert(4, "k", task.k)
    frame["scoring_settings"] = _settings_text(options.lexical_settings())
    name = f"{SCORES_DIR}/{task.coder_id}.parquet" if stop is None else _part(task.coder_id, start)
    write_parquet_atomic(run_dir, name, frame)
    return name


def _load_coder(checkpoint: str, device: str = "cpu"):
    """A trained coder from its checkpoint folder, local or at a URI (s3://...)."""
    from bae_core.coders.coder import SparseCoder

    with local_folder(checkpoint, names=("cfg.json", "sae.safetensors")) as d:
        return SparseCoder.load(d, device=device)


def _part(coder_id: str, start: int) -> str:
    return f"{SCORES_DIR}/{coder_id}/part-{start:08d}.parquet"


def _slices(task: ScoreTask, options: ScoreOptions) -> list[tuple[int, int | None]]:
    """The (start, stop) latent slices of a dictionary's lexical tasks; [(0, None)] for one task."""
    n = task.num_latents
    if n is None or n <= options.latents_per_task:
        return [(0, None)]
    chunks = math.ceil(n / options.latents_per_task)
    bounds = np.linspace(0, n, chunks + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _merge_parts(run_dir: str, task: ScoreTask, slices: list[tuple[int, int | None]]) -> None:
    """Join a dictionary's slice files into RUN/scores/<coder id>.parquet, then remove them."""
    import pandas as pd

    frames = [read_table(run_dir, _part(task.coder_id, start)) for start, _ in slices]
    write_parquet_atomic(run_dir, f"{SCORES_DIR}/{task.coder_id}.parquet", pd.concat(frames, ignore_index=True))
    fs, base = open_filesystem(run_dir)
    fs.delete_dir_contents(f"{base}/{SCORES_DIR}/{task.coder_id}", missing_dir_ok=True)
    fs.delete_dir(f"{base}/{SCORES_DIR}/{task.coder_id}")


def _dictionary(task: ScoreTask) -> str:
    return task.activation if task.checkpoint is None else f"{task.activation} {task.kind}"


def fidelity_sequences(cache: str, hookpoint: str, tokens: int, split: str = "heldout") -> np.ndarray:
    """Whole held-out sequences, evenly spaced over the split, holding about `tokens` tokens."""
    from bae_core.data.cache import open_cache
    from bae_core.evaluation.interp import split_tokens

    manifest = open_cache(cache)
    ids, _ = split_tokens(cache, hookpoint, split, manifest)
    n = min(len(ids), max(1, math.ceil(tokens / ids.shape[1])))
    return ids[np.unique(np.linspace(0, len(ids) - 1, n).round().astype(int))]


def evaluation_task(task: ScoreTask, run_dir: str, options: ScoreOptions) -> dict:
    """Spliced fidelity of a trained coder and its ablation by lexical score, on a GPU when Ray gave the task one
    (`options.gpus_per_task`, `ray_jobs.gpus.lm_device`); writes RUN/evaluation/<coder id>.json and returns its
    content (with `device_note` when the task asked for a GPU and ran on the CPU)."""
    import torch

    from bae_core.data.lm import resolve_hookpoints
    from bae_core.evaluation.fidelity import fidelity_and_ablation

    device, note = lm_device(options.gpus_per_task)
    loaded = _load_model(task.cache, options.lm_dtype, device)
    (hook,) = resolve_hookpoints(loaded, [task.hookpoint])
    coder = _load_coder(task.checkpoint, device)
    ids = torch.from_numpy(fidelity_sequences(task.cache, task.hookpoint, options.fidelity_tokens))
    scores = counts = None
    if options.ablation_bins:
        columns = ["latent", "token_auroc", "firing_count"]
        table = read_table(run_dir, f"{SCORES_DIR}/{task.coder_id}.parquet", columns).sort_values("latent")
        scores, counts = table["token_auroc"].to_numpy(dtype=float), table["firing_count"].to_numpy()
    # One pass gives both: the clean and spliced forwards of each batch serve the fidelity and the ablation.
    fidelity, ablation = fidelity_and_ablation(
        loaded, hook, coder, ids, scores, counts, bins=options.ablation_bins, batch_size=options.lm_batch_size
    )
    result = {
        "coder_id": task.coder_id,
        "settings": options.evaluation_settings(),
        "fidelity": fidelity.summary(),
        "ablation": ablation,
        "device": device_name(device),  # not a setting: the numbers depend on lm_dtype, not on the device
        **({"device_note": note} if note else {}),
    }
    fs, base = open_filesystem(run_dir)
    write_bytes_atomic(fs, f"{base}/{EVALUATION_DIR}/{task.coder_id}.json", json.dumps(result, indent=2).encode())
    return result


def llm_task(task: ScoreTask, run_dir: str, options: ScoreOptions) -> int:
    """The LLM judge on up to `options.llm_latents` eligible latents of one dictionary; writes
    RUN/llm/<coder id>.parquet (one row per judged latent) and returns its row count. A judge that answered
    none of the prompts raises JudgeUnreachable and writes nothing; a file whose rows count failed prompts
    (`llm_failed_prompts`) is incomplete, and `bae score` asks those prompts again on its next run."""
    import pandas as pd

    from bae_core.evaluation.interp import ExampleOptions, llm_examples
    from bae_core.evaluation.judge import judge_latents, require_answers

    lexical = read_table(run_dir, f"{SCORES_DIR}/{task.coder_id}.parquet", ["latent", "eligible"])
    eligible = lexical.loc[lexical["eligible"], "latent"].to_numpy()
    rng = np.random.default_rng(options.seed)
    chosen = np.sort(rng.choice(eligible, min(options.llm_latents, len(eligible)), replace=False))
    loaded = _load_model(task.cache)
    examples_options = ExampleOptions(
        min_examples=options.min_examples, test_windows=options.test_windows, seed=options.seed
    )
    coder = None if task.checkpoint is None else _load_coder(task.checkpoint)
    control = task.activation if task.kind == "control" else None
    examples = llm_examples(loaded, coder, task.cache, task.hookpoint, task.k, examples_options, chosen, control)
    results = judge_latents(options.llm, examples, seed=options.seed)
    require_answers(options.llm, results)  # failures are not results
    frame = pd.DataFrame([{"latent": int(latent), **results[int(latent)]} for latent in chosen])
    frame.insert(0, "coder_id", task.coder_id)
    frame["llm_settings"] = _settings_text(options.llm_settings())
    write_parquet_atomic(run_dir, f"{LLM_DIR}/{task.coder_id}.parquet", frame)
    return len(frame)
