"""Whether each coder's training had converged: did its train FVU level off over the last part of training?

The rule, applied to each trial's training log (`analysis.run.training_curves`: one row every
`training.log_every` steps, each the mean FVU of the batches since the row before):

1. The window is the last `window` (default 20%) of the trial's training: the rows with step >= (1 - window) x
   the last logged step. It needs at least `min_rows` (default 5) rows; fewer, and the verdict is "too few logged
   steps" (a run logged only at its checkpoints, say): convergence is not shown.
2. A straight line is fitted to FVU against step in the window with the Theil-Sen estimator (the median of the
   slopes between every pair of rows). Batch noise is already averaged within each row; the median then ignores
   the odd spike, and a least-squares line would not.
3. The relative drop over the window is (fit at the window's first step - fit at the last logged step) / fit at
   the window's first step, with a 95% interval from the interval of the Theil-Sen slope.
4. Verdict: "levelled off" when the relative drop is below `threshold` (default 2%, i.e. FVU fell by less than
   2% of its value over the last fifth of training) and above -threshold; "still falling" when it is at least
   `threshold` and its interval lies above zero; "rising" when FVU grew by at least `threshold` and the interval
   lies below zero; "too noisy to tell" when the line moves by more than the threshold but its interval covers
   zero (at batch 1024, 10-step means of train FVU still scatter by several percent, so a short window can leave
   it wide). A trial without a training log is "no training log".

A coder that is "still falling" has not reached the FVU its size and k allow: a longer run would lower it, so
comparisons between such coders compare training budgets as much as architectures.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy.stats import theilslopes

from analysis.frontier import family

WINDOW = 0.2
"""The fraction of training, at its end, over which the FVU drop is measured."""
THRESHOLD = 0.02
"""A relative FVU drop below this over the window counts as levelled off."""
MIN_ROWS = 5
"""Logged steps the window needs for a verdict."""

LEVELLED = "levelled off"
FALLING = "still falling"
RISING = "rising"
UNCLEAR = "too noisy to tell"
TOO_FEW = "too few logged steps"
NO_LOG = "no training log"

COLUMNS = [
    "trial_id",
    "steps",
    "window_start",
    "window_rows",
    "fvu_window_start",
    "fvu_end",
    "relative_drop",
    "relative_drop_low",
    "relative_drop_high",
    "verdict",
    "levelled_off",
]
_LABELS = ["family", "hookpoint", "activation", "kind", "k", "num_latents", "seed"]


def describe_rule(window: float = WINDOW, threshold: float = THRESHOLD) -> str:
    """The rule in one sentence, for a report's caption."""
    return (
        f"A coder's FVU has levelled off when a Theil-Sen line fitted to its train FVU over the last {window:.0%} of "
        f"training moves by less than {threshold:.0%} of its value across that window; it is still falling (or rising) "
        f"when it falls (or rises) by {threshold:.0%} or more and the 95% interval of that change excludes zero, and "
        "too noisy to tell when the interval covers zero."
    )


def convergence_table(
    curves: pd.DataFrame,
    trials: pd.DataFrame,
    *,
    window: float = WINDOW,
    threshold: float = THRESHOLD,
    min_rows: int = MIN_ROWS,
) -> pd.DataFrame:
    """One row per trial of `trials` (in its order): the coder's labels (family, hookpoint, activation, kind, k,
    num_latents, seed, where `trials` has them), then

    steps               the last logged step
    window_start        the first step of the window (the last `window` of training)
    window_rows         logged rows in the window
    fvu_window_start    the Theil-Sen line at window_start
    fvu_end             the line at the last logged step
    relative_drop       (fvu_window_start - fvu_end) / fvu_window_start; negative when FVU rose
    relative_drop_low, relative_drop_high   its 95% interval (from the slope's)
    verdict             levelled off / still falling / rising / too noisy to tell / too few logged steps /
                        no training log
    levelled_off        verdict == "levelled off"

    `curves` is `training_curves(trials)` (`trial_id`, `step`, `fvu`). The rule is in the module docstring.
    """
    if not 0 < window <= 1:
        raise ValueError(f"window: a fraction of training in (0, 1], got {window!r}")
    if not threshold > 0:
        raise ValueError(f"threshold: must be > 0, got {threshold!r}")
    if min_rows < 3:
        raise ValueError(f"min_rows: a line through fewer than 3 rows says nothing about noise, got {min_rows!r}")
    by_trial = {t: g for t, g in curves.groupby("trial_id", sort=False)} if len(curves) else {}
    rows = []
    for trial in trials.to_dict("records"):
        labels = {k: trial[k] for k in _LABELS if k in trial}
        if "family" not in trials and "activation" in trial and "kind" in trial:
            labels["family"] = family(trial["activation"], trial["kind"])
        g = by_trial.get(trial["trial_id"])
        g = g.dropna(subset=["step", "fvu"]).sort_values("step") if g is not None else None
        rows.append({"trial_id": trial["trial_id"], **labels, **_judge(g, window, threshold, min_rows)})
    labels = [k for k in _LABELS if rows and k in rows[0]]
    table = pd.DataFrame(rows, columns=["trial_id", *labels, *COLUMNS[1:]])
    return table.astype({"steps": "Int64", "window_start": "Int64", "window_rows": "Int64", "levelled_off": bool})


