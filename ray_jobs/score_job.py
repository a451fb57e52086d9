"""`bae score RUN`: fidelity, density and interpretability of every trained coder of a sweep, with Ray tasks.

    RUN/trials.parquet (finished trials: checkpoint, cache, hookpoint, k)
      -> per trained coder, and per (hookpoint, k) for the MLP-neuron baseline, a Ray task:
         lexical scores of every latent on the cache's held-out split      -> RUN/scores/<coder id>.parquet
      -> then, per trained coder, a Ray task on the language model (on a GPU with `scoring.gpus_per_task`,
         `ray_jobs.gpus`):
         spliced fidelity (CE increase, KL, top-1 drop, loss recovered)
         and the ablation of equal-firing-mass bins of latents by score    -> RUN/evaluation/<coder id>.json
      -> with `--judge llm`, per dictionary, in the driver (it waits on the network, and the API key stays in
         the driver's environment): the LLM judge's explanations, detection and fuzzing scores on a sample of
         its eligible latents                                               -> RUN/llm/<coder id>.parquet
      -> the tables, rewritten atomically from those files:
         RUN/latents.parquet   one row per latent (coder id, trial, hookpoint, latent index, firing count and
                               rate, eligibility, explanation, every score and control)
         RUN/coders.parquet    one row per dictionary: density, fidelity and aggregated scores
         RUN/ablation.parquet  one row per (coder, bin) of the ablation by score
         RUN/density.parquet   the log10 firing-rate histogram of every dictionary

Every per-coder file is written atomically when its task ends, with the settings that produced it (the scoring
version and the options that change its numbers), so running `bae score` again (after a crash, a killed worker,
or with more trials finished) does only the work whose file is missing or was made with other settings; the
reason for redoing a file is printed. An LLM judge file whose rows count failed prompts is incomplete and is
redone too (the judge's response cache answers the prompts that succeeded); a judge that answered nothing
fails the command (`JudgeUnreachable`) and is stored nowhere.

`bae score` holds the run folder's lock (`ray_jobs.lock`) while it writes, and checks every cache it reads
first (`open_cache`: a missing or truncated shard is named with its repair before any task starts).
"""

from __future__ import annotations

import json
import logging
import math

from bae_core.data.cache import open_cache, open_filesystem
from ray_jobs.gpus import fallback_notice, require_gpus
from ray_jobs.lock import folder_lock
from ray_jobs.score_plan import (
    ABLATION_TABLE,
    CODERS_TABLE,
    DENSITY_TABLE,
    EVALUATION_DIR,
    LATENTS_TABLE,
    LLM_DIR,
    ORIGIN_RUN,
    SCORES_DIR,
    TRIAL_COLUMNS,
    ScoreOptions,
    ScoreTask,
    _missing,
    imported_label,
    plan,
    read_table,
    stale_reason,
    with_imported_columns,
)
from ray_jobs.score_tasks import (
    _merge_parts,
    _part,
    _slices,
    evaluation_task,
    lexical_task,
    llm_task,
)
from ray_jobs.trials import TRIALS_TABLE, write_parquet_atomic

log = logging.getLogger(__name__)


def run_score(run_dir: str, options: ScoreOptions | None = None, *, progress=None, notice=None, **overrides):
    """Score every dictionary of the run whose files are missing or were made with other settings (Ray tasks)
    and rewrite the tables, holding the run folder's lock; returns the latents table. `overrides` (e.g.
    min_examples=5) replace the run's own scoring settings. `notice(text)` is told why an existing file is
    redone."""
    with folder_lock(run_dir, "bae score"):
        return _run_score(run_dir, options, progress=progress, notice=notice, **overrides)


