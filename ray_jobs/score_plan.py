"""What `bae score` does and with which settings: the dictionaries of a run (`plan`: its trained coders, the coders
`bae import` registered, the baselines and controls), the options that change their numbers (`ScoreOptions`), and
whether a per-coder file is up to date with them (`stale_reason`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from bae_core.data.cache import open_filesystem
from bae_core.data.paths import resolve
from ray_jobs.gpus import check_gpus_per_task
from ray_jobs.sweep_job import SPEC_COPY
from ray_jobs.trials import TRIALS_TABLE

LATENTS_TABLE = "latents.parquet"
CODERS_TABLE = "coders.parquet"
ABLATION_TABLE = "ablation.parquet"
DENSITY_TABLE = "density.parquet"
IMPORTED_TABLE = "imported.parquet"
"""Coders from elsewhere, registered by `bae import` (`ray_jobs.import_job`)."""
IMPORTED_DIR = "imported"
ORIGIN_RUN = "run"
"""`ScoreTask.origin` of what the run itself made: its trained coders, baselines and controls."""
IMPORTED_COLUMNS = ("fvu", "l0", "eval_tokens", "num_latents")
"""Columns of imported.parquet (measured at import, like a trial's) repeated in coders.parquet."""
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
    `bae_core.evaluation.interp.control_activations`)."""

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
    origin: str = ORIGIN_RUN
    """run, or for an imported coder its format and source (sparsify:/path, saelens:hub:owner/name, bae:/path)."""


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
    """A `bae_core.evaluation.judge.JudgeConfig` when `judge` is llm."""
    llm_latents: int = 50
    """Eligible latents per coder the LLM judge scores (drawn with `seed`)."""
    latents_per_task: int = 2048
    """A dictionary with more latents is scored lexically by several Ray tasks, each on a slice of its latents."""
    gpus_per_task: float = 0.0
    """GPUs of each fidelity-and-ablation task (`ray_jobs.gpus`); where it runs changes no setting below."""

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
        check_gpus_per_task(self.gpus_per_task)

    def lexical_settings(self) -> dict:
        """What a lexical score file's numbers depend on; a file made with other settings is recomputed."""
        from bae_core.evaluation.examples import SCORING_VERSION

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
            "llm_logprobs": getattr(self.llm, "logprobs", None),
            "llm_constrain_answers": getattr(self.llm, "constrain_answers", None),
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
        names = (
            "min_examples",
            "test_windows",
            "fidelity_tokens",
            "ablation_bins",
            "lm_batch_size",
            "lm_dtype",
            "gpus_per_task",
        )
        values = {k: spec[k] for k in names if spec.get(k) is not None}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def plan(run_dir: str) -> list[ScoreTask]:
    """The coders of a run's finished trials, then the imported coders (RUN/imported.parquet), then one neuron
    baseline per (cache, MLP hookpoint, k) of the trials, then the two reference dictionaries (positive and
    negative control) per (cache, hookpoint) of either."""
    from bae_core.evaluation.interp import CONTROLS

    fs, base = open_filesystem(run_dir)
    path = f"{base}/{TRIALS_TABLE}"
    if fs.get_file_info(path).type.name == "NotFound":
        raise ValueError(f"run {run_dir}: no {TRIALS_TABLE}; run `bae sweep` into this folder first")
    trials = read_table(run_dir, TRIALS_TABLE)
    finished = trials[trials["status"] == "finished"]
    if finished.empty:
        raise ValueError(f"run {run_dir}: {TRIALS_TABLE} has no finished trial to score")
    # Checkpoints, and a cache inside the run, are stored relative to the run folder (older runs: absolute).
    finished = finished.assign(
        checkpoint=[resolve(run_dir, c) for c in finished["checkpoint"]],
        cache=[resolve(run_dir, c) for c in finished["cache"]],
    )
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
    imported = imported_tasks(run_dir)
    tasks += imported
    baselines = sorted({(r.cache, r.hookpoint, int(r.k)) for r in finished.itertuples()})
    has_input = [(c, h, k) for c, h, k in baselines if h.endswith(".mlp")]
    tasks += [ScoreTask(f"neurons-{h}-k{k}", None, c, h, k, None) for c, h, k in has_input]
    hookpoints = sorted(
        {(r.cache, r.hookpoint) for r in finished.itertuples()} | {(t.cache, t.hookpoint) for t in imported}
    )
    tasks += [
        ScoreTask(f"{control.replace('_', '-')}-{h}", None, c, h, 1, None, control, "control")
        for c, h in hookpoints
        for control in CONTROLS
    ]
    return tasks


def imported_tasks(run_dir: str) -> list[ScoreTask]:
    """The coders `bae import` registered in RUN/imported.parquet (none when it has none)."""
    fs, base = open_filesystem(run_dir)
    if fs.get_file_info(f"{base}/{IMPORTED_TABLE}").type.name == "NotFound":
        return []
    table = read_table(run_dir, IMPORTED_TABLE)
    return [
        ScoreTask(
            r.coder_id,
            None,
            resolve(run_dir, r.cache),
            r.hookpoint,
            int(r.k),
            resolve(run_dir, r.checkpoint),
            r.activation,
            r.kind,
            int(r.num_latents),
            r.origin,
        )
        for r in table.itertuples()
    ]


def imported_label(task: ScoreTask) -> str:
    """The `dictionary` of an imported coder in latents.parquet and coders.parquet, e.g. 'topk sae (sparsify
    import)'; a trained coder's is its activation and kind alone."""
    return f"{task.activation} {task.kind} ({task.origin.split(':', 1)[0]} import)"


def with_imported_columns(run_dir: str, coders):
    """coders.parquet's rows of imported coders with what their import measured (`IMPORTED_COLUMNS`, a trial's
    held-out FVU and L0 for a trained coder)."""
    fs, base = open_filesystem(run_dir)
    if fs.get_file_info(f"{base}/{IMPORTED_TABLE}").type.name == "NotFound":
        return coders
    table = read_table(run_dir, IMPORTED_TABLE).set_index("coder_id")
    for column in IMPORTED_COLUMNS:
        values = coders["coder_id"].map(table[column])
        coders[column] = values if column not in coders else coders[column].where(values.isna(), values)
    return coders


# ---- per-coder files and their settings ---------------------------------------------------------------------


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
