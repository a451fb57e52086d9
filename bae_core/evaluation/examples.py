"""Activation examples and the per-latent lexical score table (evaluation.md §3, §3a).

Held-out token sequences are cut into non-overlapping windows of `WINDOW` tokens. A window is *activating* for a
latent when the latent fires on one of its tokens. Documents take a side (explain or test) by a hash salted apart
from the cache's own train/held-out hash (`EXPLAIN_TEST_SALT`): every held-out document had a cache hash below the
held-out fraction, so reusing that hash would put them all on one side. A window takes the side of its documents;
a window that straddles documents of both sides is dropped, so explanation and test examples never share a
document. A latent is *eligible* when it has at least `min_examples` activating windows and both sides have
activating and non-activating windows.

For each eligible latent the explainer sees its activating explain windows plus as many random non-activating
ones; the test set is up to `test_windows` activating test windows (for continuous latents drawn evenly across
ten deciles of the window's maximum activation; for binary latents every window's maximum is 1, so drawn
uniformly) plus as many random non-activating test windows. The shuffled control runs the same on the same
windows with each window's firing moved to a random other window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from bae_core.data.text import hash_split
from bae_core.evaluation.lexical import LABEL, score_latent, shuffled_windows

WINDOW = 32
"""Tokens per example window."""
EXPLAIN_TEST_SALT = "explain/test"
"""Salt of the explain/test document hash, so that it is drawn independently of the cache's held-out hash."""
SCORING_VERSION = 2
"""Version of the example windows and the lexical score; a score file of another version is recomputed.
1: explain/test sides by the cache's own hash (every held-out document on the explain side but one).
2: sides by a separately salted hash, straddling windows dropped, test window counts per latent."""
DECILES = 10


@dataclass(frozen=True)
class Windows:
    """Example windows: `tokens` and `prev` (the token before each position in its sequence, -1 at a
    sequence's start) are (windows, width); `doc_id` is the document of each window's first token; `explain` and
    `test` its side (both False for a window that straddles documents of both sides: it is used by neither)."""

    tokens: np.ndarray
    prev: np.ndarray
    doc_id: np.ndarray
    explain: np.ndarray
    test: np.ndarray

    @property
    def width(self) -> int:
        return self.tokens.shape[1]

    def __len__(self) -> int:
        return len(self.tokens)


def window_rows(num_sequences: int, seq_len: int, width: int = WINDOW) -> np.ndarray:
    """Indices into the flattened (sequence, position) token rows of every window's tokens, window by window:
    the rows whose activations line up with `cut_windows`' windows (a sequence's last seq_len % width tokens
    are left out)."""
    if seq_len < width:
        raise ValueError(f"width: windows of {width} tokens do not fit in sequences of {seq_len}")
    per_seq = seq_len // width
    starts = (np.arange(num_sequences)[:, None] * seq_len + np.arange(per_seq)[None, :] * width).reshape(-1)
    return (starts[:, None] + np.arange(width)[None, :]).reshape(-1)


def cut_windows(
    token_ids: np.ndarray, doc_ids: np.ndarray, *, width: int = WINDOW, explain_fraction: float = 0.5, seed: int = 0
) -> Windows:
    """Windows of `width` tokens from (sequences, seq_len) token and document ids; sides by a hash of the
    document id salted with `EXPLAIN_TEST_SALT` and `seed` (`explain_fraction` of the documents explain, the rest
    test); a window whose tokens come from documents of both sides is on neither."""
    token_ids, doc_ids = np.asarray(token_ids), np.asarray(doc_ids)
    if token_ids.ndim != 2 or token_ids.shape != doc_ids.shape:
        raise ValueError(
            f"token_ids, doc_ids: need two (sequences, seq_len) arrays of one shape, got {token_ids.shape} "
            f"and {doc_ids.shape}"
        )
    if not 0 < explain_fraction < 1:
        raise ValueError(f"explain_fraction: must be between 0 and 1 (exclusive), got {explain_fraction}")
    n, seq_len = token_ids.shape
    prev = np.concatenate([np.full((n, 1), -1, dtype=np.int64), token_ids[:, :-1].astype(np.int64)], axis=1)
    rows = window_rows(n, seq_len, width)
    tokens = token_ids.reshape(-1)[rows].reshape(-1, width).astype(np.int64)
    prev = prev.reshape(-1)[rows].reshape(-1, width)
    window_docs = doc_ids.reshape(-1)[rows].reshape(-1, width).astype(str)
    docs, inverse = np.unique(window_docs, return_inverse=True)
    token_explain = hash_split(list(docs), explain_fraction, f"{EXPLAIN_TEST_SALT}:{seed}")[inverse]
    token_explain = token_explain.reshape(-1, width)
    explain, test = token_explain.all(axis=1), (~token_explain).all(axis=1)
    return Windows(tokens=tokens, prev=prev, doc_id=window_docs[:, 0], explain=explain, test=test)


