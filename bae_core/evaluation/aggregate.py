"""Aggregating per-latent scores and firing rates (evaluation.md §2 and §3c), on a pandas `latents` table.

The table has one row per latent of a dictionary: `coder_id`, `hookpoint`, `firing_count`, `firing_rate`,
`eligible` and one column per score (e.g. `token_auroc`), NaN where the latent was not scored.

- Unweighted score: the mean over eligible latents. Coverage: eligible / alive (alive: fires at least once).
- Frequency-weighted score (the paper's "frequency-adjusted"): within a hookpoint, sum_i s_i c_i / sum_i c_i over
  eligible latents, with c_i the latent's firing count; then the mean over hookpoints. Frequent latents dominate
  it, which is why binary and continuous coders can swap places between the two.
- Per frequency bucket: the mean score in bins of log10(firing rate).
- Per activation decile (continuous latents): the mean of each decile's score (`decile_token_auroc`).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from bae_core.evaluation.metrics import DENSE_RATE, FREQUENT_RATE

LOG10_RATE_EDGES = (-7.0, -6.0, -5.0, -4.0, -3.0, -2.0, -1.0, 0.0)
"""Default frequency buckets: decades of firing rate, from 1e-7 to 1."""


def _require(latents: pd.DataFrame, columns: list[str]) -> None:
    missing = [c for c in columns if c not in latents.columns]
    if missing:
        raise ValueError(f"latents: missing column(s) {missing}; have {sorted(latents.columns)}")


def weighted_mean(scores: pd.Series, weights: pd.Series) -> float:
    """sum s_i w_i / sum w_i over rows with a finite score (NaN when there is none, or no weight)."""
    ok = np.isfinite(scores.to_numpy(dtype=float))
    w = weights.to_numpy(dtype=float)[ok]
    return float((scores.to_numpy(dtype=float)[ok] * w).sum() / w.sum()) if ok.any() and w.sum() > 0 else math.nan


def score_summary(
    latents: pd.DataFrame, score: str = "token_auroc", by: list[str] | tuple[str, ...] = ("coder_id",)
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per hookpoint, overall) summaries of `score` for each group of `by` columns.

    Per hookpoint: latents, alive, eligible, coverage, the unweighted and frequency-weighted mean. Overall per
    group: the unweighted mean over every eligible latent, the frequency-weighted score as the mean of the
    per-hookpoint weighted means, and coverage over all hookpoints. A column `<score>_shuffled` (or
    `shuffled_<score>`), when present, gets its unweighted mean beside it.
    """
    by = list(by)
    _require(latents, [*by, "hookpoint", "firing_count", "eligible", score])
    control = next((c for c in (f"shuffled_{score}", f"{score}_shuffled") if c in latents.columns), None)
    per_hook = []
    for keys, g in latents.groupby([*by, "hookpoint"], sort=False, dropna=False):
        scored = g[g["eligible"].astype(bool)]
        alive = int((g["firing_count"] > 0).sum())
        row = dict(zip([*by, "hookpoint"], keys if isinstance(keys, tuple) else (keys,), strict=True))
        row.update(
            latents=len(g),
            alive=alive,
            eligible=len(scored),
            coverage=len(scored) / alive if alive else math.nan,
            **{
                score: float(scored[score].mean()) if len(scored) else math.nan,
                f"{score}_weighted": weighted_mean(scored[score], scored["firing_count"]),
            },
        )
        if control:
            row[control] = float(scored[control].mean()) if len(scored) else math.nan
        per_hook.append(row)
    per_hook = pd.DataFrame(per_hook)
    overall = []
    for keys, g in per_hook.groupby(by, sort=False, dropna=False):
        rows = latents.merge(g[[*by, "hookpoint"]], on=[*by, "hookpoint"])
        scored = rows[rows["eligible"].astype(bool)]
        row = dict(zip(by, keys if isinstance(keys, tuple) else (keys,), strict=True))
        row.update(
            hookpoints=len(g),
            latents=int(g["latents"].sum()),
            alive=int(g["alive"].sum()),
            eligible=int(g["eligible"].sum()),
            coverage=g["eligible"].sum() / g["alive"].sum() if g["alive"].sum() else math.nan,
            **{
                score: float(scored[score].mean()) if len(scored) else math.nan,
                f"{score}_weighted": float(g[f"{score}_weighted"].mean()),
            },
        )
        if control:
            row[control] = float(scored[control].mean()) if len(scored) else math.nan
        overall.append(row)
    return per_hook, pd.DataFrame(overall)


