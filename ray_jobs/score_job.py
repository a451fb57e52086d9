"""`bae score RUN`: fidelity, density and interpretability of every trained coder of a sweep, with Ray tasks.

    RUN/trials.parquet (finished trials: checkpoint, cache, hookpoint, k)
      -> per trained coder, and per (hookpoint, k) for the MLP-neuron baseline, a Ray task:
         lexical scores of every latent on the cache's held-out split      -> RUN/scores/<coder id>.parquet
      -> then, per trained coder, a Ray task on the language model:
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
reason for redoing a file is printed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np

from bae_core.cache import open_filesystem, write_bytes_atomic
from ray_jobs.sweep_job import SPEC_COPY, TRIALS_TABLE, write_parquet_atomic

LATENTS_TABLE = "latents.parquet"
CODERS_TABLE = "coders.parquet"
ABLATION_TABLE = "ablation.parquet"
DENSITY_TABLE = "density.parquet"
TRIAL_COLUMNS = ("fvu", "l0", "train_fvu", "eval_tokens", "num_latents", "expansion_factor", "seed", "steps", "model")
"""Columns of trials.parquet repeated in coders.parquet."""
SCORES_DIR = "scores"
EVALUATION_DIR = "evaluation"
LLM_DIR = "llm"
JUDGES = ("lexical", "llm")


@dataclass(frozen=True)
class ScoreTask:
    """One dictionary to score: a trained coder (`checkpoint`), or (`checkpoint` None) the neuron baseline
    (`activation` mlp_neurons) or a reference dictionary (`activation` token_control or random_control,
    `bae_core.interp.control_activations`)."""

    coder_id: str
    trial_id: str | None
    cache: str
    hookpoint: str
    k: int
    checkpoint: str | None
    activation: str = "mlp_neurons"
    kind: str = "baseline"
    num_latents: int | None = None
    """Dictionary size, when known before loading it (trained coders); larger ones are scored in chunks."""


@dataclass(frozen=True)
class ScoreOptions:
    """How `bae score` scores a run; `from_run` takes the defaults from the sweep spec's `scoring` section."""

    min_examples: int | None = None
    test_windows: int = 50
    seed: int = 0
    fidelity_tokens: int = 16384
    ablation_bins: int = 5
    lm_batch_size: int = 8
    lm_dtype: str = "float32"
    """The language model's precision for fidelity and ablation."""
    judge: str = "lexical"
    llm: object | None = field(default=None, repr=False)
    """A `bae_core.judge.JudgeConfig` when `judge` is llm."""
    llm_latents: int = 50
    """Eligible latents per coder the LLM judge scores (drawn with `seed`)."""
    latents_per_task: int = 2048
    """A dictionary with more latents is scored lexically by several Ray tasks, each on a slice of its latents."""

    def __post_init__(self):
        if self.judge not in JUDGES:
            raise ValueError(f"judge: choose one of {', '.join(JUDGES)}, got {self.judge!r}")
        if self.judge == "llm" and self.llm is None:
            raise ValueError("judge: llm needs a judge configuration (base URL and model)")
        for name in ("test_windows", "fidelity_tokens", "lm_batch_size", "llm_latents", "latents_per_task"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.ablation_bins < 0:
            raise ValueError(f"ablation_bins: must be >= 0 (0 skips the ablation), got {self.ablation_bins}")
        if self.lm_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"lm_dtype: choose float32, bfloat16 or float16, got {self.lm_dtype!r}")
        if self.min_examples is not None and self.min_examples < 1:
            raise ValueError(f"min_examples: must be >= 1, got {self.min_examples}")

    def lexical_settings(self) -> dict:
        """What a lexical score file's numbers depend on; a file made with other settings is recomputed."""
        from bae_core.examples import SCORING_VERSION

        return {
            "scoring_version": SCORING_VERSION,
            "min_examples": self.min_examples,
            "test_windows": self.test_windows,
            "seed": self.seed,
        }

    def evaluation_settings(self) -> dict:
        """What an evaluation file (fidelity and the ablation by score) depends on, the lexical scores included."""
        return {
            **self.lexical_settings(),
            "fidelity_tokens": self.fidelity_tokens,
            "ablation_bins": self.ablation_bins,
            "lm_dtype": self.lm_dtype,
        }

    def llm_settings(self) -> dict:
        """What the LLM judge's file depends on: the examples, the judge's model and server, the sample size."""
        return {
            **self.lexical_settings(),
            "llm_model": getattr(self.llm, "model", None),
            "llm_base_url": getattr(self.llm, "base_url", None),
            "llm_latents": self.llm_latents,
        }

    @classmethod
    def from_run(cls, run_dir: str, **overrides) -> ScoreOptions:
        """The run's `scoring` settings (from RUN/spec.json), with `overrides` that are not None on top."""
        fs, base = open_filesystem(run_dir)
        spec = {}
        path = f"{base}/{SPEC_COPY}"
        if fs.get_file_info(path).type.name != "NotFound":
            with fs.open_input_stream(path) as f:
                spec = json.loads(f.read().decode()).get("scoring") or {}
        names = ("min_examples", "test_windows", "fidelity_tokens", "ablation_bins", "lm_batch_size", "lm_dtype")
        values = {k: spec[k] for k in names if spec.get(k) is not None}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def plan(run_dir: str) -> list[ScoreTask]:
    """The coders of a run's finished trials, then one neuron baseline per (cache, MLP hookpoint, k), then the
    two reference dictionaries (positive and negative control) per (cache, hookpoint)."""
    from bae_core.interp import CONTROLS

    fs, base = open_filesystem(run_dir)
    path = f"{base}/{TRIALS_TABLE}"
    if fs.get_file_info(path).type.name == "NotFound":
        raise ValueError(f"run {run_dir}: no {TRIALS_TABLE}; run `bae sweep` into this folder first")
    trials = read_table(run_dir, TRIALS_TABLE)
    finished = trials[trials["status"] == "finished"]
    if finished.empty:
        raise ValueError(f"run {run_dir}: {TRIALS_TABLE} has no finished trial to score")
    tasks = [
        ScoreTask(
            f"trial-{r.trial_id}",
            r.trial_id,
            r.cache,
            r.hookpoint,
            int(r.k),
            r.checkpoint,
            r.activation,
            r.kind,
            int(r.num_latents),
        )
        for r in finished.itertuples()
    ]
    baselines = sorted({(r.cache, r.hookpoint, int(r.k)) for r in finished.itertuples()})
    has_input = [(c, h, k) for c, h, k in baselines if h.endswith(".mlp")]
    tasks += [ScoreTask(f"neurons-{h}-k{k}", None, c, h, k, None) for c, h, k in has_input]
    hookpoints = sorted({(r.cache, r.hookpoint) for r in finished.itertuples()})
    tasks += [
        ScoreTask(f"{control.replace('_', '-')}-{h}", None, c, h, 1, None, control, "control")
        for c, h in hookpoints
        for control in CONTROLS
    ]
    return tasks


