"""The known answers every scored run carries (evaluation.md §3c), checked: a run whose controls miss their
expected values has a broken scorer, and its report says so at the top.

- token control: latents that fire exactly on single frequent tokens; a lexical judge must score them near 1
  (`TOKEN_CONTROL_MIN`).
- random control: latents with the same firing counts at random positions; near 0.5 (`CHANCE_TOLERANCE`), with a
  bootstrap interval that covers 0.5 (a leak between explain and test windows lifts it above).
- shuffled control: each coder's own latents with firing moved to random windows; near 0.5.
"""

from __future__ import annotations

import math

import pandas as pd

TOKEN_CONTROL_MIN = 0.95
"""The token control's mean token AUROC must be at least this."""
CHANCE_TOLERANCE = 0.05
"""The random and shuffled controls' mean token AUROC must lie within this of 0.5."""


def control_checks(coders: pd.DataFrame) -> pd.DataFrame:
    """One row per control measurement of a scored run: `control`, `coder_id`, `expected`, `measured`
    (mean token AUROC), `latents` (eligible latents behind it) and `ok`."""
    rows = []
    dictionary = coders.get("dictionary", pd.Series([None] * len(coders), index=coders.index))
    for (_, r), kind in zip(coders.iterrows(), dictionary, strict=True):
        if kind == "token_control":
            rows.append(
                _row("token control", r, "token_auroc", f">= {TOKEN_CONTROL_MIN}", lambda v: v >= TOKEN_CONTROL_MIN)
            )
        elif kind == "random_control":
            low, high = r.get("token_auroc_ci_low", math.nan), r.get("token_auroc_ci_high", math.nan)
            covers = not (math.isfinite(low) and math.isfinite(high)) or low <= 0.5 <= high
            expected = f"{_chance()}, 95% CI covering 0.5"
            rows.append(_row("random control", r, "token_auroc", expected, lambda v, c=covers: _near_chance(v) and c))
        if "shuffled_token_auroc" in r and isinstance(r.get("trial_id"), str):
            rows.append(_row("shuffled control", r, "shuffled_token_auroc", _chance(), _near_chance))
    return pd.DataFrame(rows, columns=["control", "coder_id", "expected", "measured", "latents", "ok"])


def _chance() -> str:
    return f"0.5 +- {CHANCE_TOLERANCE}"


def _near_chance(value: float) -> bool:
    return abs(value - 0.5) <= CHANCE_TOLERANCE


def _row(control: str, r: pd.Series, column: str, expected: str, check) -> dict:
    value = float(r.get(column, math.nan))
    return {
        "control": control,
        "coder_id": r["coder_id"],
        "expected": expected,
        "measured": value,
        "latents": int(r.get("eligible", 0)),
        "ok": bool(math.isfinite(value) and check(value)),
    }


def missed_controls(checks: pd.DataFrame) -> str:
    """A one-paragraph warning naming every control that missed its expected value ("" when none did, and when
    the run has no control at all, a warning saying so)."""
    if checks.empty:
        return "No control was scored in this run: nothing shows that the scorer gives its known answers."
    missed = checks[~checks["ok"]]
    if missed.empty:
        return ""
    items = "; ".join(
        f"{r.control} of {r.coder_id}: {r.measured:.3f}, expected {r.expected}" for r in missed.itertuples()
    )
    return (
        f"{len(missed)} of {len(checks)} controls missed their expected values ({items}). "
        "Treat every score here with suspicion."
    )
