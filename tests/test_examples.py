"""Example windows, eligibility and the per-latent lexical score table (evaluation.md §3)."""

import math

import numpy as np
import pytest
import scipy.sparse as sp

from bae_core.data.text import hash_split
from bae_core.evaluation.examples import (
    EXPLAIN_TEST_SALT,
    cut_windows,
    default_min_examples,
    per_token_topk,
    score_latents,
    window_rows,
)
from bae_core.evaluation.lexical import LABEL


def packed_sequences(seed=0, sequences=120, seq_len=128, docs=40):
    """Zipf token ids in packed sequences; each sequence belongs to one of `docs` documents."""
    rng = np.random.default_rng(seed)
    tokens = np.minimum(rng.zipf(1.2, size=(sequences, seq_len)), 2000) + 10
    doc_ids = np.repeat(np.array([f"doc{i % docs}" for i in range(sequences)])[:, None], seq_len, axis=1)
    return tokens, doc_ids


def test_windows_line_up_with_the_token_rows_and_keep_documents_on_one_side():
    tokens, doc_ids = packed_sequences(sequences=6, seq_len=70, docs=6)
    rows = window_rows(6, 70, 32)
    assert rows[:3].tolist() == [0, 1, 2] and rows[32:34].tolist() == [32, 33] and rows[64] == 70  # 6 left out
    w = cut_windows(tokens, doc_ids, width=32)
    assert w.tokens.shape == (12, 32) and len(w) == 12
    np.testing.assert_array_equal(w.tokens.reshape(-1), tokens.reshape(-1)[rows])
    # The token before each position, within its sequence; -1 at a sequence's start.
    assert w.prev[0, 0] == -1 and w.prev[0, 1] == tokens[0, 0] and w.prev[1, 0] == tokens[0, 31]
    assert w.explain.any() and w.test.any() and not (w.explain & w.test).any()
    assert not set(w.doc_id[w.explain]) & set(w.doc_id[w.test])
    with pytest.raises(ValueError, match="width: windows of 32 tokens do not fit in sequences of 16"):
        cut_windows(tokens[:, :16], doc_ids[:, :16])
    with pytest.raises(ValueError, match="explain_fraction"):
        cut_windows(tokens, doc_ids, explain_fraction=1.0)


def test_sides_are_drawn_apart_from_the_caches_held_out_hash():
    # The cache holds out the documents whose hash (seed 0) falls below the held-out fraction. Reusing that hash
    # for the explain/test split put every one of them on the explain side but one.
    candidates = [f"book/{i}" for i in range(4000)]
    held_out = [d for d, h in zip(candidates, hash_split(candidates, 0.1, 0), strict=True) if h]
    assert len(held_out) > 300
    tokens = np.arange(len(held_out) * 64).reshape(len(held_out), 64) % 1000
    doc_ids = np.repeat(np.array(held_out)[:, None], 64, axis=1)
    w = cut_windows(tokens, doc_ids, width=32)
    explain_docs, test_docs = set(w.doc_id[w.explain]), set(w.doc_id[w.test])
    assert 0.4 < len(explain_docs) / len(held_out) < 0.6 and len(explain_docs) + len(test_docs) == len(held_out)
    # Another seed draws other sides.
    other = cut_windows(tokens, doc_ids, width=32, seed=1)
    assert set(other.doc_id[other.explain]) != explain_docs


def test_a_window_that_straddles_documents_of_both_sides_is_dropped():
    docs = [f"doc{i}" for i in range(40)]
    explain = dict(zip(docs, hash_split(docs, 0.5, f"{EXPLAIN_TEST_SALT}:0"), strict=True))
    a = next(d for d in docs if explain[d])
    b = next(d for d in docs if not explain[d])
    # One sequence: 40 tokens of `a` then 24 of `b`. Window 0 is all `a`; window 1 holds 8 of `a` and 24 of `b`.
    doc_ids = np.array([[a] * 40 + [b] * 24])
    w = cut_windows(np.arange(64)[None, :], doc_ids, width=32)
    assert w.explain.tolist() == [True, False] and w.test.tolist() == [False, False]
    # Two documents of the same side: the window keeps that side (a second sequence from `b` is the test side).
    same = next(d for d in docs if explain[d] and d != a)
    w = cut_windows(np.arange(128).reshape(2, 64), np.array([[a] * 40 + [same] * 24, [b] * 64]), width=32)
    assert w.explain.tolist() == [True, True, False, False] and w.test.tolist() == [False, False, True, True]


