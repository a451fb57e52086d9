"""The activation cache: parquet shards per hookpoint and a manifest, on any pyarrow filesystem.

Layout under the cache root (a local path or a URI such as ``s3://bucket/cache``)::

    manifest.json
    train/<hookpoint>/shard-00000.parquet
    heldout/<hookpoint>/shard-00000.parquet

A *unit* is a fixed run of consecutive token sequences of one split; unit ``i`` of a split writes
``shard-{i:05d}.parquet`` under every hookpoint, all with the same rows in the same order. One row is
one token:

    seq_index     int64    sequence number within its split
    position      int32    position of the token in its sequence
    token_id      int32
    doc_id        string   the document the token came from (dictionary encoded)
    doc_position  int32    position of the token in its document
    input         activations entering the module (MLP hookpoints only)
    output        activations leaving the module

Activations are stored as ``float32`` (a fixed-size list of width d) or as ``float16`` whose bits are
packed two per ``uint32`` (a fixed-size list of width ceil(d / 2)): half the bytes, and it decodes
about twice as fast as float32 and several times faster than parquet's own float16.

Shards are written atomically (a temporary name, then a rename), so a file under its final name is
complete; the manifest records each shard's row count and sha256. `verify_shard` names a corrupt or
truncated file and how to repair it.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from bae_core.coders.config import check_choice

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "heldout")
STORAGE_DTYPES = ("float16", "float32")
TOKEN_COLUMNS = ("seq_index", "position", "token_id", "doc_id", "doc_position")
REPAIR_HINT = "delete it and run `bae cache` again with the same arguments: it rewrites missing shards only"


class CacheError(ValueError):
    """A cache that cannot be used as it is: corrupt, truncated, or made with other settings."""


# ---- filesystems ---------------------------------------------------------------------------------


def open_filesystem(root: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and base path of a cache root (a local path or a URI)."""
    if "://" in root:
        try:
            return pafs.FileSystem.from_uri(root)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as err:
            raise CacheError(f"cache: cannot open {root!r}: {err}") from err
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(root))