def frequency_buckets(
    latents: pd.DataFrame,
    score: str = "token_auroc",
    by: list[str] | tuple[str, ...] = ("coder_id",),
    edges: tuple[float, ...] = LOG10_RATE_EDGES,
) -> pd.DataFrame:
    """Per group and log10(firing rate) bucket [low, high): latents, eligible latents and their mean score.
    Dead latents (rate 0) are left out; rates below the first edge fall in the first bucket."""
    by = list(by)
    _require(latents, [*by, "firing_rate", "eligible", score])
    alive = latents[latents["firing_rate"] > 0]
    log_rate = np.log10(alive["firing_rate"].to_numpy(dtype=float))
    bucket = np.clip(np.searchsorted(np.asarray(edges), log_rate, side="right") - 1, 0, len(edges) - 2)
    alive = alive.assign(_bucket=bucket)
    rows = []
    for keys, g in alive.groupby([*by, "_bucket"], sort=True, dropna=False):
        keys = keys if isinstance(keys, tuple) else (keys,)
        b = int(keys[-1])
        scored = g[g["eligible"].astype(bool)]
        rows.append(
            {
                **dict(zip(by, keys[:-1], strict=True)),
                "log10_rate_low": edges[b],
                "log10_rate_high": edges[b + 1],
                "latents": len(g),
                "eligible": len(scored),
                score: float(scored[score].mean()) if len(scored) else math.nan,
            }
        )
    return pd.DataFrame(rows)


def decile_scores(
    latents: pd.DataFrame, column: str = "decile_token_auroc", by: list[str] | tuple[str, ...] = ("coder_id",)
) -> pd.DataFrame:
    """Per group and activation decile (0 = lowest): the mean score of the latents that have decile scores
    (continuous latents with enough test windows), and how many latents each mean is over."""
    by = list(by)
    _require(latents, [*by, column])
    rows = []
    for keys, g in latents.groupby(by, sort=False, dropna=False):
        values = [v for v in g[column] if v is not None and len(v)]
        if not values:
            continue
        matrix = np.array([np.asarray(v, dtype=float) for v in values])
        finite = np.isfinite(matrix)
        for d in range(matrix.shape[1]):
            rows.append(
                {
                    **dict(zip(by, keys if isinstance(keys, tuple) else (keys,), strict=True)),
                    "decile": d,
                    "latents": int(finite[:, d].sum()),
                    column.removeprefix("decile_"): float(np.nanmean(matrix[:, d])) if finite[:, d].any() else math.nan,
                }
            )
    return pd.DataFrame(rows)


def density(firing_rates: np.ndarray) -> dict[str, float | int]:
    """Counts and fractions of dead (rate 0), frequent (> 1%) and dense (> 10%) latents (evaluation.md §2)."""
    rates = np.asarray(firing_rates, dtype=float)
    if rates.ndim != 1 or len(rates) == 0:
        raise ValueError(f"firing_rates: need a non-empty 1-d array, got shape {rates.shape}")
    n = len(rates)
    counts = {
        "dead": int((rates == 0).sum()),
        "frequent": int((rates > FREQUENT_RATE).sum()),
        "dense": int((rates > DENSE_RATE).sum()),
    }
    return {
        "latents": n,
        **{f"{k}_latents": v for k, v in counts.items()},
        **{f"{k}_fraction": v / n for k, v in counts.items()},
    }