def test_per_token_topk_keeps_the_k_largest_values_of_each_token():
    values = np.array([[0.1, 3.0, -5.0, 2.0], [4.0, 0.0, 1.0, 0.5]])
    top = per_token_topk(values, 2).toarray()
    np.testing.assert_array_equal(top, [[0, 3.0, 0, 2.0], [4.0, 0, 1.0, 0]])
    with pytest.raises(ValueError, match=r"k: must be between 1 and the number of units \(4\)"):
        per_token_topk(values, 5)


def test_planted_random_rare_and_continuous_latents_score_as_they_should():
    tokens, doc_ids = packed_sequences()
    w = cut_windows(tokens, doc_ids)
    rng = np.random.default_rng(0)
    flat = w.tokens.reshape(-1)
    planted = (flat == 15).astype(np.float32)  # fires exactly on one token
    noise = (rng.random(flat.shape) < 0.02).astype(np.float32)  # fires at random
    rare = np.zeros_like(planted)
    rare[[5, 100]] = 1.0  # two windows only: below min_examples
    graded = planted * rng.uniform(0.1, 5.0, size=flat.shape).astype(np.float32)  # continuous, same trigger
    acts = sp.csc_matrix(np.stack([planted, noise, rare, graded], axis=1))
    rows = score_latents(w, acts, binary=True, min_examples=10, seed=0)
    planted_row, noise_row, rare_row, _ = rows
    assert [r["latent"] for r in rows] == [0, 1, 2, 3] and all(r["score_label"] == LABEL for r in rows)
    assert planted_row["firing_count"] == int(planted.sum())
    assert planted_row["firing_rate"] == pytest.approx(planted.mean())
    assert planted_row["eligible"] and planted_row["token_auroc"] == 1.0 and planted_row["window_auroc"] == 1.0
    assert planted_row["test_activating_windows"] == planted_row["test_nonactivating_windows"] == 50
    assert planted_row["explanation"].startswith("15 (p=")
    assert abs(planted_row["shuffled_token_auroc"] - 0.5) < 0.15
    assert noise_row["eligible"] and abs(noise_row["token_auroc"] - 0.5) < 0.15
    assert not rare_row["eligible"] and rare_row["activating_windows"] == 2 and math.isnan(rare_row["token_auroc"])

    # Continuous: test windows are drawn across the deciles of their maximum, and the trigger still explains it.
    (graded_row,) = score_latents(w, acts, binary=False, min_examples=10, seed=0, latents=np.array([3]))
    assert graded_row["latent"] == 3 and graded_row["token_auroc"] == 1.0

    with pytest.raises(ValueError, match=r"activations: 10 rows, but the windows hold"):
        score_latents(w, sp.csc_matrix(np.zeros((10, 2))), binary=True, min_examples=5)


def test_min_examples_scales_with_the_cache_as_delphi_does():
    assert default_min_examples(10_000_000) == 200 and default_min_examples(100_000_000) == 2000
    assert default_min_examples(32_768) == 5


def test_decile_scores_show_a_latent_that_is_lexical_only_at_high_activations():
    tokens, doc_ids = packed_sequences(sequences=240)
    w = cut_windows(tokens, doc_ids)
    rng = np.random.default_rng(1)
    flat = w.tokens.reshape(-1)
    trigger = (flat == 15).astype(np.float32) * rng.uniform(3.0, 5.0, size=flat.shape).astype(np.float32)
    # Weak firing at random on other tokens: the windows with only that are the latent's lowest deciles.
    weak = ((rng.random(flat.shape) < 0.01) & (flat != 15)).astype(np.float32) * 0.1
    acts = sp.csc_matrix((trigger + weak)[:, None])
    (row,) = score_latents(w, acts, binary=False, min_examples=10, test_windows=100, seed=0)
    deciles = row["decile_token_auroc"]
    assert len(deciles) == 10
    assert np.mean(deciles[-3:]) > 0.9  # high activations: the trigger token explains it
    assert np.mean(deciles[:3]) < 0.7  # low activations: random tokens the rules do not cover
    (binary_row,) = score_latents(
        w, sp.csc_matrix((trigger > 0).astype(np.float32)[:, None]), binary=True, min_examples=10
    )
    assert binary_row["decile_token_auroc"] is None  # one activation level: no deciles
