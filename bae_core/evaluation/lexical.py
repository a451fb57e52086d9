"""The offline interpretability score: a lexical explainer and simulator (evaluation.md §3a).

A latent's explanation is a short list of token rules, unigrams (token == a) and bigrams (previous token == a
and token == b), chosen greedily on the explain split to maximise the F1 of their union against the latent's
firing. The simulator scores a token by the best precision estimate of the rules it matches; the latent's
score is how well that predicts its firing on held-out test windows:

- token level (the fuzzing analogue, the headline number): AUROC of the token scores against firing, over the
  test activating windows and as many non-activating ones;
- window level (the detection analogue): AUROC of each window's maximum token score against whether the
  latent fires in it, and the balanced accuracy and F1 of "a rule matches somewhere in the window".

It needs no LLM, so it runs on a laptop CPU and in CI. Every output carries `LABEL`: it measures how far a
latent is explained by which tokens it sits on, and under-scores latents that track context; it is a proxy,
not the paper's LLM judge.

Windows are given as arrays of shape (windows, width): `tokens` (token ids), `prev` (the id of the token before
each position, -1 where there is none) and `fires` (bool, the latent is non-zero there).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

LABEL = "lexical explainability (token/bigram rules)"
MAX_RULES = 8
MIN_HITS = 3
"""A rule must match at least this many firing positions of the explain split to be chosen."""

_NO_TOKEN = -1


@dataclass(frozen=True)
class Rule:
    """token == `token`, and, for a bigram, previous token == `prev`. `precision` is (hits + 1) / (support + 2)
    on the explain split."""

    token: int
    prev: int | None
    support: int
    hits: int

    @property
    def precision(self) -> float:
        return (self.hits + 1) / (self.support + 2)

    def matches(self, tokens: np.ndarray, prev: np.ndarray) -> np.ndarray:
        hit = tokens == self.token
        return hit if self.prev is None else hit & (prev == self.prev)

    def render(self, decode=None) -> str:
        show = (lambda t: repr(decode([t]))) if decode is not None else str
        text = show(self.token) if self.prev is None else f"{show(self.prev)} {show(self.token)}"
        return f"{text} (p={self.precision:.2f}, {self.hits}/{self.support})"


def explain(tokens: np.ndarray, prev: np.ndarray, fires: np.ndarray, max_rules: int = MAX_RULES) -> list[Rule]:
    """Greedy rule list on the explain split: each step adds the candidate that most raises the F1 of the rules'
    union, among candidates with at least `MIN_HITS` hits; it stops when no candidate raises the F1."""
    tokens, prev, fires = (np.asarray(a).reshape(-1) for a in (tokens, prev, fires))
    fires = fires.astype(bool)
    positives = int(fires.sum())
    if positives == 0:
        return []
    unigram = tokens.astype(np.int64)
    # One int64 key per bigram; positions without a previous token get no bigram.
    has_prev = prev >= 0
    width = int(max(tokens.max(initial=0), prev.max(initial=0))) + 1
    bigram = np.where(has_prev, prev.astype(np.int64) * width + unigram, _NO_TOKEN)

    # Each candidate's whole-split support and hits, once; each step only recounts what is not yet covered.
    families = []
    for keys, is_bigram in ((unigram, False), (bigram, True)):
        valid = keys != _NO_TOKEN
        values, inverse = np.unique(keys[valid], return_inverse=True)
        hits = np.bincount(inverse, weights=fires[valid], minlength=len(values))
        families.append((keys, is_bigram, valid, values, inverse, hits, fires[valid]))

    rules: list[Rule] = []
    covered = np.zeros_like(fires)
    tp = fp = 0
    best_f1 = 0.0
    for _ in range(max_rules):
        best = None
        free = ~covered
        for keys, is_bigram, valid, values, inverse, hits, valid_fires in families:
            if len(values) == 0:
                continue
            free_valid = free[valid]
            gain_all = np.bincount(inverse, weights=free_valid, minlength=len(values))
            gain_hits = np.bincount(inverse, weights=free_valid & valid_fires, minlength=len(values))
            f1 = 2 * (tp + gain_hits) / (positives + tp + gain_hits + fp + gain_all - gain_hits)
            # A rule needs MIN_HITS hits on the whole explain split (its own support), not only where it adds.
            f1[hits < MIN_HITS] = -np.inf
            i = int(np.argmax(f1))
            if f1[i] > best_f1 + 1e-12 and (best is None or f1[i] > best[0] + 1e-12):
                key = int(values[i])
                match = keys == key
                support, n_hits = int(match.sum()), int(hits[i])
                rule = (
                    Rule(token=key % width, prev=key // width, support=support, hits=n_hits)
                    if is_bigram
                    else Rule(token=key, prev=None, support=support, hits=n_hits)
                )
                best = (float(f1[i]), rule, match)
        if best is None:
            break
        best_f1, rule, match = best
        rules.append(rule)
        tp += int((match & fires & ~covered).sum())
        fp += int((match & ~fires & ~covered).sum())
        covered |= match
    return rules


def simulate(rules: list[Rule], tokens: np.ndarray, prev: np.ndarray) -> np.ndarray:
    """Token scores s(t) = the best precision among the rules t matches (0 where none does)."""
    scores = np.zeros(np.shape(tokens), dtype=np.float64)
    for rule in rules:
        np.maximum(scores, np.where(rule.matches(tokens, prev), rule.precision, 0.0), out=scores)
    return scores


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (ties count one half): the Mann-Whitney U of the positives over n+ x n-. NaN when
    either class is empty. Counted per distinct score (rule scores take few values), which gives the U of average
    ranks exactly and avoids ranking every token."""
    scores, labels = np.asarray(scores).reshape(-1), np.asarray(labels, dtype=bool).reshape(-1)
    positives = int(labels.sum())
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    values, inverse = np.unique(scores, return_inverse=True)
    pos = np.bincount(inverse[labels], minlength=len(values))
    neg = np.bincount(inverse[~labels], minlength=len(values))
    below = np.cumsum(neg) - neg
    # Each positive beats the negatives with lower scores and ties half of those with the same score.
    u = float(pos @ below) + 0.5 * float(pos @ neg)
    return u / (positives * negatives)