def default_min_examples(tokens: int) -> int:
    """delphi's 200 activating examples over 10M tokens, scaled to the cache, and never fewer than 5."""
    return max(5, round(200 * tokens / 10_000_000))


def per_token_topk(values: np.ndarray, k: int) -> sp.csc_matrix:
    """A dense (tokens, units) matrix made sparse by keeping each token's k largest values (the baseline
    dictionary of §3a: a model's own MLP neurons at the coders' k)."""
    values = np.asarray(values, dtype=np.float32)
    n, m = values.shape
    if not 0 < k <= m:
        raise ValueError(f"k: must be between 1 and the number of units ({m}), got {k}")
    top = np.argpartition(-values, k - 1, axis=1)[:, :k]
    rows = np.repeat(np.arange(n), k)
    kept = values[rows, top.reshape(-1)]
    return sp.csc_matrix((kept, (rows, top.reshape(-1))), shape=(n, m))


def score_latents(
    windows: Windows,
    activations: sp.spmatrix,
    *,
    binary: bool,
    min_examples: int,
    test_windows: int = 50,
    seed: int = 0,
    decode=None,
    latents: np.ndarray | None = None,
) -> list[dict]:
    """One row per latent: firing count and rate, activating windows, eligibility, explanation and the lexical
    scores with the shuffled control (NaN for ineligible latents).

    `activations` is (windows x width, latents), row-aligned with `windows` (see `window_rows`); a latent fires
    where its value is non-zero. `latents` restricts the rows to those latent indices.
    """
    rows = []
    for latent, _values, fires, sets, rng in example_sets(
        windows,
        activations,
        binary=binary,
        min_examples=min_examples,
        test_windows=test_windows,
        seed=seed,
        latents=latents,
    ):
        active = fires.any(axis=1)
        row = {
            "latent": int(latent),
            "firing_count": int(fires.sum()),
            "firing_rate": float(fires.mean()),
            "activating_windows": int(active.sum()),
        }
        row["eligible"] = sets is not None
        if sets is None:
            row.update(_NOT_SCORED)
        else:
            explain_idx, test_idx, deciles = sets
            explain = (windows.tokens[explain_idx], windows.prev[explain_idx], fires[explain_idx])
            test = (windows.tokens[test_idx], windows.prev[test_idx], fires[test_idx])
            score = score_latent(
                explain, test, decode=decode, groups=deciles, num_groups=DECILES if deciles is not None else 0
            )
            control = score_latent(shuffled_windows(explain, rng), shuffled_windows(test, rng))
            row.update(
                explanation=score.explanation,
                rules=score.rules,
                token_auroc=score.token_auroc,
                window_auroc=score.window_auroc,
                window_balanced_accuracy=score.window_balanced_accuracy,
                window_f1=score.window_f1,
                shuffled_token_auroc=control.token_auroc,
                shuffled_window_auroc=control.window_auroc,
                explain_activating_windows=int(len(explain_idx) // 2),
                test_activating_windows=int(len(test_idx) // 2),
                test_nonactivating_windows=int(len(test_idx) - len(test_idx) // 2),
                decile_token_auroc=list(score.group_token_auroc) if deciles is not None else None,
            )
        row["score_label"] = LABEL
        rows.append(row)
    return rows


def example_sets(
    windows: Windows,
    activations: sp.spmatrix,
    *,
    binary: bool,
    min_examples: int,
    test_windows: int = 50,
    seed: int = 0,
    latents: np.ndarray | None = None,
):
    """For each latent: (latent, values, fires, sets, rng) with `values` and `fires` (windows x width) and
    `sets` = (explain window indices, test window indices, decile of each test window or None), or None when the
    latent is not eligible. Each latent draws from its own generator, seeded by (seed, latent), so its examples do
    not depend on which other latents are scored; `rng` is that generator, for further draws."""
    acts = sp.csc_matrix(activations)
    n_windows, width = windows.tokens.shape
    if acts.shape[0] != n_windows * width:
        raise ValueError(
            f"activations: {acts.shape[0]} rows, but the windows hold {n_windows} x {width} = "
            f"{n_windows * width} tokens"
        )
    if min_examples < 1 or test_windows < 1:
        raise ValueError(f"min_examples, test_windows: must be >= 1, got {min_examples} and {test_windows}")
    for latent in range(acts.shape[1]) if latents is None else latents:
        column = acts[:, int(latent)]
        values = np.zeros(n_windows * width, dtype=np.float32)
        values[column.indices] = column.data
        values = values.reshape(n_windows, width)
        fires = values != 0
        rng = np.random.default_rng([seed, int(latent)])
        sets = _example_sets(windows, values, fires.any(axis=1), binary, min_examples, test_windows, rng)
        yield int(latent), values, fires, sets, rng


_NOT_SCORED = {
    "explanation": None,
    "rules": 0,
    "token_auroc": math.nan,
    "window_auroc": math.nan,
    "window_balanced_accuracy": math.nan,
    "window_f1": math.nan,
    "shuffled_token_auroc": math.nan,
    "shuffled_window_auroc": math.nan,
    "explain_activating_windows": 0,
    "test_activating_windows": 0,
    "test_nonactivating_windows": 0,
    "decile_token_auroc": None,
}


def _example_sets(windows, values, active, binary, min_examples, test_windows, rng):
    """(explain window indices, test window indices, decile of each test window or None) for one latent, or None
    when it is not eligible. Deciles (0 = lowest window-max activation, -1 for non-activating windows) exist for
    continuous latents with at least `DECILES` activating test windows."""
    explain, test = windows.explain, windows.test
    explain_on, explain_off = np.flatnonzero(active & explain), np.flatnonzero(~active & explain)
    test_on, test_off = np.flatnonzero(active & test), np.flatnonzero(~active & test)
    if active.sum() < min_examples or min(len(explain_on), len(explain_off), len(test_on), len(test_off)) == 0:
        return None
    n_explain = min(len(explain_on), len(explain_off))
    explain_idx = np.concatenate(
        [rng.choice(explain_on, n_explain, replace=False), rng.choice(explain_off, n_explain, replace=False)]
    )
    n_test = min(test_windows, len(test_on), len(test_off))
    if binary or n_test < DECILES:
        on = rng.choice(test_on, n_test, replace=False)
        deciles = None
    else:
        # Evenly across deciles of the window's maximum activation, low to high.
        ranked = test_on[np.argsort(np.abs(values[test_on]).max(axis=1), kind="stable")]
        buckets = np.array_split(ranked, DECILES)
        share = np.array_split(np.arange(n_test), DECILES)
        on = np.concatenate([rng.choice(b, len(s), replace=False) for b, s in zip(buckets, share, strict=True)])
        deciles = np.concatenate([np.full(len(s), d) for d, s in enumerate(share)] + [np.full(len(on), -1)])
    test_idx = np.concatenate([on, rng.choice(test_off, len(on), replace=False)])
    return explain_idx, test_idx, deciles
