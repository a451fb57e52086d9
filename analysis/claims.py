"""The paper's claims (evaluation.md §6), checked on a run's own numbers, with their uncertainty.

Each claim compares binary and continuous coders (or transcoders and SAEs) *at matched settings*: the pairs of
trained coders that differ only in the compared property (same hookpoint, kind, k, dictionary size and seed).
The claim's statistic is the mean paired difference over the run's settings, and its 95% interval comes from a
bootstrap that resamples, in every replicate, each coder's latents (for scores and firing-rate shares) and, where
a setting has several seeds, the seeds of that setting. A claim "agrees" or "disagrees" only when the interval
excludes zero in that direction; otherwise it is "inconclusive" at the run's size. A number that rests on one
coder with no latent to resample (FVU, spliced CE) has an interval only across seeds: with one seed per setting
the claim is inconclusive, whatever the point estimate says. A claim whose numbers are missing is "not measured".

Binary top-k fires fewer than k latents per token, so every comparison also states held-out L0 on each side,
and says where the two sides' sparsity differs by more than `SPARSITY_TOLERANCE`.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import t as student_t

from bae_core.coders.config import BINARY_ACTIVATIONS
from bae_core.evaluation.aggregate import BOOTSTRAP_SAMPLES, CONFIDENCE, bootstrap_replicates, interval

MATCH = ("hookpoint", "kind", "k", "num_latents", "seed")
"""What two coders must share to be compared as binary vs continuous."""
TC_MATCH = ("hookpoint", "activation", "k", "num_latents", "seed")
"""What a transcoder and an SAE must share to be compared."""
AGREES, DISAGREES, INCONCLUSIVE, NOT_MEASURED = "agrees", "disagrees", "inconclusive", "not measured"
SPARSITY_TOLERANCE = 0.10
"""Held-out L0 of two compared coders differing by more than this fraction is reported as a sparsity difference."""
MIN_FIRING_SHARE = 0.5
"""A frequency-weighted comparison needs the eligible latents to hold at least this share of each coder's firing."""
SIMILAR_FVU = 1.1
"""Claim 5's "similar reconstruction": the transcoder's FVU at most this multiple of the SAE's."""
LATENT_STATISTICS = {
    "token_auroc": "mean",
    "token_auroc_weighted": "weighted",
    "frequent_fraction": "frequent_fraction",
    "dense_fraction": "dense_fraction",
    "frequent_gap": "frequent_gap",
}
"""Coder columns whose replicates resample the coder's latents
(`bae_core.evaluation.aggregate.bootstrap_replicates`)."""


@dataclass(frozen=True)
class Difference:
    """A mean (paired) difference over a run's settings with its bootstrap interval."""

    estimate: float
    low: float
    high: float
    pairs: int
    max_seeds: int

    def verdict(self, direction: int) -> str:
        """agrees when the interval excludes zero on the `direction` side (+1: positive), disagrees when it
        excludes zero on the other, inconclusive otherwise; not measured without pairs."""
        if self.pairs == 0 or not math.isfinite(self.estimate):
            return NOT_MEASURED
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            return INCONCLUSIVE
        if self.low > 0 or self.high < 0:
            return AGREES if (self.low > 0) == (direction > 0) else DISAGREES
        return INCONCLUSIVE

    def text(self, unit: str = "") -> str:
        if self.pairs == 0 or not math.isfinite(self.estimate):
            return "not measured"
        if math.isfinite(self.low) and self.max_seeds > 1:
            ci = f"95% CI [{self.low:+.3f}, {self.high:+.3f}] across seeds"
        elif math.isfinite(self.low):
            ci = f"95% CI [{self.low:+.3f}, {self.high:+.3f}] over latents; one seed: about these coders only"
        else:
            ci = "no interval: one seed per setting and no latents to resample"
        return f"{self.estimate:+.3f}{unit} ({ci}; {self.pairs} pair{'s' if self.pairs != 1 else ''})"


def combine(verdicts: list[str]) -> str:
    """A claim made of several parts: disagrees if any part does, not measured if any part is (and none
    disagrees), agrees if all agree, inconclusive otherwise."""
    if DISAGREES in verdicts:
        return DISAGREES
    if NOT_MEASURED in verdicts:
        return NOT_MEASURED
    return AGREES if all(v == AGREES for v in verdicts) else INCONCLUSIVE