@dataclass(frozen=True)
class LexicalScore:
    """One latent's lexical simulation score on its test windows; `explanation` is the rendered rule list."""

    token_auroc: float
    window_auroc: float
    window_balanced_accuracy: float
    window_f1: float
    rules: int
    explanation: str
    label: str = LABEL
    group_token_auroc: tuple[float, ...] = ()
    """Token AUROC of each group of activating test windows (e.g. activation deciles) against all the
    non-activating ones, when `score_latent` was given groups."""
    rule_list: tuple[Rule, ...] = field(default=(), repr=False)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "rule_list"}


def score_latent(
    explain_windows: tuple[np.ndarray, np.ndarray, np.ndarray],
    test_windows: tuple[np.ndarray, np.ndarray, np.ndarray],
    *,
    decode=None,
    groups: np.ndarray | None = None,
    num_groups: int = 0,
) -> LexicalScore:
    """Explain on `explain_windows`, score on `test_windows` (each `(tokens, prev, fires)`, windows x width).

    A test window is activating when the latent fires anywhere in it. `decode` (token ids -> text) only
    renders the explanation. Always answering "fires" scores window F1 = 2/3 on a balanced test set.
    `groups` (one int per test window, 0..num_groups-1 for activating windows, -1 for the others) adds the
    token AUROC of each group's activating windows against every non-activating window.
    """
    rules = explain(*explain_windows)
    tokens, prev, fires = (np.asarray(a) for a in test_windows)
    fires = fires.astype(bool)
    scores = simulate(rules, tokens, prev)
    window_fires = fires.any(axis=1)
    window_scores = scores.max(axis=1)
    predicted = window_scores > 0
    tp = int((predicted & window_fires).sum())
    fp = int((predicted & ~window_fires).sum())
    fn = int((~predicted & window_fires).sum())
    tn = int((~predicted & ~window_fires).sum())
    group_auroc = ()
    if groups is not None:
        groups = np.asarray(groups)
        off = ~window_fires
        group_auroc = tuple(
            auroc(scores[(groups == g) | off], fires[(groups == g) | off]) if (groups == g).any() else float("nan")
            for g in range(num_groups)
        )
    recall = tp / (tp + fn) if tp + fn else float("nan")
    specificity = tn / (tn + fp) if tn + fp else float("nan")
    return LexicalScore(
        token_auroc=auroc(scores, fires),
        window_auroc=auroc(window_scores, window_fires),
        window_balanced_accuracy=(recall + specificity) / 2,
        window_f1=2 * tp / (2 * tp + fp + fn) if tp else 0.0,
        rules=len(rules),
        explanation="; ".join(rule.render(decode) for rule in rules) or "(no rule)",
        group_token_auroc=group_auroc,
        rule_list=tuple(rules),
    )


def shuffled_windows(
    windows: tuple[np.ndarray, np.ndarray, np.ndarray], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The shuffled control: the same tokens, each window's firing pattern moved to a random other window."""
    tokens, prev, fires = windows
    return tokens, prev, np.asarray(fires)[rng.permutation(len(fires))]
