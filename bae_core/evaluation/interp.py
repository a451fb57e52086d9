"""Lexical interpretability of a trained coder, and of the model's own MLP neurons as a baseline, on a cache.

    cache split (token ids, document ids, activations, in stored order)
      -> the coder's codes for every token (a sparse tokens x latents matrix)
      -> 32-token windows split by document into explain and test (`bae_core.evaluation.examples`)
      -> one row per latent: firing count and rate, eligibility, explanation, lexical scores, shuffled control

The baseline dictionary is the MLP's own neurons at the hookpoint, made sparse by keeping each token's k largest
(evaluation.md §3a), scored the same way. Two reference dictionaries with known answers calibrate every run
(evaluation.md §3c): a positive control whose latents fire exactly on single frequent tokens (a lexical judge must
score them near 1) and a negative control whose latents fire as often, at random positions (near 0.5).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from bae_core.coders.coder import SparseCoder
from bae_core.data.cache import CacheManifest, open_cache, read_shard, unpack_activations
from bae_core.data.reader import iter_activation_batches
from bae_core.evaluation.examples import (
    WINDOW,
    cut_windows,
    default_min_examples,
    per_token_topk,
    score_latents,
    window_rows,
)


def split_tokens(root: str, hookpoint: str, split: str, manifest: CacheManifest) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, document ids) of a cache split, each (sequences, seq_len), in the order activations are stored."""
    tokens, docs = [], []
    for record in manifest.shards_of(split, hookpoint):
        table = read_shard(root, record, ["token_id", "doc_id"])
        tokens.append(table.column("token_id").to_numpy())
        docs.append(table.column("doc_id").to_numpy(zero_copy_only=False))
    seq_len = manifest.seq_len
    return np.concatenate(tokens).reshape(-1, seq_len), np.concatenate(docs).reshape(-1, seq_len)


@torch.no_grad()
def coder_activations(
    coder: SparseCoder, root: str, hookpoint: str, split: str, manifest: CacheManifest, batch_size: int = 4096
) -> sp.csr_matrix:
    """The coder's latent values on every token of the split (tokens x latents), in stored order."""
    coder.eval()
    parts = []
    for batch in iter_activation_batches(
        root,
        hookpoint,
        split=split,
        batch_size=batch_size,
        transcoder=coder.cfg.is_transcoder,
        shuffle_seed=None,
        manifest=manifest,
    ):
        x = batch[0] if isinstance(batch, tuple) else batch
        code = coder.encode(x.to(coder.device, coder.dtype))
        if code.indices is None:
            parts.append(sp.csr_matrix(code.values.float().cpu().numpy()))
            continue
        # k entries per row: the CSR arrays directly, without a dense (tokens x latents) detour.
        values, indices = code.values.float().cpu().numpy(), code.indices.cpu().numpy()
        n, k = values.shape
        part = sp.csr_matrix(
            (values.reshape(-1), indices.reshape(-1), np.arange(0, n * k + 1, k)), shape=(n, coder.num_latents)
        )
        part.eliminate_zeros()
        part.sort_indices()
        parts.append(part)
    return sp.vstack(parts, format="csr")


@dataclass(frozen=True)
class ExampleOptions:
    """Which tokens are examples and how latents are scored (see `bae_core.evaluation.examples.score_latents`)."""

    split: str = "heldout"
    """Cache split to read; the held-out split is document-disjoint from the coders' training."""
    min_examples: int | None = None
    """Activating windows a latent needs to be scored (None: `default_min_examples` of the split's tokens)."""
    test_windows: int = 50
    """At most this many activating test windows per latent, and as many non-activating ones."""
    explain_fraction: float = 0.5
    """Fraction of the split's documents whose windows explain; the others test."""
    seed: int = 0


def coder_latent_scores(
    coder: SparseCoder,
    root: str,
    hookpoint: str,
    options: ExampleOptions = ExampleOptions(),
    *,
    decode=None,
    latents: np.ndarray | None = None,
) -> list[dict]:
    """One row per latent of `coder` (or of `latents`; see `bae_core.evaluation.examples.score_latents`), on the cache's
    `options.split`."""
    manifest = open_cache(root)
    tokens, docs = split_tokens(root, hookpoint, options.split, manifest)
    acts = coder_activations(coder, root, hookpoint, options.split, manifest)
    return _score(acts, tokens, docs, coder.cfg.is_binary, options, decode, latents=latents)


