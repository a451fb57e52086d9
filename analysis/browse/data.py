"""What the feature browser shows, computed from a scored run and its cache (no Ray).

    the cache's held-out split (token ids, document ids, activations)          -> `Corpus`: windows, documents
    a dictionary (trained coder, MLP-neuron baseline or control) on that split -> its codes (`codes`)
    the codes, cut into the scorer's windows with the scorer's settings       -> per latent (`latent_examples`):
        top-activating windows, the activating and non-activating test windows the lexical judge was scored on
        (for continuous latents drawn by decile of the window's peak), an activation histogram
    the codes on a few held-out documents                                      -> per token, the latents that fire

The windows are drawn by `bae_core.evaluation.examples.example_sets`, the scorer's own code, with the settings
and seed recorded in latents.parquet, so a latent's test windows here are the ones its scores rest on (the
counts are checked against latents.parquet's).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from bae_core.evaluation.examples import WINDOW, Windows, cut_windows, example_sets, window_rows


@dataclass(frozen=True)
class Corpus:
    """The held-out split of one (cache, hookpoint) as the scorer cut it."""

    cache: str
    hookpoint: str
    tokens: np.ndarray
    """Token ids, (sequences, seq_len), in the split's stored order."""
    windows: Windows
    rows: np.ndarray
    """Flat token row of each window position (`window_rows`): codes[rows] line up with the windows."""
    documents: list[tuple[str, np.ndarray]]
    """The documents of the side-by-side page: (document id, flat token rows), test-side documents only."""


def open_corpus(cache: str, hookpoint: str, *, seed: int, documents: int, document_tokens: int) -> Corpus:
    """The split's tokens and windows (sides drawn with the scorer's `seed`), and the first `document_tokens`
    tokens of each of the first `documents` test-side documents (in stored order) with at least one whole window."""
    from bae_core.data.cache import open_cache
    from bae_core.evaluation.interp import split_tokens

    manifest = open_cache(cache)
    tokens, docs = split_tokens(cache, hookpoint, "heldout", manifest)
    windows = cut_windows(tokens, docs, width=WINDOW, seed=seed)
    test_docs = set(windows.doc_id[windows.test].tolist())
    flat_docs = docs.reshape(-1).astype(str)
    chosen, seen = [], set()
    for doc in flat_docs:
        if doc in seen or doc not in test_docs:
            continue
        seen.add(doc)
        rows = np.flatnonzero(flat_docs == doc)[:document_tokens]
        if len(rows) >= WINDOW:
            chosen.append((doc, rows))
        if len(chosen) == documents:
            break
    return Corpus(cache, hookpoint, tokens, windows, window_rows(*tokens.shape, WINDOW), chosen)


def load_coder(checkpoint: str):
    """A trained coder from its checkpoint folder, local or at a URI."""
    from bae_core.coders.coder import SparseCoder
    from bae_core.data.paths import local_folder

    with local_folder(checkpoint, names=("cfg.json", "sae.safetensors")) as folder:
        return SparseCoder.load(folder)


def codes(dictionary: dict, corpus: Corpus, loaded, seed: int) -> tuple[sp.csr_matrix, bool]:
    """(codes on every held-out token, tokens x latents; whether the dictionary is binary) of a trained coder
    (`checkpoint`), the MLP neurons at top-k (`activation` mlp_neurons, with the language model `loaded`) or a
    control dictionary (drawn with the scoring `seed`), computed as `bae score` computes them."""
    from bae_core.data.cache import open_cache
    from bae_core.evaluation.interp import CONTROLS, coder_activations, control_activations, neuron_activations

    activation = dictionary["activation"]
    if activation in CONTROLS:
        return control_activations(corpus.tokens, activation, seed=seed), True
    manifest = open_cache(corpus.cache)
    if dictionary.get("checkpoint"):
        coder = load_coder(dictionary["checkpoint"])
        return coder_activations(coder, corpus.cache, corpus.hookpoint, "heldout", manifest), coder.cfg.is_binary
    if activation == "mlp_neurons":
        acts = neuron_activations(loaded, corpus.cache, corpus.hookpoint, dictionary["k"], "heldout", manifest)
        return acts, False
    raise ValueError(f"coder {dictionary['coder_id']}: no checkpoint, and {activation!r} is not a known dictionary")