def _exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def write_bytes_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write `data` to `path` so that `path` is either absent or complete, never partial."""
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    with fs.open_output_stream(tmp) as out:
        out.write(data)
    fs.move(tmp, path)


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


# ---- activations in arrow ------------------------------------------------------------------------


def pack_activations(values: np.ndarray | torch.Tensor, dtype: str) -> pa.FixedSizeListArray:
    """An (n, d) array as an arrow column in the storage `dtype` (see the module docstring)."""
    check_choice("dtype", dtype, STORAGE_DTYPES)
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu", torch.float32).numpy()
    values = np.asarray(values, dtype=np.float32)
    n, d = values.shape
    if dtype == "float32":
        return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), d)
    half = values.astype(np.float16)
    if d % 2:
        half = np.concatenate([half, np.zeros((n, 1), np.float16)], axis=1)
    packed = np.ascontiguousarray(half).view(np.uint32)
    return pa.FixedSizeListArray.from_arrays(pa.array(packed.reshape(-1)), packed.shape[1])


def unpack_activations(column: pa.Array | pa.ChunkedArray | np.ndarray, dtype: str, width: int) -> np.ndarray:
    """Float32 (n, width) activations from a column written by `pack_activations` (or its numpy form)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if isinstance(column, pa.Array):
        stored = width if dtype == "float32" else -(-width // 2)
        column = column.values.to_numpy(zero_copy_only=False).reshape(len(column), stored)
    arr = np.asarray(column)
    if arr.dtype == object:  # Ray Data may hand a fixed-size list over as an array of arrays
        arr = np.stack(arr)
    if dtype == "float32":
        return arr.astype(np.float32, copy=False)
    return np.ascontiguousarray(arr, dtype=np.uint32).view(np.float16)[:, :width].astype(np.float32)


# ---- manifest ------------------------------------------------------------------------------------


@dataclass
class ShardRecord:
    """One finished shard."""

    split: str
    hookpoint: str
    unit: int
    path: str
    """Relative to the cache root."""
    rows: int
    sha256: str
    bytes: int
    node: str = ""
    """The node that wrote it (provenance)."""


@dataclass
class HookpointInfo:
    """Activation columns of one hookpoint: column name -> width."""

    columns: dict[str, int]


@dataclass
class CacheManifest:
    """Everything needed to trust, resume and read a cache."""

    model: str
    revision: str | None
    dataset: str
    hookpoints: dict[str, HookpointInfo]
    dtype: str
    seq_len: int
    sequences_per_unit: int
    heldout_fraction: float
    seed: int
    max_tokens: dict[str, int | None]
    """Token budget per split (None: all documents)."""
    splits: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per split: documents, sequences, tokens, units (filled as the plan is made)."""
    shards: list[ShardRecord] = field(default_factory=list)
    complete: bool = False
    format_version: int = FORMAT_VERSION

    # -- identity --

    def settings(self) -> dict[str, Any]:
        """The settings that decide the cache's content: a resumed cache must match them all."""
        return {
            "model": self.model,
            "revision": self.revision,
            "dataset": self.dataset,
            "hookpoints": sorted(self.hookpoints),
            "dtype": self.dtype,
            "seq_len": self.seq_len,
            "sequences_per_unit": self.sequences_per_unit,
            "heldout_fraction": self.heldout_fraction,
            "seed": self.seed,
            "max_tokens": self.max_tokens,
        }

    def check_matches(self, other: CacheManifest, root: str) -> None:
        """Raise CacheError naming the first setting where `other` (the request) differs from this cache."""
        mine, theirs = self.settings(), other.settings()
        for key, value in mine.items():
            if theirs[key] != value:
                raise CacheError(
                    f"{key}: the cache at {root} was made with {value!r}, not {theirs[key]!r}; "
                    "use another cache path, or the same settings to resume it"
                )

    # -- shards --

    def shards_of(self, split: str, hookpoint: str) -> list[ShardRecord]:
        check_choice("split", split, SPLITS)
        if hookpoint not in self.hookpoints:
            raise CacheError(f"hookpoint {hookpoint!r}: not in this cache; it has {', '.join(self.hookpoints)}")
        return sorted((s for s in self.shards if s.split == split and s.hookpoint == hookpoint), key=lambda s: s.unit)

    def finished_units(self, split: str) -> set[int]:
        """Units whose shards exist for every hookpoint."""
        by_unit: dict[int, set[str]] = {}
        for s in self.shards:
            if s.split == split:
                by_unit.setdefault(s.unit, set()).add(s.hookpoint)
        return {unit for unit, hooks in by_unit.items() if hooks >= set(self.hookpoints)}

    def add(self, record: ShardRecord) -> None:
        self.shards = [
            s for s in self.shards if (s.split, s.hookpoint, s.unit) != (record.split, record.hookpoint, record.unit)
        ]
        self.shards.append(record)

    def tokens(self, split: str) -> int:
        hook = next(iter(self.hookpoints))
        return sum(s.rows for s in self.shards if s.split == split and s.hookpoint == hook)

    # -- io --

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str, where: str = "manifest") -> CacheManifest:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as err:
            raise CacheError(f"{where}: not valid JSON ({err}); {REPAIR_HINT}") from err
        if d.get("format_version") != FORMAT_VERSION:
            raise CacheError(f"{where}: cache format {d.get('format_version')!r}; this version reads {FORMAT_VERSION}")
        d["hookpoints"] = {name: HookpointInfo(**info) for name, info in d["hookpoints"].items()}
        d["shards"] = [ShardRecord(**s) for s in d["shards"]]
        return cls(**d)

    def save(self, fs: pafs.FileSystem, base: str) -> None:
        write_bytes_atomic(fs, f"{base}/{MANIFEST}", self.to_json().encode())


def load_manifest(root: str) -> CacheManifest | None:
    """The manifest of the cache at `root`, or None when there is none yet."""
    fs, base = open_filesystem(root)
    path = f"{base}/{MANIFEST}"
    if not _exists(fs, path):
        return None
    return CacheManifest.from_json(read_bytes(fs, path).decode(), where=f"{root}/{MANIFEST}")


def open_cache(root: str) -> CacheManifest:
    """The manifest of a finished cache; a clear error when there is none or it is unfinished."""
    manifest = load_manifest(root)
    if manifest is None:
        raise CacheError(f"cache: no {MANIFEST} under {root}; create it with `bae cache`")
    if not manifest.complete:
        raise CacheError(f"cache: {root} is unfinished; run `bae cache` again with the same arguments to complete it")
    return manifest


def shard_path(split: str, hookpoint: str, unit: int) -> str:
    return f"{split}/{hookpoint}/shard-{unit:05d}.parquet"


# ---- shards --------------------------------------------------------------------------------------


def build_table(
    seq_index: np.ndarray,
    token_ids: np.ndarray,
    doc_id: np.ndarray,
    doc_position: np.ndarray,
    activations: dict[str, np.ndarray | torch.Tensor],
    dtype: str,
) -> pa.Table:
    """One shard's table, one row per token, from n sequences of t tokens.

    `seq_index` is (n,); `token_ids`, `doc_id` and `doc_position` are (n, t); each activation is
    (n * t, d), in the same token order.
    """
    token_ids = np.asarray(token_ids)
    n, t = token_ids.shape
    columns: dict[str, pa.Array] = {
        "seq_index": pa.array(np.repeat(np.asarray(seq_index, np.int64), t)),
        "position": pa.array(np.tile(np.arange(t, dtype=np.int32), n)),
        "token_id": pa.array(token_ids.reshape(-1).astype(np.int32)),
        "doc_id": pa.array(np.asarray(doc_id).reshape(-1).astype(str)).dictionary_encode(),
        "doc_position": pa.array(np.asarray(doc_position, np.int32).reshape(-1)),
    }
    for name, values in activations.items():
        columns[name] = pack_activations(values, dtype)
    return pa.table(columns)