# ---- the tasks ------------------------------------------------------------------------------------------------


def _load_model(cache: str, dtype: str = "float32"):
    import torch

    from bae_core.cache import open_cache
    from bae_core.lm import EMBEDDED_MODEL, load_model

    manifest = open_cache(cache)
    revision = None if manifest.model == EMBEDDED_MODEL else manifest.revision
    return load_model(manifest.model, revision=revision, dtype=getattr(torch, dtype))


def lexical_task(task: ScoreTask, run_dir: str, options: ScoreOptions, start: int = 0, stop: int | None = None) -> str:
    """Score the latents start..stop (all when `stop` is None) of one dictionary and write their rows to
    RUN/scores/<coder id>.parquet, or for a slice to RUN/scores/<coder id>/part-<start>.parquet; returns the path."""
    import pandas as pd

    from bae_core.coder import SparseCoder
    from bae_core.interp import ExampleOptions, coder_latent_scores, control_scores, neuron_baseline_scores

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
        coder = SparseCoder.load(task.checkpoint)
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
    from bae_core.cache import open_cache
    from bae_core.interp import split_tokens

    manifest = open_cache(cache)
    ids, _ = split_tokens(cache, hookpoint, split, manifest)
    n = min(len(ids), max(1, math.ceil(tokens / ids.shape[1])))
    return ids[np.unique(np.linspace(0, len(ids) - 1, n).round().astype(int))]


