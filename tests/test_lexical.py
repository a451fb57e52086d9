"""The lexical simulation score (evaluation.md §3a): exact rule maths on tiny windows, and planted latents."""

import numpy as np
import pytest
from scipy.stats import mannwhitneyu

from bae_core.evaluation.lexical import LABEL, Rule, auroc, explain, score_latent, shuffled_windows, simulate


def windows_from(stream: np.ndarray, width: int = 32):
    """Cut a token stream into windows with each position's previous token (-1 at the very start)."""
    n = len(stream) // width * width
    tokens = stream[:n].reshape(-1, width)
    prev = np.concatenate([[-1], stream[: n - 1]]).reshape(-1, width)
    return tokens, prev


def test_auroc_is_the_probability_a_positive_outscores_a_negative():
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert auroc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == 0.5  # ties count one half
    assert auroc([1, 2, 3], [0, 0, 1]) == 1.0 and auroc([3, 2, 1], [0, 0, 1]) == 0.0
    assert np.isnan(auroc([1, 2], [1, 1]))
    # Many ties, as rule scores have: the same as scipy's Mann-Whitney U.
    rng = np.random.default_rng(0)
    scores, labels = rng.choice([0, 0.2, 0.5, 0.9], size=500), rng.random(500) < 0.3
    u = mannwhitneyu(scores[labels], scores[~labels], alternative="two-sided", method="asymptotic").statistic
    assert auroc(scores, labels) == pytest.approx(u / (labels.sum() * (~labels).sum()), rel=1e-12)


def test_a_unigram_rule_has_laplace_precision_and_its_counts():
    tokens = np.array([[7, 1, 7, 2, 7, 7, 3, 4]])
    prev = np.array([[-1, 7, 1, 7, 2, 7, 7, 3]])
    fires = tokens == 7
    fires[0, 5] = False  # token 7 fires on 3 of its 4 positions
    (rule,) = explain(tokens, prev, fires)
    assert rule == Rule(token=7, prev=None, support=4, hits=3)
    assert rule.precision == pytest.approx((3 + 1) / (4 + 2))
    np.testing.assert_allclose(simulate([rule], tokens, prev), np.where(tokens == 7, 4 / 6, 0.0))


def test_a_bigram_rule_is_chosen_when_the_previous_token_decides():
    rng = np.random.default_rng(0)
    stream = rng.integers(10, 60, size=4096)
    stream[rng.choice(4000, 120, replace=False)] = 5  # token 5 everywhere ...
    at = rng.choice(np.arange(1, 4000, 2), 80, replace=False)
    stream[at - 1], stream[at] = 3, 5  # ... but the latent fires on 5 only after 3
    tokens, prev = windows_from(stream)
    fires = (tokens == 5) & (prev == 3)
    rules = explain(tokens, prev, fires)
    assert rules[0].token == 5 and rules[0].prev == 3 and rules[0].hits == rules[0].support == fires.sum()
    assert len(rules) == 1  # nothing else raises the F1 of a perfect rule


def test_the_union_takes_one_rule_per_trigger_and_skips_rare_ones():
    rng = np.random.default_rng(1)
    stream = rng.integers(10, 200, size=8192)
    tokens, prev = windows_from(stream)
    fires = np.isin(tokens, [11, 12])
    rare = np.argwhere(tokens == 13)[:2]  # a trigger with only two hits: below the three a rule needs
    fires[tuple(rare.T)] = True
    rules = explain(tokens, prev, fires)
    assert sorted(r.token for r in rules) == [11, 12] and all(r.prev is None for r in rules)
    assert explain(tokens, prev, np.zeros_like(fires)) == []
    assert len(explain(tokens, prev, rng.random(tokens.shape) < 0.5, max_rules=3)) <= 3


def zipf_windows(seed: int, windows: int = 400, width: int = 32, vocab: int = 2000):
    """Text-like token windows: Zipf-distributed token ids."""
    rng = np.random.default_rng(seed)
    stream = np.minimum(rng.zipf(1.2, size=windows * width), vocab) + 10
    return windows_from(stream, width)


def balanced_test(tokens, prev, fires, rng, per_side: int = 50):
    """50 activating and 50 non-activating test windows, as §3a asks."""
    active = np.flatnonzero(fires.any(axis=1))
    quiet = np.flatnonzero(~fires.any(axis=1))
    pick = np.concatenate([rng.choice(active, per_side, replace=False), rng.choice(quiet, per_side, replace=False)])
    return tokens[pick], prev[pick], fires[pick]


def test_a_latent_planted_on_one_token_scores_one_and_its_shuffled_control_one_half():
    rng = np.random.default_rng(0)
    tokens, prev = zipf_windows(0)
    trigger = 15  # the fifth most common token: about half the windows contain it
    fires = tokens == trigger
    assert 0.2 < fires.any(axis=1).mean() < 0.8
    half = len(tokens) // 2  # explain on the first documents, test on the others
    explain_split = (tokens[:half], prev[:half], fires[:half])
    test_split = balanced_test(tokens[half:], prev[half:], fires[half:], rng)

    score = score_latent(explain_split, test_split, decode=lambda ids: f"<{ids[0]}>")
    assert score.token_auroc == 1.0 and score.window_auroc == 1.0
    assert score.window_balanced_accuracy == 1.0 and score.window_f1 == 1.0
    assert score.rules == 1 and score.explanation.startswith("'<15>' (p=") and score.label == LABEL

    controls = [score_latent(shuffled_windows(explain_split, rng), shuffled_windows(test_split, rng)) for _ in range(5)]
    assert np.mean([c.token_auroc for c in controls]) == pytest.approx(0.5, abs=0.08)
    assert np.mean([c.window_auroc for c in controls]) == pytest.approx(0.5, abs=0.1)


def test_a_latent_that_fires_at_random_scores_one_half():
    rng = np.random.default_rng(2)
    tokens, prev = zipf_windows(3)
    fires = rng.random(tokens.shape) < 0.03
    half = len(tokens) // 2
    scores = [
        score_latent(
            (tokens[:half], prev[:half], fires[:half]), balanced_test(tokens[half:], prev[half:], fires[half:], rng)
        )
        for _ in range(3)
    ]
    assert np.mean([s.token_auroc for s in scores]) == pytest.approx(0.5, abs=0.08)
    assert np.mean([s.window_auroc for s in scores]) == pytest.approx(0.5, abs=0.1)
