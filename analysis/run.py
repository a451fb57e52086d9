"""Reading a run folder's tables into pandas (pyarrow only: no Ray needed, any pyarrow filesystem URI works).

RUN/trials.parquet     one row per trial (`bae sweep`)
RUN/latents.parquet    one row per latent of every dictionary (`bae score`)
RUN/coders.parquet     one row per dictionary: density, fidelity, aggregated scores (`bae score`)
RUN/ablation.parquet   one row per (coder, bin) of the ablation by score (`bae score`)
RUN/density.parquet    log10 firing-rate histograms (`bae score`)
RUN/probing.parquet    one row per (dictionary, task, k) of sparse probing (`bae probe`; empty until it has run)
RUN/frontier.parquet   the reconstruction-interpretability frontier (`bae report`, or computed on load)
CHECKPOINT/training_log.parquet   a trial's training metrics every `training.log_every` steps (`training_curves`)

trials.parquet stores checkpoints, and a cache inside the run, relative to the run folder (older runs: absolute);
`load_run` gives them resolved against the folder it read, wherever it has been moved or copied.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pandas as pd

from analysis.frontier import frontier_table
from bae_core.data.cache import open_filesystem
from bae_core.data.paths import resolve

FRONTIER_TABLE = "frontier.parquet"
TRAINING_LOG = "training_log.parquet"
"""In each checkpoint folder: the trial's training log up to that checkpoint (ray_jobs.train_job.TrainingLog)."""
CURVE_COLUMNS = ["trial_id", "step", "tokens", "fvu", "l0", "dead_fraction", "lr", "seconds", "interval_steps"]


@dataclass
class RunTables:
    """A run's tables; the ones `bae score` writes are empty DataFrames until it has run."""

    path: str
    trials: pd.DataFrame
    latents: pd.DataFrame
    frontier: pd.DataFrame
    coders: pd.DataFrame
    ablation: pd.DataFrame
    density: pd.DataFrame
    probing: pd.DataFrame = field(default_factory=pd.DataFrame)
    """Sparse probing (`bae probe`), one row per (dictionary, task, probe size)."""

    @property
    def scored(self) -> bool:
        return not self.coders.empty


def _read(fs, base: str, name: str) -> pd.DataFrame | None:
    path = f"{base}/{name}"
    if fs.get_file_info(path).type.name == "NotFound":
        return None
    with fs.open_input_file(path) as f:
        return pd.read_parquet(f)


def load_run(path: str) -> RunTables:
    """The tables of a run folder (local path or pyarrow URI). `trials.parquet` must exist; the frontier is read
    from frontier.parquet when present, else computed from coders.parquet."""
    fs, base = open_filesystem(path)
    trials = _read(fs, base, "trials.parquet")
    if trials is None:
        raise ValueError(f"run {path}: no trials.parquet; run `bae sweep` into this folder first")
    trials = resolve_paths(trials, path)
    tables = {name: _read(fs, base, f"{name}.parquet") for name in ("latents", "coders", "ablation", "density")}
    tables = {k: pd.DataFrame() if v is None else v for k, v in tables.items()}
    coders = tables["coders"]
    if not coders.empty and "trial_id" in coders:
        # coders.parquet repeats the trials' own numbers; older ones lack some, which trials.parquet has.
        missing = [c for c in ("fvu", "num_latents", "seed", "expansion_factor") if c not in coders and c in trials]
        if missing:
            tables["coders"] = coders.merge(trials[["trial_id", *missing]], on="trial_id", how="left")
    frontier = _read(fs, base, FRONTIER_TABLE)
    if frontier is None:
        frontier = frontier_table(tables["coders"]) if not tables["coders"].empty else pd.DataFrame()
    probing = _read(fs, base, "probing.parquet")
    probing = pd.DataFrame() if probing is None else probing
    return RunTables(path=path, trials=trials, frontier=frontier, probing=probing, **tables)


def resolve_paths(trials: pd.DataFrame, run: str) -> pd.DataFrame:
    """trials.parquet's `checkpoint` and `cache` resolved against the run folder `run` (relative ones are under it;
    URIs and the absolute paths of older runs stay as they are)."""
    paths = {c: [resolve(run, p) for p in trials[c]] for c in ("checkpoint", "cache") if c in trials}
    return trials.assign(**paths) if paths else trials


def training_curves(trials: pd.DataFrame, run: str | None = None) -> pd.DataFrame:
    """Each trial's training log: one row per logged step (every `training.log_every` steps, and the last) with
    `trial_id`, `step`, `tokens`, `fvu` and `l0` (train batches, averaged over the `interval_steps` steps since
    the row before), `dead_fraction` (latents that never fired in training so far), `lr` and `seconds` (wall-clock
    seconds of training so far), sorted by trial and step.

    Read from training_log.parquet in the trial's final checkpoint. For a run made before trials kept that log,
    the reports Tune stored at each checkpoint (the trial folder's result.json) stand in: a few rows per trial,
    with `interval_steps` missing. Trials without a checkpoint (failed ones) or whose folder is gone are left
    out. `trials` comes from `load_run`, or, read from trials.parquet directly, with the run folder as `run`."""
    if run is not None:
        trials = resolve_paths(trials, run)
    frames = []
    for trial in trials.itertuples():
        checkpoint = getattr(trial, "checkpoint", None)
        if not isinstance(checkpoint, str) or not checkpoint:
            continue
        fs, base = open_filesystem(checkpoint)
        frame = _read(fs, base, TRAINING_LOG)
        if frame is None:
            frame = _checkpoint_reports(fs, base.rsplit("/", 1)[0])
        if len(frame):
            frames.append(frame.assign(trial_id=trial.trial_id))
    if not frames:
        return pd.DataFrame(columns=CURVE_COLUMNS)
    curves = pd.concat(frames, ignore_index=True).reindex(columns=CURVE_COLUMNS)
    return curves.sort_values(["trial_id", "step"], kind="stable").reset_index(drop=True)


def _checkpoint_reports(fs, trial_dir: str) -> pd.DataFrame:
    """The training reports Tune kept in a trial folder's result.json (one per checkpoint) as curve rows."""
    path = f"{trial_dir}/result.json"
    if fs.get_file_info(path).type.name == "NotFound":
        return pd.DataFrame()
    with fs.open_input_stream(path) as f:
        lines = f.read().decode().splitlines()
    rows = []
    for line in lines:
        try:
            result = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        if result.get("split") == "train":
            rows.append(
                {
                    "step": result.get("steps"),
                    "seconds": result.get("time_total_s"),
                    **{k: result.get(k) for k in ("tokens", "fvu", "l0", "dead_fraction", "lr")},
                }
            )
    # A trial retried from a checkpoint reported the steps after it again: its latest attempt's report counts.
    return pd.DataFrame(rows).drop_duplicates("step", keep="last") if rows else pd.DataFrame()