def evaluation_task(task: ScoreTask, run_dir: str, options: ScoreOptions) -> dict:
    """Spliced fidelity of a trained coder and its ablation by lexical score; writes
    RUN/evaluation/<coder id>.json and returns its content."""
    import torch

    from bae_core.coder import SparseCoder
    from bae_core.fidelity import fidelity_and_ablation
    from bae_core.lm import resolve_hookpoints

    loaded = _load_model(task.cache, options.lm_dtype)
    (hook,) = resolve_hookpoints(loaded, [task.hookpoint])
    coder = SparseCoder.load(task.checkpoint)
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
    }
    fs, base = open_filesystem(run_dir)
    write_bytes_atomic(fs, f"{base}/{EVALUATION_DIR}/{task.coder_id}.json", json.dumps(result, indent=2).encode())
    return result


def llm_task(task: ScoreTask, run_dir: str, options: ScoreOptions) -> int:
    """The LLM judge on up to `options.llm_latents` eligible latents of one dictionary; writes
    RUN/llm/<coder id>.parquet (one row per judged latent) and returns its row count."""
    import pandas as pd

    from bae_core.coder import SparseCoder
    from bae_core.interp import ExampleOptions, llm_examples
    from bae_core.judge import judge_latents

    lexical = read_table(run_dir, f"{SCORES_DIR}/{task.coder_id}.parquet", ["latent", "eligible"])
    eligible = lexical.loc[lexical["eligible"], "latent"].to_numpy()
    rng = np.random.default_rng(options.seed)
    chosen = np.sort(rng.choice(eligible, min(options.llm_latents, len(eligible)), replace=False))
    loaded = _load_model(task.cache)
    examples_options = ExampleOptions(
        min_examples=options.min_examples, test_windows=options.test_windows, seed=options.seed
    )
    coder = None if task.checkpoint is None else SparseCoder.load(task.checkpoint)
    control = task.activation if task.kind == "control" else None
    examples = llm_examples(loaded, coder, task.cache, task.hookpoint, task.k, examples_options, chosen, control)
    results = judge_latents(options.llm, examples, seed=options.seed)
    frame = pd.DataFrame([{"latent": int(latent), **results[int(latent)]} for latent in chosen])
    frame.insert(0, "coder_id", task.coder_id)
    frame["llm_settings"] = _settings_text(options.llm_settings())
    write_parquet_atomic(run_dir, f"{LLM_DIR}/{task.coder_id}.parquet", frame)
    return len(frame)


# ---- the driver ------------------------------------------------------------------------------------------------


def read_table(run_dir: str, name: str, columns: list[str] | None = None):
    """RUN/name (a parquet file, local or any pyarrow URI) as a DataFrame."""
    import pandas as pd

    fs, base = open_filesystem(run_dir)
    with fs.open_input_file(f"{base}/{name}") as f:
        return pd.read_parquet(f, columns=columns)


def _missing(fs, base: str, folder: str, coder_id: str, suffix: str) -> bool:
    return fs.get_file_info(f"{base}/{folder}/{coder_id}.{suffix}").type.name == "NotFound"


def _settings_text(settings: dict) -> str:
    return json.dumps(settings, sort_keys=True)


def _recorded_settings(fs, base: str, name: str) -> dict | None:
    """The settings a per-coder file was made with (None for a file written before they were recorded)."""
    import pyarrow.parquet as pq

    path = f"{base}/{name}"
    if name.endswith(".json"):
        with fs.open_input_stream(path) as f:
            return json.loads(f.read().decode()).get("settings")
    with fs.open_input_file(path) as f:
        parquet = pq.ParquetFile(f)
        column = next((c for c in ("scoring_settings", "llm_settings") if c in parquet.schema_arrow.names), None)
        if column is None or parquet.metadata.num_rows == 0:
            return None
        return json.loads(parquet.read_row_group(0, columns=[column]).column(0)[0].as_py())