def _short(values: np.ndarray) -> list[float]:
    """Activations with 4 significant digits (what a page shows), as plain floats for JSON."""
    return [float(f"{v:.4g}") for v in values.tolist()]


def _window(w: int, values: np.ndarray, fires: np.ndarray, binary: bool) -> list:
    """[window, firing positions] (binary) or [window, firing positions, their activations]."""
    pos = np.flatnonzero(fires[w])
    return [int(w), pos.tolist()] if binary else [int(w), pos.tolist(), _short(values[w, pos])]


def latent_examples(
    windows: Windows,
    acts: sp.csc_matrix,
    *,
    binary: bool,
    min_examples: int,
    test_windows: int,
    seed: int,
    latents: np.ndarray,
    top: int,
    nonactivating: int,
    bins: int = 20,
):
    """For each of `latents` that fires on the split: (latent, record) with the record a dict of

    - `max`: its largest |activation|; `hist` (continuous only): counts of its non-zero activations in `bins`
      equal bins from `lo` to `hi`;
    - `top`: the `top` windows of largest peak |activation| (then most firing tokens: for binary latents, whose
      peak is always 1, the windows where it fires most), from either side;
    - `test`: the activating test windows the lexical judge scored, each with its decile of the window's peak
      (-1 where the scorer drew without deciles: binary latents, or fewer than ten windows), and `off`: the first
      `nonactivating` of its non-activating test windows (`off_total` of them were scored); both absent for a
      latent that is not eligible;
    - `test_activating`, `test_nonactivating`: how many test windows the draw gave (latents.parquet's counts).

    Each window is [window, firing positions] for binary latents, [window, positions, activations] otherwise.
    `acts` is (windows x width, latents), row-aligned with `windows`, as the scorer reads it."""
    for latent, values, fires, sets, _rng in example_sets(
        windows, acts, binary=binary, min_examples=min_examples, test_windows=test_windows, seed=seed, latents=latents
    ):
        active = fires.any(axis=1)
        if not active.any():
            continue
        peak = np.abs(values).max(axis=1)
        count = fires.sum(axis=1)
        on = np.flatnonzero(active)
        ranked = on[np.lexsort((on, -count[on], -peak[on]))][:top]  # the last key sorts first
        record: dict = {"max": float(f"{peak.max():.4g}"), "top": [_window(w, values, fires, binary) for w in ranked]}
        if not binary:
            fired = values[fires]
            lo, hi = float(fired.min()), float(fired.max())
            counts, _ = np.histogram(fired, bins=bins, range=(lo, hi if hi > lo else lo + 1))
            record["hist"] = {"lo": float(f"{lo:.4g}"), "hi": float(f"{hi:.4g}"), "counts": counts.tolist()}
        if sets is not None:
            _, test_idx, deciles = sets
            half = len(test_idx) // 2  # the activating windows come first, then as many non-activating
            decile = deciles[:half] if deciles is not None else np.full(half, -1)
            shown = [_window(w, values, fires, binary) for w in test_idx[:half]]
            record["test"] = [[w, int(d), *rest] for (w, *rest), d in zip(shown, decile, strict=True)]
            record["off"] = [int(w) for w in test_idx[half:][:nonactivating]]
            record["test_activating"], record["test_nonactivating"] = half, len(test_idx) - half
        yield int(latent), record


def document_firing(acts: sp.csr_matrix, documents: list[tuple[str, np.ndarray]], binary: bool) -> list[list]:
    """Per document, per token: the latents that fire there, largest |activation| first ([latents] for a binary
    dictionary, [latents, activations] otherwise)."""
    out = []
    for _, rows in documents:
        block = acts[rows]
        tokens = []
        for i in range(block.shape[0]):
            start, stop = block.indptr[i], block.indptr[i + 1]
            latents, values = block.indices[start:stop], block.data[start:stop]
            keep = values != 0
            latents, values = latents[keep], values[keep]
            order = np.lexsort((latents, -np.abs(values)))
            tokens.append(latents[order].tolist() if binary else [latents[order].tolist(), _short(values[order])])
        out.append(tokens)
    return out
