"""The sweep's table of trials, trials.parquet: one row per finished or failed coder (its settings, held-out
metrics, checkpoint and provenance), rewritten atomically by a driver-side Tune callback as trials end. A Tune
trial that trains a group of coders (`resources.coders_per_trial`) gives one row per coder: `trial_id` is the Tune
trial's id with the coder's place in the group (`<id>_c0`, `<id>_c1`, ...), `tune_trial` the Tune trial's, and
`checkpoint` the coder's folder inside the group's checkpoint.

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
from ray_jobs.sweep_trial import GROUP_KEY, coder_folder, trial_points

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
        points = trial_points(trial.config)
        # Coders of the other ended trials: this one's status may not say it has ended yet.
        before = sum(
            len(trial_points(t.config)) for t in trials if t is not trial and t.status in ("TERMINATED", "ERROR")
        )
        for i, (point, r) in enumerate(zip(points, _results(trial), strict=True)):
            settings = " ".join(f"{k}={v}" for k, v in point.items())
            figures = (
                f"fvu={r['fvu']:.4f} l0={r['l0']:.1f} dead={r['dead_fraction']:.3f} dense={r['dense_fraction']:.3f}"
                if r.get("split") == "heldout"
                else ""
            )
            at = before + i + 1
            print(f"  [{at}/{self.total}] {what} {settings} {figures}".rstrip(), file=sys.stderr, flush=True)

    def _write(self, trials) -> None:
        rows = [
            row
            for t in trials
            if t.status in ("TERMINATED", "ERROR")
            for row in trial_rows(t, self.provenance, self.run_dir)
        ]
        if rows:
            write_trials_table(self.run_dir, rows)


def _results(trial) -> list[dict[str, Any]]:
    """A trial's last report per coder (a group's are under `coders`)."""
    result = trial.last_result or {}
    n = len(trial_points(trial.config))
    if GROUP_KEY not in trial.config:
        return [result]
    per_coder = result.get(GROUP_KEY) or {}
    return [per_coder.get(str(i)) or {} for i in range(n)]


def trial_rows(trial, provenance: dict[str, Any], run_dir: str) -> list[dict[str, Any]]:
    """The rows of trials.parquet of one Tune trial: one per coder it trains."""
    grouped = GROUP_KEY in trial.config
    points = trial_points(trial.config)
    rows = []
    for i, (point, result) in enumerate(zip(points, _results(trial), strict=True)):
        row = trial_row(
            trial, provenance, run_dir, point=point, result=result, folder=coder_folder(i) if grouped else None
        )
        if grouped:
            row["trial_id"] = f"{trial.trial_id}_c{i}"
        row["tune_trial"] = trial.trial_id
        row["coders_in_trial"] = len(points)
        rows.append(row)
    return rows


def trial_row(
    trial,
    provenance: dict[str, Any],
    run_dir: str,
    *,
    point: dict[str, Any] | None = None,
    result: dict[str, Any] | None = None,
    folder: str | None = None,
) -> dict[str, Any]:
    """One row of trials.parquet: a coder's full settings, its held-out metrics and its checkpoint (relative to
    `run_dir`). A group member passes its grid `point`, its `result` and its `folder` in the group's checkpoint."""
    spec = SweepSpec.model_validate(provenance["spec"])
    hookpoint, coder, train = spec.trial_settings(trial.config if point is None else point)
    result = (trial.last_result or {}) if result is None else result
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
    path = None if checkpoint is None else checkpoint.path if folder is None else f"{checkpoint.path}/{folder}"
    row["checkpoint"] = relative_to(run_dir, path, checkpoint.filesystem) if path is not None and final else None
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
