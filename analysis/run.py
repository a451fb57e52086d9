"""Reading a run folder's tables into pandas (pyarrow only: no Ray needed, any pyarrow filesystem URI works).

RUN/trials.parquet     one row per trial (`bae sweep`)
RUN/latents.parquet    one row per latent of every dictionary (`bae score`)
RUN/coders.parquet     one row per dictionary: density, fidelity, aggregated scores (`bae score`)
RUN/ablation.parquet   one row per (coder, bin) of the ablation by score (`bae score`)
RUN/density.parquet    log10 firing-rate histograms (`bae score`)
RUN/frontier.parquet   the reconstruction-interpretability frontier (`bae report`, or computed on load)
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pandas as pd

from analysis.frontier import frontier_table
from bae_core.cache import open_filesystem

FRONTIER_TABLE = "frontier.parquet"


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
    return RunTables(path=path, trials=trials, frontier=frontier, **tables)


def training_curves(trials: pd.DataFrame) -> pd.DataFrame:
    """Each trial's reports during training (one row per report: `trial_id`, `steps`, `fvu`, `dead_fraction`,
    `l0`, `split`), read from the result.json Tune keeps next to the trial's checkpoints. Trials whose folder is
    gone are left out."""
    rows = []
    for trial in trials.itertuples():
        checkpoint = getattr(trial, "checkpoint", None)
        if not isinstance(checkpoint, str) or not checkpoint:
            continue
        fs, base = open_filesystem(checkpoint.rsplit("/", 1)[0])
        path = f"{base}/result.json"
        if fs.get_file_info(path).type.name == "NotFound":
            continue
        with fs.open_input_stream(path) as f:
            lines = f.read().decode().splitlines()
        for line in lines:
            try:
                result = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            rows.append(
                {
                    "trial_id": trial.trial_id,
                    **{k: result.get(k) for k in ("steps", "fvu", "dead_fraction", "l0", "split")},
                }
            )
    return pd.DataFrame(rows, columns=["trial_id", "steps", "fvu", "dead_fraction", "l0", "split"])