class _Replicates:
    """Bootstrap replicates of coders' statistics, computed once per (coder, statistic)."""

    def __init__(self, latents: pd.DataFrame | None, samples: int, seed: int):
        self.groups = dict(tuple(latents.groupby("coder_id", sort=False))) if latents is not None else {}
        self.samples, self.seed, self.done = samples, seed, {}

    def __call__(self, coder: pd.Series, column: str) -> tuple[np.ndarray | None, float]:
        """(replicates, point value) of `column` for a coder: resampled latents where the column is a latent
        statistic and the coder's latents are known, else its one value repeated (no within-coder interval);
        replicates None when the number is missing."""
        key = (coder["coder_id"], column)
        if key not in self.done:
            value = coder.get(column, math.nan)
            statistic = LATENT_STATISTICS.get(column)
            rows = self.groups.get(coder["coder_id"])
            if statistic is not None and rows is not None and "token_auroc" in rows:
                # Each coder its own draws: a shared seed would pair two coders' latents by index.
                seed = [self.seed, zlib.crc32(str(coder["coder_id"]).encode())]
                reps = bootstrap_replicates(rows, statistic, samples=self.samples, seed=seed)
                if column == "frequent_gap":
                    value = _frequent_gap(rows)
            elif column == "frequent_gap" or value is None or not math.isfinite(float(value)):
                reps = None
            else:
                reps = np.full(self.samples, float(value))
            self.done[key] = (reps, float(value) if value is not None else math.nan)
        return self.done[key]


def _frequent_gap(rows: pd.DataFrame) -> float:
    from bae_core.evaluation.metrics import FREQUENT_RATE

    scored = rows[rows["eligible"].astype(bool)]
    frequent = scored["firing_rate"] > FREQUENT_RATE
    if not frequent.any() or frequent.all():
        return math.nan
    return float(scored.loc[frequent, "token_auroc"].mean() - scored.loc[~frequent, "token_auroc"].mean())


def _pairs(coders: pd.DataFrame, split: str, match: tuple[str, ...]) -> pd.DataFrame:
    """Rows of matched pairs: columns `<metric>_a` and `<metric>_b` where a/b are the two sides of `split`
    (binary vs continuous, or transcoder vs SAE)."""
    trained = coders[coders["trial_id"].notna()].copy()
    if split == "binary":
        trained["_side"] = np.where(trained["activation"].isin(BINARY_ACTIVATIONS), "a", "b")
    else:
        trained["_side"] = np.where(trained["kind"] == "sae", "b", "a")
    keys = [c for c in match if c in trained.columns]
    a = trained[trained["_side"] == "a"].drop(columns="_side")
    b = trained[trained["_side"] == "b"].drop(columns="_side")
    pairs = a.merge(b, on=keys, suffixes=("_a", "_b"))
    # A setting is everything but the seed, the two sides' own activation and kind included: two continuous
    # activations compared with one binary one are two settings, not replicates of one.
    setting = [k for k in keys if k != "seed"] + [
        f"{c}_{s}" for c in ("activation", "kind") if c not in keys for s in "ab"
    ]
    pairs["_setting"] = pairs[setting].astype(str).agg("/".join, axis=1) if len(pairs) else ""
    return pairs


def difference(
    pairs: pd.DataFrame,
    column: str,
    replicates: _Replicates,
    *,
    sides: str = "ab",
) -> Difference:
    """The mean over settings of `column`'s paired difference a - b (or, `sides` "a", of side a's own value),
    each setting's value the mean over its seeds, with its 95% interval: with several seeds a t-interval from the
    between-seed variance pooled over settings; with one seed per setting the bootstrap over each coder's
    latents (about these coders only), or none for a per-coder number."""
    per_setting: dict[str, list[tuple[np.ndarray, float]]] = {}
    for _, row in pairs.iterrows():
        values = []
        for side in sides:
            coder = pd.Series({k[:-2]: v for k, v in row.items() if k.endswith(f"_{side}")})
            reps, point = replicates(coder, column)
            if reps is None or not math.isfinite(point):
                break
            values.append((reps, point))
        else:
            reps = values[0][0] - values[1][0] if len(values) == 2 else values[0][0]
            point = values[0][1] - values[1][1] if len(values) == 2 else values[0][1]
            per_setting.setdefault(row["_setting"], []).append((reps, point))
    if not per_setting:
        return Difference(math.nan, math.nan, math.nan, 0, 0)
    estimates = [float(np.mean([p for _, p in rows])) for rows in per_setting.values()]
    estimate = float(np.mean(estimates))
    n_pairs = sum(len(r) for r in per_setting.values())
    most_seeds = max(len(r) for r in per_setting.values())
    if most_seeds > 1:
        # Seeds are the replicates: a t-interval with the between-seed variance pooled over settings (each seed's
        # difference already carries its latent-sampling noise). A percentile bootstrap over 3 seeds would be
        # about their [min, max], far too narrow.
        residuals = [p - m for rows, m in zip(per_setting.values(), estimates, strict=True) for _, p in rows]
        dof = n_pairs - len(per_setting)
        pooled = float(np.sum(np.square(residuals)) / dof)
        se = math.sqrt(pooled * sum(1 / len(r) for r in per_setting.values())) / len(per_setting)
        half = float(student_t.ppf(0.5 + CONFIDENCE / 2, dof)) * se
        return Difference(estimate, estimate - half, estimate + half, n_pairs, most_seeds)
    # One seed per setting: only the latents can be resampled; the interval is about these coders, not about
    # the architectures (training-seed variance is unknown). A per-coder number (FVU, CE) has none.
    combined = np.mean([rows[0][0] for rows in per_setting.values()], axis=0)
    low, high = interval(combined)
    if np.allclose(combined, combined[0], rtol=0, atol=1e-12):
        low = high = math.nan
    return Difference(estimate, low, high, n_pairs, most_seeds)