def neuron_baseline_scores(
    loaded,
    root: str,
    hookpoint: str,
    k: int,
    options: ExampleOptions = ExampleOptions(),
    *,
    decode=None,
    latents: np.ndarray | None = None,
) -> list[dict]:
    """The same rows for the MLP's own neurons at `hookpoint`, each token keeping its `k` largest."""
    manifest = open_cache(root)
    tokens, docs = split_tokens(root, hookpoint, options.split, manifest)
    acts = neuron_activations(loaded, root, hookpoint, k, options.split, manifest)
    return _score(acts, tokens, docs, False, options, decode, latents=latents)


def neuron_activations(loaded, root: str, hookpoint: str, k: int, split: str, manifest: CacheManifest) -> sp.csr_matrix:
    """The MLP's own neurons at `hookpoint` on every token of the split, each token keeping its `k` largest."""
    from bae_core.data.hooks import mlp_neurons
    from bae_core.data.lm import resolve_hookpoints

    (hook,) = resolve_hookpoints(loaded, [hookpoint])
    width = manifest.hookpoints[hookpoint].columns.get("input")
    if width is None:
        raise ValueError(f"hookpoint {hookpoint!r}: the neuron baseline needs the MLP's input in the cache")
    parts = []
    for record in manifest.shards_of(split, hookpoint):
        x = unpack_activations(read_shard(root, record, ["input"]).column("input"), manifest.dtype, width)
        parts.append(per_token_topk(mlp_neurons(loaded, hook, torch.from_numpy(x)).numpy(), k).tocsr())
    return sp.vstack(parts, format="csr")


CONTROLS = ("token_control", "random_control")
"""The reference dictionaries: latents that fire on one frequent token each, and latents with the same firing
counts at random positions."""
CONTROL_LATENTS = 32
"""Latents of each reference dictionary."""
CONTROL_MAX_WINDOW_SHARE = 0.5
"""A control token occurs in at most this share of windows, so that it has non-activating windows to test on."""


