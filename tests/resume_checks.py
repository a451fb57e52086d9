"""What the tests of failures check: that a retried or resumed trial went on from its checkpoint rather than from
step 0, read from the reports Tune appended to the trial's result.json over all its attempts."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path


def reported_steps(trial_dir: Path) -> list[int]:
    """The `steps` of every report of a trial, in the order Tune logged them, over all its attempts."""
    steps = []
    for line in (Path(trial_dir) / "result.json").read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line being written
            steps.append(int(json.loads(line)["steps"]))
    return steps


def resumed_from(trial_dir: Path, checkpoint_every: int) -> list[int]:
    """The checkpoint steps a trial went on from after each of its failures, checked on the way.

    Every report of this project's trials carries a checkpoint, so an attempt that goes on from the checkpoint of
    step c first reports step c + `checkpoint_every`. A report whose step is not above the one before marks a new
    attempt. It must go on from the last checkpoint the attempt before it reported, or from the one before that
    when the last had not been registered yet as the attempt died (step 0 only when that attempt had reported
    nothing else), and no report after the failure may come at or before that checkpoint's step. A trial
    restarted from step 0 after a few checkpoints reports `checkpoint_every` again and fails here. An attempt
    that goes on exactly from its last report leaves no trace in the steps, which then only increase.
    """
    steps = reported_steps(trial_dir)
    assert steps, f"{trial_dir}: no report"
    resumed, attempt = [], 0
    for i in range(1, len(steps)):
        if steps[i] > steps[i - 1]:
            continue
        checkpoint, before = steps[i] - checkpoint_every, steps[attempt:i]
        assert checkpoint in (0, *before) and checkpoint >= before[-1] - checkpoint_every, (
            f"{trial_dir}: after a failure the trial reported step {steps[i]}, so it went on from step {checkpoint}, "
            f"not from the last checkpoint it had reported (reports {steps})"
        )
        assert all(s > checkpoint for s in steps[i:]), f"{trial_dir}: a report at or before step {checkpoint}: {steps}"
        resumed.append(checkpoint)
        attempt = i
    return resumed