def _l0_note(pairs: pd.DataFrame, names: tuple[str, str]) -> str:
    """Held-out L0 on each side, pair by pair, and where it differs by more than `SPARSITY_TOLERANCE`."""
    column = "l0_heldout" if "l0_heldout_a" in pairs else "l0"
    if pairs.empty or f"{column}_a" not in pairs:
        return ""
    parts, differ = [], []
    for r in pairs.itertuples():
        a, b = getattr(r, f"{column}_a"), getattr(r, f"{column}_b")
        parts.append(f"{a:.1f} vs {b:.1f} (k={r.k})" if "k" in pairs else f"{a:.1f} vs {b:.1f}")
        if b > 0 and abs(a / b - 1) > SPARSITY_TOLERANCE:
            differ.append(f"{a / b - 1:+.0%}")
    note = f"held-out L0 {names[0]} vs {names[1]}: " + ", ".join(parts)
    if differ:
        note += f"; sparsity differs in {len(differ)} of {len(parts)} pairs ({', '.join(differ)})"
    return note


def claims_table(
    coders: pd.DataFrame,
    latents: pd.DataFrame | None = None,
    *,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per claim of evaluation.md §6: `claim`, `paper`, `verdict` (agrees / disagrees / inconclusive /
    not measured), `estimate`, `ci_low`, `ci_high` (of the claim's main difference), `measured` (every part with
    its interval), `sparsity` (held-out L0 of the compared sides), `pairs` and `seeds` (most seeds of a setting)."""
    reps = _Replicates(latents, samples, seed)
    rows = []
    binary = _pairs(coders, "binary", MATCH)
    l0_binary = _l0_note(binary, ("binary", "continuous"))

    def add(
        claim: str,
        paper: str,
        parts: list[tuple[str, Difference, int]],
        sparsity: str,
        extra: str = "",
        scored: pd.DataFrame | None = None,
        weighted: bool = False,
        score_parts: list[bool] | None = None,
        split_density: bool = False,
    ):
        verdicts = [d.verdict(direction) for _, d, direction in parts]
        if split_density:  # two cuts of one quantity that disagree: neither decides
            verdicts = [INCONCLUSIVE if not scores else v for v, scores in zip(verdicts, score_parts, strict=True)]
        main = parts[0][1]
        measured = "; ".join(f"{name} {d.text()}" for name, d, _ in parts) + extra
        # Scores rest on their test windows and their eligible latents: a claim on underpowered coders, or a
        # weighted score that misses most of the firing mass, is inconclusive whatever its interval says.
        doubts = []
        if scored is not None and len(scored):
            flags = [scored[f"underpowered_{s}"] for s in "ab" if f"underpowered_{s}" in scored]
            if flags and pd.concat(flags).fillna(False).astype(bool).any():
                n = int(pd.concat(flags).fillna(False).astype(bool).sum())
                doubts.append(f"{n} of {2 * len(scored)} compared coders {'is' if n == 1 else 'are'} underpowered")
            shares = [scored[f"eligible_firing_share_{s}"] for s in "ab" if f"eligible_firing_share_{s}" in scored]
            if weighted and shares and pd.concat(shares).min() < MIN_FIRING_SHARE:
                doubts.append(
                    f"eligible latents hold as little as {pd.concat(shares).min():.0%} of a coder's firing "
                    f"(the rest fire in too many windows to be tested)"
                )
        if doubts:  # the score-based parts only: a density or reconstruction number does not rest on test windows
            verdicts = [
                INCONCLUSIVE if scores and v in (AGREES, DISAGREES) else v
                for v, scores in zip(verdicts, score_parts or [True] * len(parts), strict=True)
            ]
        verdict = combine(verdicts)
        if doubts:
            measured += "; " + "; ".join(doubts)
        rows.append(
            {
                "claim": claim,
                "paper": paper,
                "verdict": verdict,
                "estimate": main.estimate,
                "ci_low": main.low,
                "ci_high": main.high,
                "measured": measured,
                "sparsity": sparsity,
                "pairs": main.pairs,
                "seeds": main.max_seeds,
            }
        )

    add(
        "1. binary coders are more interpretable, unweighted",
        "binary > continuous, mean score over latents",
        [("mean token AUROC, binary - continuous:", difference(binary, "token_auroc", reps), +1)],
        l0_binary,
        scored=binary,
    )
    add(
        "2. binary coders reconstruct worse",
        "binary has higher FVU and larger spliced CE increase",
        [
            ("FVU, binary - continuous:", difference(binary, "fvu", reps), +1),
            (
                "spliced CE increase (nats), binary - continuous:",
                difference(binary, "ce_increase", reps),
                +1,
            ),
        ],
        l0_binary,
    )
    binary_coders = binary.drop_duplicates("coder_id_a")
    # "Ultra-high-frequency" has no fixed cut (evaluation.md §2: report > 1% and > 10%). At a small dictionary
    # the mean firing rate k / num_latents is itself near 1%, so the density part must hold at both cuts: where
    # they point different ways the verdict depends on the cut, and the claim is inconclusive.
    frequent = difference(binary, "frequent_fraction", reps)
    dense = difference(binary, "dense_fraction", reps)
    density = [frequent.verdict(+1), dense.verdict(+1)]
    cut_note = ""
    if AGREES in density and DISAGREES in density:
        cut_note = "; the two cuts point different ways, so the density part is inconclusive"
    add(
        "3. binary coders have more ultra-high-frequency latents, and those score low",
        "more latents firing on > 1% (and > 10%) of tokens; they score below the coder's other latents",
        [
            ("share of latents > 1%, binary - continuous:", frequent, +1),
            ("share of latents > 10%, binary - continuous:", dense, +1),
            (
                "binary coders' > 1% latents minus their other latents, mean token AUROC:",
                difference(binary_coders, "frequent_gap", reps, sides="a"),
                -1,
            ),
        ],
        l0_binary,
        extra=cut_note,
        scored=binary,
        weighted=True,
        score_parts=[False, False, True],
        split_density=bool(cut_note),
    )
    add(
        "4. frequency-weighted, continuous coders score higher (the ranking flips)",
        "continuous > binary once weighted by firing count, although binary > continuous unweighted",
        [
            (
                "frequency-weighted mean token AUROC, binary - continuous:",
                difference(binary, "token_auroc_weighted", reps),
                -1,
            )
        ],
        l0_binary,
        scored=binary,
        weighted=True,
    )
    tc = _pairs(coders, "kind", TC_MATCH)
    similar = ""
    if not tc.empty and {"fvu_a", "fvu_b"} <= set(tc.columns):
        ok = tc["fvu_a"] <= tc["fvu_b"] * SIMILAR_FVU
        fvus = ", ".join(f"{a:.3f} vs {b:.3f}" for a, b in zip(tc["fvu_a"], tc["fvu_b"], strict=True))
        similar = (
            f"; FVU transcoder vs SAE {fvus}"
            f" ({int(ok.sum())} of {len(tc)} pairs at similar or better reconstruction, within {SIMILAR_FVU - 1:.0%})"
        )
    score = difference(tc, "token_auroc", reps)
    parts = [("mean token AUROC, transcoder - SAE:", score, +1)]
    add(
        "5. transcoders are more interpretable than SAEs at similar reconstruction",
        "transcoder > SAE in score, at FVU no worse (companion paper)",
        parts,
        _l0_note(tc, ("transcoder", "SAE")),
        similar,
        scored=tc,
    )
    dissimilar = not tc.empty and {"fvu_a", "fvu_b"} <= set(tc.columns) and not ok.all()
    if dissimilar and rows[-1]["verdict"] == AGREES:
        rows[-1]["verdict"] = INCONCLUSIVE  # more interpretable, but not at similar reconstruction
        rows[-1]["measured"] += "; reconstruction not similar in every pair: inconclusive"
    return pd.DataFrame(rows)