def _run_score(run_dir: str, options: ScoreOptions | None = None, *, progress=None, notice=None, **overrides):
    import ray

    options = options or ScoreOptions.from_run(run_dir, **overrides)
    fs, base = open_filesystem(run_dir)
    tasks = plan(run_dir)
    for cache in sorted({t.cache for t in tasks}):
        open_cache(cache)  # a damaged cache is named here, in one line, rather than inside a task
    by_id = {t.coder_id: t for t in tasks}
    lexical = ray.remote(num_cpus=1, max_retries=2)(lexical_task)
    # Only the language model's forwards ask for GPUs (`ray_jobs.gpus`); the lexical scores run on CPUs.
    evaluation = ray.remote(num_cpus=1, num_gpus=options.gpus_per_task, max_retries=2)(evaluation_task)

    # Each dictionary's stages run in order (fidelity reads the lexical scores); dictionaries, and the latent
    # slices of a large one, in parallel.
    def redo(name: str, settings: dict) -> bool:
        reason = stale_reason(fs, base, name, settings)
        if reason not in (None, "missing") and notice is not None:
            notice(f"redoing {name}: {reason}")
        return reason is not None

    stages = {}
    for t in tasks:
        stages[t.coder_id] = []
        if redo(f"{SCORES_DIR}/{t.coder_id}.parquet", options.lexical_settings()):
            stages[t.coder_id].append("lexical")
        if t.checkpoint is not None and redo(f"{EVALUATION_DIR}/{t.coder_id}.json", options.evaluation_settings()):
            stages[t.coder_id].append("fidelity")

    def redo_judge(name: str) -> bool:
        if redo(name, options.llm_settings()):
            return True
        failed, asked = _failed_prompts(fs, base, name)
        if failed and notice is not None:
            notice(f"redoing {name}: {failed} of {asked} judge prompts failed last time")
        return failed > 0

    judge = [t for t in tasks if options.judge == "llm" and redo_judge(f"{LLM_DIR}/{t.coder_id}.parquet")]
    if any("fidelity" in s for s in stages.values()):  # a cluster that can never give the GPUs fails before any work
        waits = require_gpus(options.gpus_per_task, "the spliced fidelity and ablation")
        if waits is not None:
            (notice or log.warning)(waits)
    total = sum(len(s) for s in stages.values()) + len(judge)
    done = 0
    pending: dict = {}
    outstanding: dict[str, int] = {}
    notes: set[str] = set()

    def submit(coder_id: str) -> None:
        if not stages[coder_id]:
            return
        task, stage = by_id[coder_id], stages[coder_id][0]
        if stage == "lexical":
            refs = [
                lexical.remote(task, run_dir, options, start, stop)
                for start, stop in _slices(task, options)
                # A slice scored before an interruption, with the same settings, is kept.
                if stop is None or stale_reason(fs, base, _part(coder_id, start), options.lexical_settings())
            ]
        else:
            refs = [evaluation.remote(task, run_dir, options)]
        outstanding[coder_id] = len(refs)
        pending.update({ref: coder_id for ref in refs})
        if not refs:
            finish(coder_id)

    def finish(coder_id: str) -> None:
        nonlocal done
        task, stage = by_id[coder_id], stages[coder_id].pop(0)
        slices = _slices(task, options)
        if stage == "lexical" and slices != [(0, None)]:
            _merge_parts(run_dir, task, slices)
        done += 1
        if progress is not None:
            progress(done, total, f"{stage} {coder_id}")
        submit(coder_id)

    for coder_id in stages:
        submit(coder_id)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        coder_id = pending.pop(ready[0])
        result = ray.get(ready[0])
        if isinstance(result, dict) and result.get("device_note") not in (None, *notes):
            notes.add(result["device_note"])  # a task that asked for a GPU ran on the CPU: said once per reason
            if notice is not None:
                notice(fallback_notice(options.gpus_per_task, result["device_note"]))
        outstanding[coder_id] -= 1
        if outstanding[coder_id] == 0:
            finish(coder_id)
    for t in judge:
        llm_task(t, run_dir, options)
        done += 1
        if progress is not None:
            progress(done, total, f"llm judge {t.coder_id}")
    return write_tables(run_dir, tasks)


