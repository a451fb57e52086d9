"""The sweep's table of trials, trials.parquet: one row per finished or failed trial (its settings, held-out
metrics, checkpoint and provenance), rewritten atomically by a driver-side Tune callback as trials end.

Paths in it are relative to the run folder where they lie inside it (`checkpoint`, and `cache` when the cache is
RUN/cache), so the folder can be moved or copied; `bae_core.data.paths.resolve` reads them back."""

from __future__ import annotations

import dataclasses
import io
import sys
from pathlib import Path
from typing import Any

from ray.tune import Callback

from bae_core.coders.config import CoderConfig
from bae_core.data.cache import open_filesystem, write_bytes_atomic
from bae_core.data.paths import relative_to
from bae_core.training import TrainConfig
from ray_jobs.spec import CODER_FIELDS, METRICS, TRAIN_FIELDS, SweepSpec

TRIALS_TABLE = "trials.parquet"


class TrialsTable(Callback):
    """Driver-side Tune callback: prints a line per finished trial and rewrites trials.parquet."""

    def __init__(self, run_dir: str, total: int, provenance: dict[str, Any], quiet: bool = False):
        self.run_dir = run_dir
        self.total = total
        self.provenance = provenance
        self.quiet = quiet

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._announce(trial, trials, "done")
        self._write(trials)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._announce(trial, trials, "FAILED")
        self._write(trials)

    def on_experiment_end(self, trials, **info):
        self._write(trials)

    def _announce(self, trial, trials, what: str) -> None:
        if self.quiet:
            return
        finished = 1 + sum(t.status in ("TERMINATED", "ERROR") for t in trials if t is not trial)
        r = trial.last_result or {}
        settings = " ".join(f"{k}={v}" for k, v in trial.config.items())
        figures = (
            f"fvu={r['fvu']:.4f} l0={r['l0']:.1f} dead={r['dead_fraction']:.3f} dense={r['dense_fraction']:.3f}"
            if r.get("split") == "heldout"
            else ""
        )
        print(f"  [{finished}/{self.total}] {what} {settings} {figures}".rstrip(), file=sys.stderr, flush=True)

    def _write(self, trials) -> None:
        rows = [trial_row(t, self.provenance, self.run_dir) for t in trials if t.status in ("TERMINATED", "ERROR")]
        if rows:
            write_trials_table(self.run_dir, rows)


def trial_row(trial, provenance: dict[str, Any], run_dir: str) -> dict[str, Any]:
    """One row of trials.parquet: the trial's full settings, its held-out metrics and its checkpoint (relative to
    `run_dir`)."""
    spec = SweepSpec.model_validate(provenance["spec"])
    hookpoint, coder, train = spec.trial_settings(trial.config)
    result = trial.last_result or {}
    final = result.get("split") == "heldout"
    ccfg = dataclasses.asdict(CoderConfig(**coder))
    tcfg = dataclasses.asdict(TrainConfig(**train))
    row: dict[str, Any] = {
        "trial_id": trial.trial_id,
        # A trial stopped before its held-out evaluation (Ctrl+C) is not a failure: the next run resumes it.
        "status": "finished"
        if final and trial.status == "TERMINATED"
        else "failed"
        if trial.status == "ERROR"
        else "stopped",
        "hookpoint": hookpoint,
        **{k: ccfg[k] for k in CODER_FIELDS},
        **{k: tcfg[k] for k in TRAIN_FIELDS},
    }
    for key in ("num_latents", "lr", "d_in", "d_out", "steps", "tokens"):
        if key in result:
            row[key] = result[key]
    for key in (*METRICS, "lexical_latents", "eval_tokens", "train_fvu", "train_seconds"):
        row[key] = result.get(key) if final else None
    checkpoint = trial.checkpoint
    # Tune's path is on its storage filesystem (for s3, `bucket/run/tune/...` without the scheme).
    row["checkpoint"] = (
        relative_to(run_dir, checkpoint.path, checkpoint.filesystem) if checkpoint is not None and final else None
    )
    row["failures"] = trial.num_failures  # retries from a checkpoint: a dead worker or node, an error
    row["error"] = _error_text(trial)
    row.update({k: v for k, v in provenance.items() if k != "spec"})
    return row


def _error_text(trial) -> str | None:
    if trial.status != "ERROR":
        return None
    path = getattr(trial, "error_file", None) or ""
    try:
        text = Path(path).read_text().strip().splitlines()
        return text[-1] if text else "error"
    except OSError:
        return "error (see the trial's folder under tune/)"


def write_trials_table(run_dir: str, rows: list[dict[str, Any]]) -> None:
    """trials.parquet, rewritten atomically, so a reader never sees a partial table."""
    import pandas as pd

    frame = pd.DataFrame(rows).sort_values("trial_id", kind="stable").reset_index(drop=True)
    write_parquet_atomic(run_dir, TRIALS_TABLE, frame)


def write_parquet_atomic(run_dir: str, name: str, frame) -> None:
    """A DataFrame as RUN/name in parquet, written atomically, so a reader never sees a partial table."""
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    fs, base = open_filesystem(run_dir)
    write_bytes_atomic(fs, f"{base}/{name}", buffer.getvalue())


def code_version() -> str:
    """The package version, plus the git commit when running from a checkout."""
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("bae-frontier")
    except PackageNotFoundError:
        v = "unknown"
    try:
        sha = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=8"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{v}+{sha}" if sha else v
