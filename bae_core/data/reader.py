"""Reading activations from a cache for training and evaluation: shuffled batches drawn across a window of
shards, read in-process with pyarrow (no Ray needed), and the (x, y) columns each kind of coder trains on."""

from __future__ import annotations

import numpy as np
import torch

from bae_core.coders.config import check_positive
from bae_core.data.cache import (
    DELETE_REPAIR_HINT,
    CacheError,
    CacheManifest,
    ShardRecord,
    open_cache,
    read_shard,
    unpack_activations,
)


def coder_columns(manifest: CacheManifest, hookpoint: str, transcoder: bool) -> tuple[str, str | None]:
    """The (x, y) columns a coder trains on: an SAE reconstructs the module's output (sparsify's
    convention); a transcoder maps the module's input to its output."""
    columns = manifest.hookpoints[hookpoint].columns if hookpoint in manifest.hookpoints else None
    if columns is None:
        raise CacheError(f"hookpoint {hookpoint!r}: not in this cache; it has {', '.join(manifest.hookpoints)}")
    if not transcoder:
        return "output", None
    if "input" not in columns:
        raise CacheError(
            f"hookpoint {hookpoint!r}: a transcoder needs the module's input and output; this hookpoint caches "
            "only the residual stream (use an MLP hookpoint such as layers.9.mlp)"
        )
    return "input", "output"


def iter_activation_batches(
    root: str,
    hookpoint: str,
    *,
    split: str = "train",
    batch_size: int = 4096,
    transcoder: bool = False,
    shuffle_seed: int | None = 0,
    epochs: int | None = 1,
    manifest: CacheManifest | None = None,
    shard_slice: tuple[int, int] = (0, 1),
    shuffle_shards: int = 8,
):
    """Batches of float32 tensors from a cache, read in-process with pyarrow (no Ray needed).

    Yields `x` for an SAE and `(x, y)` for a transcoder. Shards are visited in a seeded order per
    epoch (`epochs=None` repeats forever), `shuffle_shards` at a time: each batch is drawn at random
    from the rows of such a window of shards (and the few rows the previous window left over), so it
    mixes sequences of several parts of the corpus rather than a few consecutive sequences of one
    shard. Memory holds one window and one batch, the window in its stored form (a float16 cache is
    decoded batch by batch). `shuffle_seed=None` reads every row in stored order, one shard at a time.
    `shard_slice=(i, n)` reads every n-th shard starting at i (a worker's share). A batch never mixes
    epochs; the last batch of an epoch may be smaller.
    """
    check_positive("batch_size", batch_size, integer=True)
    check_positive("shuffle_shards", shuffle_shards, integer=True)
    manifest = manifest or open_cache(root)
    x_col, y_col = coder_columns(manifest, hookpoint, transcoder)
    widths = manifest.hookpoints[hookpoint].columns
    shards = manifest.shards_of(split, hookpoint)[shard_slice[0] :: shard_slice[1]]
    if not shards:
        raise CacheError(f"cache {root}: no {split} shards of {hookpoint} for worker {shard_slice[0]}")
    columns = [x_col] + ([y_col] if y_col else [])
    stored = [_stored_layout(manifest.dtype, widths[c]) for c in columns]
    window = shuffle_shards if shuffle_seed is not None else 1
    epoch = 0
    while epochs is None or epoch < epochs:
        rng = None if shuffle_seed is None else np.random.default_rng((shuffle_seed, epoch))
        order = np.arange(len(shards)) if rng is None else rng.permutation(len(shards))
        left = [np.empty((0, width), dtype) for dtype, width in stored]  # rows not yet yielded, per column
        for first in range(0, len(order), window):
            rows = _read_window(root, [shards[i] for i in order[first : first + window]], columns, stored, left)
            n = len(rows[0])
            pick = np.arange(n) if rng is None else rng.permutation(n)
            full = (n // batch_size) * batch_size
            for start in range(0, full, batch_size):
                take = pick[start : start + batch_size]
                yield _as_batch([r[take] for r in rows], columns, manifest.dtype, widths)
            left = [r[pick[full:]] for r in rows]
        if len(left[0]):
            yield _as_batch(left, columns, manifest.dtype, widths)
        epoch += 1


def _stored_layout(dtype: str, width: int) -> tuple[type, int]:
    """The numpy dtype and width of an activation column as stored: float32, or float16 bits packed in uint32."""
    return (np.float32, width) if dtype == "float32" else (np.uint32, -(-width // 2))


def _read_window(
    root: str, group: list[ShardRecord], columns: list[str], stored: list[tuple[type, int]], left: list[np.ndarray]
) -> list[np.ndarray]:
    """Per column, the stored rows of `left` followed by those of the `group` of shards, undecoded; each
    shard is copied into place as it is read, so the window is never held twice."""
    total = len(left[0]) + sum(s.rows for s in group)
    rows = [np.empty((total, width), dtype) for dtype, width in stored]
    for out, carried in zip(rows, left, strict=True):
        out[: len(carried)] = carried
    at = len(left[0])
    for record in group:
        table = read_shard(root, record, columns)
        if table.num_rows != record.rows:
            raise CacheError(
                f"cache shard {root}/{record.path} has {table.num_rows} rows, expected {record.rows}; "
                f"{DELETE_REPAIR_HINT}"
            )
        for out, name in zip(rows, columns, strict=True):
            values = table.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False)
            out[at : at + record.rows] = values.reshape(record.rows, -1)
        at += record.rows
    return rows


def _as_batch(stored: list[np.ndarray], columns: list[str], dtype: str, widths: dict[str, int]):
    """`x`, or `(x, y)`, as float32 tensors from a batch of stored rows per column."""
    tensors = [
        torch.from_numpy(np.ascontiguousarray(unpack_activations(rows, dtype, widths[name])))
        for rows, name in zip(stored, columns, strict=True)
    ]
    return tensors[0] if len(tensors) == 1 else tuple(tensors)