def _failed_prompts(fs, base: str, name: str) -> tuple[int, int]:
    """Failed and asked prompts of an LLM judge file."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    with fs.open_input_file(f"{base}/{name}") as f:
        table = pq.read_table(f, columns=["llm_failed_prompts", "llm_prompts"])
    return tuple(int(pc.sum(table[column]).as_py() or 0) for column in ("llm_failed_prompts", "llm_prompts"))


def write_tables(run_dir: str, tasks: list[ScoreTask] | None = None):
    """latents.parquet, coders.parquet, ablation.parquet and density.parquet from the per-coder files."""
    import pandas as pd

    from bae_core.evaluation.aggregate import log_rate_histogram

    tasks = tasks if tasks is not None else plan(run_dir)
    fs, base = open_filesystem(run_dir)
    frames, evaluations = [], {}
    for t in tasks:
        frame = read_table(run_dir, f"{SCORES_DIR}/{t.coder_id}.parquet")
        frame["origin"] = t.origin
        if t.origin != ORIGIN_RUN:
            frame["dictionary"] = imported_label(t)
        if not _missing(fs, base, LLM_DIR, t.coder_id, "parquet"):
            frame = frame.merge(
                read_table(run_dir, f"{LLM_DIR}/{t.coder_id}.parquet"), on=["coder_id", "latent"], how="left"
            )
        frames.append(frame)
        if not _missing(fs, base, EVALUATION_DIR, t.coder_id, "json"):
            with fs.open_input_stream(f"{base}/{EVALUATION_DIR}/{t.coder_id}.json") as f:
                evaluations[t.coder_id] = json.loads(f.read().decode())
    latents = pd.concat(frames, ignore_index=True)
    write_parquet_atomic(run_dir, LATENTS_TABLE, latents)

    coders = summarize(latents, tasks)
    fidelity = pd.DataFrame([{"coder_id": k, **v["fidelity"]} for k, v in evaluations.items()])
    if not fidelity.empty:
        coders = coders.merge(fidelity, on="coder_id", how="left")
    # The trial's own held-out reconstruction and settings, so that the table stands alone.
    trials = read_table(run_dir, TRIALS_TABLE)
    kept = [c for c in TRIAL_COLUMNS if c in trials.columns and c not in coders.columns]
    coders = coders.merge(trials[["trial_id", *kept]], on="trial_id", how="left")
    coders = with_imported_columns(run_dir, coders)
    from ray_jobs.probe_job import with_probing  # the sparse-probing means, when `bae probe` has run

    coders = with_probing(run_dir, coders)
    write_parquet_atomic(run_dir, CODERS_TABLE, coders)
    ablation = pd.DataFrame([{"coder_id": k, **row} for k, v in evaluations.items() for row in v["ablation"]])
    write_parquet_atomic(run_dir, ABLATION_TABLE, ablation)
    write_parquet_atomic(run_dir, DENSITY_TABLE, log_rate_histogram(latents, by=["coder_id"]))
    return latents


def summarize(latents, tasks: list[ScoreTask] | None = None):
    """One row per dictionary: what it is, its density on the held-out split (latents, alive, dead, > 1%, > 10%),
    coverage, and the unweighted and frequency-weighted mean token AUROC over eligible latents with the shuffled
    control (and the LLM judge's means when it ran), each mean with what it rests on: eligible latents, median
    test windows per latent, 95% bootstrap intervals and the underpowered mark
    (`bae_core.evaluation.aggregate.score_basis`)."""
    import pandas as pd

    from bae_core.evaluation.aggregate import density, score_basis, score_summary, weighted_mean
    from bae_core.evaluation.lexical import LABEL

    _, overall = score_summary(latents, "token_auroc", by=["coder_id"])
    overall = overall.drop(columns=["hookpoints", "latents", "alive", "eligible"])
    rows = []
    info = {t.coder_id: t for t in tasks or []}
    for coder_id, g in latents.groupby("coder_id", sort=False):
        t = info.get(coder_id)
        row = {
            "coder_id": coder_id,
            "trial_id": g["trial_id"].iloc[0],
            "dictionary": g["dictionary"].iloc[0],
            "activation": t.activation if t else None,
            "kind": t.kind if t else None,
            "origin": t.origin if t else None,
            "hookpoint": g["hookpoint"].iloc[0],
            "k": int(g["k"].iloc[0]),
            "l0_heldout": _l0(g),
            **density(g["firing_rate"].to_numpy()),
            "alive": int((g["firing_count"] > 0).sum()),
            **score_basis(g),
        }
        scored = g[g["eligible"]]
        for column in ("detection_balanced_accuracy", "fuzzing_balanced_accuracy", "detection_auroc", "fuzzing_auroc"):
            if column in g.columns:
                judged = g[g[column].notna()]
                row[column] = float(judged[column].mean()) if len(judged) else math.nan
                row[f"{column}_weighted"] = weighted_mean(judged[column], judged["firing_count"])
        if "llm_failed_prompts" in g.columns:
            row["llm_latents"] = int(g["llm_prompts"].notna().sum())
            row["llm_failed_fraction"] = float(g["llm_failed_prompts"].sum() / max(g["llm_prompts"].sum(), 1))
        row["window_f1"] = float(scored["window_f1"].mean()) if len(scored) else math.nan
        row["score_label"] = LABEL
        rows.append(row)
    return pd.DataFrame(rows).merge(overall, on="coder_id", how="left")


def _l0(g) -> float:
    """Mean firing latents per held-out token: total firings over the tokens (firing count / rate of any latent
    that fires)."""
    alive = g[g["firing_rate"] > 0]
    if alive.empty:
        return 0.0
    tokens = alive["firing_count"].iloc[0] / alive["firing_rate"].iloc[0]
    return float(g["firing_count"].sum() / tokens)
