"""Reading activations from a cache for training and evaluation: shuffled batches drawn across a window of
shards, read in-process with pyarrow (no Ray needed), and the (x, y) columns each kind of coder trains on.
`prefetch` reads and decodes batches ahead in a background thread, so that reading overlaps a training step."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator

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
    prefetch: int = 0,
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

    `prefetch=n` (n >= 1) reads and decodes up to n batches ahead in a background thread (`Prefetcher`): the
    same batches in the same order, while the consumer computes; 0 reads each batch when it is asked for.
    """
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
        raise ValueError(f"prefetch: must be an integer >= 0 (batches read ahead; 0: none), got {prefetch!r}")
    batches = _iter_batches(
        root, hookpoint, split, batch_size, transcoder, shuffle_seed, epochs, manifest, shard_slice, shuffle_shards
    )
    return Prefetcher(batches, prefetch) if prefetch else batches


def _iter_batches(
    root: str,
    hookpoint: str,
    split: str,
    batch_size: int,
    transcoder: bool,
    shuffle_seed: int | None,
    epochs: int | None,
    manifest: CacheManifest | None,
    shard_slice: tuple[int, int],
    shuffle_shards: int,
):
    """`iter_activation_batches` without prefetching (a generator)."""
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


TRAINING_PREFETCH = 4
"""Batches a training loop reads ahead, each one decoded batch of memory (4096 x 576 float32: 9.4 MB a column).
Reading is lumpy: a new window of 8 shards takes a few steps' worth of time (0.25-0.5 s against CPU steps of
0.1-0.4 s), and the thread must stay ahead through it (benchmarks/reader_overlap.py: with 2 a 0.1 s step still
waited for its batch at window reads, with 4 it did not)."""


class Prefetcher(Iterator):
    """The items of `source`, made up to `depth` ahead of the consumer by a background (daemon) thread.

    The items come in `source`'s order. At most `depth` items exist that the consumer has not taken yet (the one
    being made included), so memory holds at most `depth` batches more than without prefetching. An exception
    raised by `source` (a corrupt shard) is raised again, the same object, by the `next()` that would have
    returned the item. `close()` (or dropping the last reference; or the end of a `with` block) stops the thread:
    it finishes the item in hand and then closes `source` (a generator's `finally` blocks run in that thread);
    `close()` waits for that, garbage collection does not. Reading and decoding is pyarrow and numpy, which mostly
    release the GIL, so the thread runs alongside torch's own threads (on a CPU that torch's threads already fill,
    it takes its time from them: benchmarks/reader_overlap.py).
    """

    def __init__(self, source: Iterable, depth: int = 2):
        check_positive("prefetch depth", depth, integer=True)
        self._ready: queue.SimpleQueue = queue.SimpleQueue()
        self._slots = threading.Semaphore(depth)
        self._stop = threading.Event()
        self._finished = False
        # The thread holds the source and the queues, never `self`: dropping the Prefetcher collects it.
        self._thread = threading.Thread(
            target=_produce,
            args=(iter(source), self._ready, self._slots, self._stop),
            name="bae-prefetch",
            daemon=True,
        )
        self._thread.start()

    def __next__(self):
        if self._finished:
            raise StopIteration
        kind, value = self._ready.get()
        self._slots.release()
        if kind is _ITEM:
            return value
        self._finished = True
        self._thread.join()  # its last message: it has closed the source and is returning
        if kind is _END:
            raise StopIteration
        raise value

    def close(self, wait: bool = True) -> None:
        """Stop reading ahead; with `wait`, return once the thread has closed the source and ended."""
        if not self._finished:
            self._finished = True
            self._stop.set()
            self._slots.release()  # wakes a thread waiting for room
            self._drain()  # free the batches made ahead now, not when this object goes
        if wait and self._thread is not threading.current_thread():
            self._thread.join()
            self._drain()  # and the one it may have finished after the stop

    def _drain(self) -> None:
        while True:
            try:
                self._ready.get_nowait()
            except queue.Empty:
                return

    def __del__(self) -> None:
        if hasattr(self, "_thread"):
            self.close(wait=False)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_ITEM, _END, _ERROR = "item", "end", "error"


def _produce(source: Iterator, ready: queue.SimpleQueue, slots: threading.Semaphore, stop: threading.Event) -> None:
    """The prefetching thread: one item of `source` per free slot, until the end, an error, or `stop`."""
    try:
        while True:
            slots.acquire()
            if stop.is_set():
                return
            try:
                item = next(source)
            except StopIteration:
                ready.put((_END, None))
                return
            except BaseException as err:  # noqa: BLE001 -- handed to the consumer, which raises it
                ready.put((_ERROR, err))
                return
            ready.put((_ITEM, item))
            del item
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()