def log_rate_histogram(
    latents: pd.DataFrame, by: list[str] | tuple[str, ...] = ("coder_id",), bins: int = 40, low: float = -7.0
) -> pd.DataFrame:
    """Histogram of log10(firing rate) per group over [low, 0] in `bins` equal bins (long format: one row per
    group and bin). Dead latents have no logarithm: they are counted in a row of their own with NaN edges, and
    alive rates below `low` fall in the first bin."""
    by = list(by)
    _require(latents, [*by, "firing_rate"])
    edges = np.linspace(low, 0.0, bins + 1)
    rows = []
    for keys, g in latents.groupby(by, sort=False, dropna=False):
        key = dict(zip(by, keys if isinstance(keys, tuple) else (keys,), strict=True))
        rates = g["firing_rate"].to_numpy(dtype=float)
        alive = rates[rates > 0]
        counts, _ = np.histogram(np.clip(np.log10(alive), low, 0.0), bins=edges)
        rows.append(
            {**key, "log10_rate_low": math.nan, "log10_rate_high": math.nan, "latents": int((rates == 0).sum())}
        )
        rows += [
            {**key, "log10_rate_low": float(a), "log10_rate_high": float(b), "latents": int(c)}
            for a, b, c in zip(edges[:-1], edges[1:], counts, strict=True)
        ]
    return pd.DataFrame(rows)


# ---- uncertainty: bootstrap over latents, spread over seeds ------------------------------------------------------

MIN_TEST_WINDOWS = 20
"""A dictionary whose eligible latents have a median of fewer activating test windows than this is marked
underpowered: each latent's score then rests on too few examples to mean much."""
BOOTSTRAP_SAMPLES = 1000
"""Bootstrap replicates behind every interval."""
CONFIDENCE = 0.95


def bootstrap_replicates(
    latents: pd.DataFrame,
    statistic: str,
    score: str = "token_auroc",
    *,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int | list[int] = 0,
) -> np.ndarray:
    """`samples` bootstrap replicates of one dictionary's `statistic`, resampling its latents with replacement
    within each hookpoint (stratified, so every replicate keeps the dictionary's hookpoints):

    - "mean": the unweighted mean `score` over eligible latents;
    - "weighted": the frequency-weighted mean (per hookpoint, weighted by firing count; then the mean over
      hookpoints);
    - "frequent_fraction": the fraction of all latents that fire on more than 1% of tokens;
    - "dense_fraction": the fraction of all latents that fire on more than 10% of tokens;
    - "frequent_gap": mean `score` of eligible latents firing on > 1% minus that of the other eligible latents.

    NaN replicates where a replicate has nothing to average (e.g. no frequent latent drawn)."""
    _require(latents, ["hookpoint", "firing_count", "firing_rate", "eligible", score])
    rng = np.random.default_rng(seed)
    groups = [g for _, g in latents.groupby("hookpoint", sort=True)]
    if statistic == "weighted":
        per_hook = [_replicates(g[g["eligible"].astype(bool)], "weighted", score, samples, rng) for g in groups]
        if not per_hook:
            return np.full(samples, math.nan)
        with np.errstate(all="ignore"):  # a hookpoint without eligible latents drops out, as in score_summary
            return np.nanmean(per_hook, axis=0) if np.isfinite(per_hook).any() else np.full(samples, math.nan)
    if statistic in ("frequent_fraction", "dense_fraction"):
        count = "frequent_count" if statistic == "frequent_fraction" else "dense_count"
        sums = [_replicates(g, count, score, samples, rng) for g in groups]
        return np.sum(sums, axis=0) / len(latents)
    if statistic in ("mean", "frequent_gap"):
        parts = [_replicates(g[g["eligible"].astype(bool)], statistic, score, samples, rng) for g in groups]
        num = np.sum([p[0] for p in parts], axis=0)
        den = np.sum([p[1] for p in parts], axis=0)
        if statistic == "mean":
            return _ratio(num, den)
        num_rest = np.sum([p[2] for p in parts], axis=0)
        den_rest = np.sum([p[3] for p in parts], axis=0)
        return _ratio(num, den) - _ratio(num_rest, den_rest)
    raise ValueError(
        f"statistic: choose mean, weighted, frequent_fraction, dense_fraction or frequent_gap, got {statistic!r}"
    )


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), math.nan)