def write_shard(
    fs: pafs.FileSystem, base: str, split: str, hookpoint: str, unit: int, table: pa.Table, node: str = ""
) -> ShardRecord:
    """Write one shard atomically and return its record (rows, sha256, size)."""
    buf = io.BytesIO()
    # Activation columns are fixed-size lists of numbers: dictionary encoding only costs time there.
    pq.write_table(table, buf, use_dictionary=["doc_id"], row_group_size=max(1, min(len(table), 1 << 16)))
    data = buf.getvalue()
    rel = shard_path(split, hookpoint, unit)
    write_bytes_atomic(fs, f"{base}/{rel}", data)
    return ShardRecord(split, hookpoint, unit, rel, len(table), hashlib.sha256(data).hexdigest(), len(data), node)


def _parquet_rows(data: bytes) -> int:
    """Row count from a parquet file's footer; ArrowInvalid/OSError when it is not readable parquet."""
    return pq.ParquetFile(io.BytesIO(data)).metadata.num_rows


def describe_existing_shard(
    fs: pafs.FileSystem, base: str, split: str, hookpoint: str, unit: int, expected_rows: int
) -> ShardRecord | None:
    """The record of a shard already on disk but missing from the manifest (a crash after its rename).

    Returns None when there is no such file, or when it is unreadable or holds the wrong number of
    rows (it is then rewritten).
    """
    rel = shard_path(split, hookpoint, unit)
    path = f"{base}/{rel}"
    if not _exists(fs, path):
        return None
    data = read_bytes(fs, path)
    try:
        rows = _parquet_rows(data)
    except (pa.ArrowInvalid, OSError):
        return None
    if rows != expected_rows:
        return None
    return ShardRecord(split, hookpoint, unit, rel, rows, hashlib.sha256(data).hexdigest(), len(data))


def verify_shard(root: str, record: ShardRecord, fs: pafs.FileSystem | None = None, base: str | None = None) -> None:
    """Raise CacheError naming the file when a shard is missing, truncated or altered."""
    if fs is None or base is None:
        fs, base = open_filesystem(root)
    path = f"{base}/{record.path}"
    if not _exists(fs, path):
        raise CacheError(f"cache shard {root}/{record.path} is missing; {REPAIR_HINT}")
    data = read_bytes(fs, path)
    if len(data) != record.bytes or hashlib.sha256(data).hexdigest() != record.sha256:
        raise CacheError(
            f"cache shard {root}/{record.path} is corrupt or truncated "
            f"({len(data)} bytes, expected {record.bytes}; checksum differs); {REPAIR_HINT}"
        )
    try:
        rows = _parquet_rows(data)
    except (pa.ArrowInvalid, OSError) as err:
        raise CacheError(f"cache shard {root}/{record.path} is not readable parquet ({err}); {REPAIR_HINT}") from err
    if rows != record.rows:
        raise CacheError(f"cache shard {root}/{record.path} has {rows} rows, expected {record.rows}; {REPAIR_HINT}")


def verify_cache(root: str, manifest: CacheManifest | None = None) -> int:
    """Check every shard of the cache at `root`; return how many were checked."""
    manifest = manifest or open_cache(root)
    fs, base = open_filesystem(root)
    for record in manifest.shards:
        verify_shard(root, record, fs, base)
    return len(manifest.shards)


def read_shard(root: str, record: ShardRecord, columns: list[str] | None = None) -> pa.Table:
    """One shard as an arrow table; a clear CacheError when the file is unreadable."""
    fs, base = open_filesystem(root)
    path = f"{base}/{record.path}"
    try:
        return pq.read_table(path, columns=columns, filesystem=fs)
    except (pa.ArrowInvalid, OSError) as err:
        raise CacheError(f"cache shard {root}/{record.path} is corrupt or truncated ({err}); {REPAIR_HINT}") from err


def shard_uris(root: str, manifest: CacheManifest, split: str, hookpoint: str) -> list[str]:
    """Paths of a hookpoint's shards (with the URI scheme for remote roots), in unit order."""
    return [f"{root.rstrip('/')}/{s.path}" for s in manifest.shards_of(split, hookpoint)]


def units_for(num_sequences: int, sequences_per_unit: int) -> int:
    return math.ceil(num_sequences / sequences_per_unit)