def stale_reason(fs, base: str, name: str, settings: dict) -> str | None:
    """Why RUN/name must be (re)made with `settings`: "missing", or the settings that differ; None when it is
    up to date."""
    if fs.get_file_info(f"{base}/{name}").type.name == "NotFound":
        return "missing"
    recorded = _recorded_settings(fs, base, name)
    if recorded is None:
        return "written before scoring settings were recorded (scoring version 1)"
    changed = [k for k in sorted({*settings, *recorded}) if recorded.get(k) != settings.get(k)]
    if not changed:
        return None
    return "made with " + ", ".join(f"{k}={recorded.get(k)!r} (now {settings.get(k)!r})" for k in changed)


def run_score(run_dir: str, options: ScoreOptions | None = None, *, progress=None, notice=None, **overrides):
    """Score every dictionary of the run whose files are missing or were made with other settings (Ray tasks)
    and rewrite the tables; returns the latents table. `overrides` (e.g. min_examples=5) replace the run's own
    scoring settings. `notice(text)` is told why an existing file is redone."""
    import ray

    options = options or ScoreOptions.from_run(run_dir, **overrides)
    fs, base = open_filesystem(run_dir)
    tasks = plan(run_dir)
    by_id = {t.coder_id: t for t in tasks}
    lexical = ray.remote(num_cpus=1, max_retries=2)(lexical_task)
    evaluation = ray.remote(num_cpus=1, max_retries=2)(evaluation_task)

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
    judge = [
        t for t in tasks if options.judge == "llm" and redo(f"{LLM_DIR}/{t.coder_id}.parquet", options.llm_settings())
    ]
    total = sum(len(s) for s in stages.values()) + len(judge)
    done = 0
    pending: dict = {}
    outstanding: dict[str, int] = {}

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
        ray.get(ready[0])
        outstanding[coder_id] -= 1
        if outstanding[coder_id] == 0:
            finish(coder_id)
    for t in judge:
        llm_task(t, run_dir, options)
        done += 1
        if progress is not None:
            progress(done, total, f"llm judge {t.coder_id}")
    return write_tables(run_dir, tasks)


def write_tables(run_dir: str, tasks: list[ScoreTask] | None = None):
    """latents.parquet, coders.parquet, ablation.parquet and density.parquet from the per-coder files."""
    import pandas as pd

    from bae_core.aggregate import log_rate_histogram

    tasks = tasks if tasks is not None else plan(run_dir)
    fs, base = open_filesystem(run_dir)
    frames, evaluations = [], {}
    for t in tasks:
        frame = read_table(run_dir, f"{SCORES_DIR}/{t.coder_id}.parquet")
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
    write_parquet_atomic(run_dir, CODERS_TABLE, coders)
    ablation = pd.DataFrame([{"coder_id": k, **row} for k, v in evaluations.items() for row in v["ablation"]])
    write_parquet_atomic(run_dir, ABLATION_TABLE, ablation)
    write_parquet_atomic(run_dir, DENSITY_TABLE, log_rate_histogram(latents, by=["coder_id"]))
    return latents


def summarize(latents, tasks: list[ScoreTask] | None = None):
    """One row per dictionary: what it is, its density on the held-out split (latents, alive, dead, > 1%, > 10%),
    coverage, and the unweighted and frequency-weighted mean token AUROC over eligible latents with the shuffled
    control (and the LLM judge's means when it ran), each mean with what it rests on: eligible latents, median
    test windows per latent, 95% bootstrap intervals and the underpowered mark (`bae_core.aggregate.score_basis`)."""
    import pandas as pd

    from bae_core.aggregate import density, score_basis, score_summary, weighted_mean
    from bae_core.lexical import LABEL

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
            "hookpoint": g["hookpoint"].iloc[0],
            "k": int(g["k"].iloc[0]),
            "l0_heldout": _l0(g),
            **density(g["firing_rate"].to_numpy()),
            "alive": int((g["firing_count"] > 0).sum()),
            **score_basis(g),
        }
        scored = g[g["eligible"]]
        for column in ("detection_balanced_accuracy", "fuzzing_balanced_accuracy"):
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