def _replicates(g: pd.DataFrame, statistic: str, score: str, samples: int, rng, chunk: int = 100):
    """Per replicate, the sums one hookpoint contributes (see `bootstrap_replicates`)."""
    n = len(g)
    s = g[score].to_numpy(dtype=float)
    w = g["firing_count"].to_numpy(dtype=float)
    frequent = g["firing_rate"].to_numpy(dtype=float) > FREQUENT_RATE
    out = []
    for start in range(0, samples, chunk):
        b = min(chunk, samples - start)
        draws = rng.integers(0, n, size=(b, n)) if n else np.zeros((b, 0), dtype=int)
        if statistic == "weighted":
            ws = w[draws]
            out.append(_ratio((s[draws] * ws).sum(1), ws.sum(1)))
        elif statistic == "frequent_count":
            out.append(frequent[draws].sum(1).astype(float))
        elif statistic == "dense_count":
            out.append((g["firing_rate"].to_numpy(dtype=float) > DENSE_RATE)[draws].sum(1).astype(float))
        elif statistic == "mean":
            out.append(np.stack([s[draws].sum(1), np.full(b, float(n))]))
        else:  # frequent_gap
            f = frequent[draws]
            sd = s[draws]
            out.append(np.stack([(sd * f).sum(1), f.sum(1), (sd * ~f).sum(1), (~f).sum(1)]).astype(float))
    return np.concatenate(out, axis=-1)


def interval(replicates: np.ndarray, level: float = CONFIDENCE) -> tuple[float, float]:
    """The percentile interval of bootstrap replicates (NaN, NaN when fewer than half are finite)."""
    finite = replicates[np.isfinite(replicates)]
    if len(finite) < len(replicates) / 2 or len(finite) == 0:
        return math.nan, math.nan
    tail = (1 - level) / 2
    return float(np.quantile(finite, tail)), float(np.quantile(finite, 1 - tail))


def score_basis(
    latents: pd.DataFrame, score: str = "token_auroc", *, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0
) -> dict[str, float | int | bool]:
    """What one dictionary's aggregate scores rest on: eligible latents and their share of the firing (the
    frequency-weighted score covers only that share: latents firing in nearly every window have no
    non-activating test windows and are not eligible), the median activating and
    non-activating test windows per eligible latent, 95% bootstrap intervals of the unweighted and
    frequency-weighted means (resampling latents), and `underpowered` (median activating test windows below
    `MIN_TEST_WINDOWS`)."""
    scored = latents[latents["eligible"].astype(bool)]
    median_on = float(scored["test_activating_windows"].median()) if len(scored) else 0.0
    median_off = (
        float(scored["test_nonactivating_windows"].median())
        if len(scored) and "test_nonactivating_windows" in scored
        else math.nan
    )
    low, high = interval(bootstrap_replicates(latents, "mean", score, samples=samples, seed=seed))
    w_low, w_high = interval(bootstrap_replicates(latents, "weighted", score, samples=samples, seed=seed))
    fired = float(latents["firing_count"].sum())
    return {
        "eligible": len(scored),
        "eligible_firing_share": float(scored["firing_count"].sum()) / fired if fired else math.nan,
        "test_windows_median": median_on,
        "test_nonactivating_windows_median": median_off,
        f"{score}_ci_low": low,
        f"{score}_ci_high": high,
        f"{score}_weighted_ci_low": w_low,
        f"{score}_weighted_ci_high": w_high,
        "underpowered": bool(median_on < MIN_TEST_WINDOWS),
    }


def across_seeds(
    coders: pd.DataFrame, columns: list[str] | tuple[str, ...], by: list[str] | tuple[str, ...]
) -> pd.DataFrame:
    """Per setting (`by`, every column but the seed), the number of seeds and the mean and standard deviation
    over seeds of each of `columns`."""
    by = [c for c in by if c in coders.columns]
    columns = [c for c in columns if c in coders.columns]
    rows = []
    for keys, g in coders.groupby(by, sort=True, dropna=False):
        row = dict(zip(by, keys if isinstance(keys, tuple) else (keys,), strict=True))
        row["seeds"] = int(g["seed"].nunique()) if "seed" in g else len(g)
        for c in columns:
            values = g[c].to_numpy(dtype=float)
            row[f"{c}_mean"] = float(np.nanmean(values)) if np.isfinite(values).any() else math.nan
            row[f"{c}_std"] = float(np.nanstd(values, ddof=1)) if np.isfinite(values).sum() > 1 else math.nan
        rows.append(row)
    return pd.DataFrame(rows)