def control_activations(token_ids: np.ndarray, control: str, *, latents: int = CONTROL_LATENTS, seed: int = 0):
    """A reference dictionary's 0/1 codes on tokens (sequences, seq_len), as a (tokens x latents) CSR matrix in
    the split's stored order. `token_control`: latent j fires exactly where the token is the j-th most frequent
    token of the split among those found in at most `CONTROL_MAX_WINDOW_SHARE` of the windows; `random_control`:
    latent j fires as often as `token_control`'s latent j, on positions drawn at random (seeded)."""
    if control not in CONTROLS:
        raise ValueError(f"control: choose one of {', '.join(CONTROLS)}, got {control!r}")
    flat = np.asarray(token_ids).reshape(-1)
    n = len(flat)
    windows = np.asarray(token_ids)[:, : token_ids.shape[1] // WINDOW * WINDOW].reshape(-1, WINDOW)
    ids, counts = np.unique(flat, return_counts=True)
    per_window = np.zeros(len(ids))
    for row in windows:
        per_window[np.searchsorted(ids, np.unique(row))] += 1
    usable = per_window <= CONTROL_MAX_WINDOW_SHARE * len(windows)
    order = np.argsort(-counts[usable], kind="stable")[:latents]
    chosen = ids[usable][order]
    if len(chosen) == 0:
        raise ValueError("control: the split has no token to build a control dictionary from")
    columns = []
    rng = np.random.default_rng([seed, 7])
    for token in chosen:
        rows = np.flatnonzero(flat == token)
        if control == "random_control":
            rows = np.sort(rng.choice(n, len(rows), replace=False))
        columns.append(rows)
    row_index = np.concatenate(columns)
    col_index = np.concatenate([np.full(len(r), j) for j, r in enumerate(columns)])
    return sp.csr_matrix((np.ones(len(row_index), dtype=np.float32), (row_index, col_index)), shape=(n, len(chosen)))


def control_scores(
    root: str,
    hookpoint: str,
    control: str,
    options: ExampleOptions = ExampleOptions(),
    *,
    decode=None,
    latents: np.ndarray | None = None,
) -> list[dict]:
    """The lexical score rows of a reference dictionary (`control_activations`) on the cache's split, through
    the very same windows, eligibility and scorer as a coder's."""
    manifest = open_cache(root)
    tokens, docs = split_tokens(root, hookpoint, options.split, manifest)
    acts = control_activations(tokens, control, seed=options.seed)
    return _score(acts, tokens, docs, True, options, decode, latents=latents)


def llm_examples(
    loaded,
    coder: SparseCoder | None,
    root: str,
    hookpoint: str,
    k: int,
    options: ExampleOptions,
    latents: np.ndarray,
    control: str | None = None,
) -> dict:
    """The LLM judge's examples (`bae_core.evaluation.judge.LatentExamples`) of the eligible ones among `latents`: a
    coder's, a reference dictionary's (`control`, see `control_activations`), or (`coder` None) the MLP neurons'
    at top-`k`. The windows are drawn exactly as the lexical score draws them (same options and seed): the
    activating explain windows, and the test windows."""
    from bae_core.evaluation.examples import example_sets
    from bae_core.evaluation.judge import LatentExamples

    manifest = open_cache(root)
    tokens, docs = split_tokens(root, hookpoint, options.split, manifest)
    if control is not None:
        acts = control_activations(tokens, control, seed=options.seed)
    elif coder is None:
        acts = neuron_activations(loaded, root, hookpoint, k, options.split, manifest)
    else:
        acts = coder_activations(coder, root, hookpoint, options.split, manifest)
    windows = cut_windows(tokens, docs, width=WINDOW, explain_fraction=options.explain_fraction, seed=options.seed)
    rows = window_rows(*tokens.shape, WINDOW)
    text: dict[int, str] = {}

    def strings(ids: np.ndarray) -> list[str]:
        for t in ids.tolist():
            if t not in text:
                text[t] = loaded.tokenizer.decode([t])
        return [text[t] for t in ids.tolist()]

    out = {}
    for latent, _values, fires, sets, _rng in example_sets(
        windows,
        acts[rows].tocsc(),
        binary=control is not None or (coder is not None and coder.cfg.is_binary),
        min_examples=options.min_examples or default_min_examples(tokens.size),
        test_windows=options.test_windows,
        seed=options.seed,
        latents=latents,
    ):
        if sets is None:
            continue
        explain_idx, test_idx, _ = sets
        explain = [(strings(windows.tokens[i]), fires[i].tolist()) for i in explain_idx if fires[i].any()]
        test = [(strings(windows.tokens[i]), fires[i].tolist(), bool(fires[i].any())) for i in test_idx]
        out[latent] = LatentExamples(explain=explain, test=test)
    return out


def lexical_summary(
    coder: SparseCoder, root: str, hookpoint: str, options: ExampleOptions = ExampleOptions(), *, max_latents: int
) -> dict[str, float | int]:
    """A sweep trial's lexical metrics, from at most `max_latents` latents drawn (seeded) among those that fire
    on the split: `lexical_auroc` (unweighted mean token AUROC of the eligible ones), `lexical_auroc_weighted`
    (weighted by firing count), `lexical_coverage` (eligible / drawn) and `lexical_latents` (drawn)."""
    if max_latents < 1:
        raise ValueError(f"max_latents: must be >= 1, got {max_latents}")
    manifest = open_cache(root)
    tokens, docs = split_tokens(root, hookpoint, options.split, manifest)
    acts = coder_activations(coder, root, hookpoint, options.split, manifest)
    alive = np.flatnonzero(acts.getnnz(axis=0) > 0)
    rng = np.random.default_rng(options.seed)
    drawn = np.sort(rng.choice(alive, min(max_latents, len(alive)), replace=False))
    rows = _score(acts, tokens, docs, coder.cfg.is_binary, options, None, latents=drawn)
    scored = [r for r in rows if r["eligible"]]
    counts = np.array([r["firing_count"] for r in scored], dtype=float)
    scores = np.array([r["token_auroc"] for r in scored], dtype=float)
    return {
        "lexical_auroc": float(scores.mean()) if len(scored) else float("nan"),
        "lexical_auroc_weighted": float((scores * counts).sum() / counts.sum()) if len(scored) else float("nan"),
        "lexical_coverage": len(scored) / len(drawn) if len(drawn) else float("nan"),
        "lexical_latents": len(drawn),
    }


def _score(acts, tokens, docs, binary: bool, options: ExampleOptions, decode, latents=None) -> list[dict]:
    windows = cut_windows(tokens, docs, width=WINDOW, explain_fraction=options.explain_fraction, seed=options.seed)
    rows = window_rows(*tokens.shape, WINDOW)
    return score_latents(
        windows,
        acts[rows].tocsc(),
        latents=latents,
        binary=binary,
        min_examples=options.min_examples or default_min_examples(tokens.size),
        test_windows=options.test_windows,
        seed=options.seed,
        decode=decode,
    )
