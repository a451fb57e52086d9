"""`bae score RUN`: the lexical interpretability score of every trained coder of a sweep, with Ray tasks.

    RUN/trials.parquet (finished trials: checkpoint, cache, hookpoint, k)
      -> one Ray task per coder, and one per (hookpoint, k) for the MLP-neuron baseline:
         bae_core.interp on the cache's held-out split -> RUN/scores/<coder id>.parquet (atomic)
      -> RUN/latents.parquet: one row per latent of every coder (coder id, trial, hookpoint, latent index,
         firing count and rate, eligibility, explanation, every score and control)

Running it again scores only the coders without a file under RUN/scores/, then rewrites latents.parquet.
"""

from __future__ import annotations

from dataclasses import dataclass

from bae_core.cache import open_filesystem
from ray_jobs.sweep_job import TRIALS_TABLE, write_parquet_atomic

LATENTS_TABLE = "latents.parquet"
SCORES_DIR = "scores"


@dataclass(frozen=True)
class ScoreTask:
    """One dictionary to score: a trained coder (`checkpoint`) or the neuron baseline (`checkpoint` None)."""

    coder_id: str
    trial_id: str | None
    cache: str
    hookpoint: str
    k: int
    checkpoint: str | None


def plan(run_dir: str) -> list[ScoreTask]:
    """The coders of a run's finished trials, then one neuron baseline per (cache, hookpoint, k)."""
    import pandas as pd

    fs, base = open_filesystem(run_dir)
    path = f"{base}/{TRIALS_TABLE}"
    if fs.get_file_info(path).type.name == "NotFound":
        raise ValueError(f"run {run_dir}: no {TRIALS_TABLE}; run `bae sweep` into this folder first")
    with fs.open_input_file(path) as f:
        trials = pd.read_parquet(f)
    finished = trials[trials["status"] == "finished"]
    if finished.empty:
        raise ValueError(f"run {run_dir}: {TRIALS_TABLE} has no finished trial to score")
    tasks = [
        ScoreTask(f"trial-{r.trial_id}", r.trial_id, r.cache, r.hookpoint, int(r.k), r.checkpoint)
        for r in finished.itertuples()
    ]
    baselines = sorted({(r.cache, r.hookpoint, int(r.k)) for r in finished.itertuples()})
    has_input = [(c, h, k) for c, h, k in baselines if h.endswith(".mlp")]
    tasks += [ScoreTask(f"neurons-{h}-k{k}", None, c, h, k, None) for c, h, k in has_input]
    return tasks


def score_task(task: ScoreTask, run_dir: str, min_examples: int | None, seed: int) -> int:
    """Score one dictionary and write its rows to RUN/scores/<coder id>.parquet; returns the row count."""
    import pandas as pd

    from bae_core.cache import open_cache
    from bae_core.coder import SparseCoder
    from bae_core.interp import ExampleOptions, coder_latent_scores, neuron_baseline_scores
    from bae_core.lm import EMBEDDED_MODEL, load_model

    manifest = open_cache(task.cache)
    loaded = load_model(manifest.model, revision=None if manifest.model == EMBEDDED_MODEL else manifest.revision)
    decode = loaded.tokenizer.decode
    options = ExampleOptions(min_examples=min_examples, seed=seed)
    if task.checkpoint is None:
        rows = neuron_baseline_scores(loaded, task.cache, task.hookpoint, task.k, options, decode=decode)
        dictionary = "mlp_neurons"
    else:
        coder = SparseCoder.load(task.checkpoint)
        rows = coder_latent_scores(coder, task.cache, task.hookpoint, options, decode=decode)
        dictionary = f"{coder.cfg.activation} {coder.cfg.kind}"
    frame = pd.DataFrame(rows)
    frame.insert(0, "coder_id", task.coder_id)
    frame.insert(1, "trial_id", task.trial_id)
    frame.insert(2, "hookpoint", task.hookpoint)
    frame.insert(3, "dictionary", dictionary)
    frame.insert(4, "k", task.k)
    write_parquet_atomic(run_dir, f"{SCORES_DIR}/{task.coder_id}.parquet", frame)
    return len(frame)


def run_score(run_dir: str, *, min_examples: int | None = None, seed: int = 0, progress=None):
    """Score every coder of the run that has no scores yet (in parallel Ray tasks) and write latents.parquet."""
    import pandas as pd
    import ray

    fs, base = open_filesystem(run_dir)
    tasks = plan(run_dir)
    todo = [t for t in tasks if fs.get_file_info(f"{base}/{SCORES_DIR}/{t.coder_id}.parquet").type.name == "NotFound"]
    remote = ray.remote(num_cpus=1, max_retries=2)(score_task)
    pending = {remote.remote(t, run_dir, min_examples, seed): t for t in todo}
    done = len(tasks) - len(todo)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        task = pending.pop(ready[0])
        ray.get(ready[0])
        done += 1
        if progress is not None:
            progress(done, len(tasks), task.coder_id)
    frames = []
    for t in tasks:
        with fs.open_input_file(f"{base}/{SCORES_DIR}/{t.coder_id}.parquet") as f:
            frames.append(pd.read_parquet(f))
    latents = pd.concat(frames, ignore_index=True)
    write_parquet_atomic(run_dir, LATENTS_TABLE, latents)
    return latents


def summarize(latents):
    """Per coder: alive latents, coverage (eligible / alive), and the unweighted and frequency-weighted (by
    firing count) mean token AUROC over eligible latents, with the shuffled control's mean."""
    import pandas as pd

    rows = []
    for coder_id, g in latents.groupby("coder_id", sort=False):
        alive = g[g["firing_count"] > 0]
        scored = g[g["eligible"]]
        weights = scored["firing_count"]
        rows.append(
            {
                "coder_id": coder_id,
                "dictionary": g["dictionary"].iloc[0],
                "hookpoint": g["hookpoint"].iloc[0],
                "k": int(g["k"].iloc[0]),
                "latents": len(g),
                "alive": len(alive),
                "eligible": len(scored),
                "coverage": len(scored) / len(alive) if len(alive) else float("nan"),
                "token_auroc": scored["token_auroc"].mean(),
                "token_auroc_weighted": (scored["token_auroc"] * weights).sum() / weights.sum()
                if len(scored)
                else float("nan"),
                "shuffled_token_auroc": scored["shuffled_token_auroc"].mean(),
            }
        )
    return pd.DataFrame(rows)