def _judge(g: pd.DataFrame | None, window: float, threshold: float, min_rows: int) -> dict:
    if g is None or g.empty:
        return {"verdict": NO_LOG, "levelled_off": False}
    step = g["step"].to_numpy(dtype=float)
    fvu = g["fvu"].to_numpy(dtype=float)
    last = step[-1]
    start = (1 - window) * last
    inside = step >= start
    out = {"steps": int(last), "window_start": int(math.ceil(start)), "window_rows": int(inside.sum())}
    if inside.sum() < min_rows:
        return {**out, "verdict": TOO_FEW, "levelled_off": False}
    x, y = step[inside], fvu[inside]
    slope, intercept, low, high = theilslopes(y, x, alpha=0.95)
    first = intercept + slope * start
    end = intercept + slope * last
    span = last - start
    drop = (first - end) / first
    drop_low, drop_high = -high * span / first, -low * span / first
    if abs(drop) < threshold:
        verdict = LEVELLED
    elif drop >= threshold and drop_low > 0:
        verdict = FALLING
    elif drop <= -threshold and drop_high < 0:
        verdict = RISING
    else:
        verdict = UNCLEAR  # the line moves by more than the threshold, but batch noise could explain it
    return {
        **out,
        "fvu_window_start": float(first),
        "fvu_end": float(end),
        "relative_drop": float(drop),
        # A steeper fall (the more negative slope) is the larger drop.
        "relative_drop_low": float(drop_low),
        "relative_drop_high": float(drop_high),
        "verdict": verdict,
        "levelled_off": verdict == LEVELLED,
    }


def convergence_summary(table: pd.DataFrame, threshold: float = THRESHOLD) -> str:
    """One or two sentences for the report: how many coders levelled off, and the range of the drops of those
    still falling."""
    judged = table[table["verdict"].isin([LEVELLED, FALLING, RISING, UNCLEAR])]
    unjudged = len(table) - len(judged)
    if judged.empty:
        return (
            f"Convergence is not shown for any of the {len(table)} coders: their training logs have too few rows "
            "over the last part of training (or none)."
        )
    counts = judged["verdict"].value_counts()
    falling = judged[judged["verdict"] == FALLING]
    parts = [f"{counts.get(LEVELLED, 0)} of {len(judged)} coders had levelled off by the end of training"]
    if len(falling):
        lo, hi = np.percentile(falling["relative_drop"], [0, 100])
        span = f"{lo:.0%}" if math.isclose(lo, hi, abs_tol=0.005) else f"{lo:.0%} to {hi:.0%}"
        parts.append(
            f"{len(falling)} {'was' if len(falling) == 1 else 'were'} still falling (train FVU down by {span} over "
            f"the window, against a {threshold:.0%} threshold): their FVU is not what a longer run would reach"
        )
    if counts.get(RISING, 0):
        parts.append(f"{counts[RISING]} rose over the window (train FVU up by {threshold:.0%} or more)")
    if counts.get(UNCLEAR, 0):
        parts.append(
            f"for {counts[UNCLEAR]} the batch-to-batch noise is larger than the trend (the interval of the change "
            "covers zero): too noisy to tell"
        )
    text = "; ".join(parts) + "."
    if unjudged:
        text += f" {unjudged} not judged (too few logged steps, or no training log)."
    return text
