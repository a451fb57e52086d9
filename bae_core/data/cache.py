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
complete; the manifest records each shard's rows, size and sha256. `open_cache` checks every shard's
size (one listing of the folder), `verify_cache` reads every shard; both name a damaged shard and its
repair, `bae cache` with the same arguments, which rewrites exactly the missing and damaged shards.
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
REPAIR_HINT = "run `bae cache` again with the same arguments: it rewrites missing and damaged shards"
DELETE_REPAIR_HINT = f"delete it and {REPAIR_HINT}"  # for damage that only a full read finds


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
            raise CacheError(
                f"{where}: not valid JSON ({err}); delete it and run `bae cache` again with the same arguments: "
                "the shards already written are checked and kept"
            ) from err
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


def open_cache(root: str, *, check_shards: bool = True) -> CacheManifest:
    """The manifest of a finished cache; a clear error when there is none, it is unfinished, or (`check_shards`)
    a shard is missing or its size is not the manifest's (one listing of the folder, no shard is read)."""
    manifest = load_manifest(root)
    if manifest is None:
        raise CacheError(f"cache: no {MANIFEST} under {root}; create it with `bae cache`")
    if not manifest.complete:
        raise CacheError(f"cache: {root} is unfinished; run `bae cache` again with the same arguments to complete it")
    if check_shards:
        damaged = damaged_shards(root, manifest)
        if damaged:
            raise CacheError(describe_damage(root, damaged))
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
    """The record of a shard on disk but not in the manifest (a crash after its rename); None when there is no
    such file, or it is unreadable or holds the wrong number of rows (it is then rewritten)."""
    rel = shard_path(split, hookpoint, unit)
    if not _exists(fs, f"{base}/{rel}"):
        return None
    data = read_bytes(fs, f"{base}/{rel}")
    record = ShardRecord(split, hookpoint, unit, rel, expected_rows, hashlib.sha256(data).hexdigest(), len(data))
    return None if _content_problem(fs, base, record, data) else record


def shard_sizes(fs: pafs.FileSystem, base: str) -> dict[str, int]:
    """The size of every file under a cache root, by its path relative to the root, from one listing."""
    prefix = base.rstrip("/") + "/"
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    return {i.path[len(prefix) :]: i.size for i in infos if i.type == pafs.FileType.File and i.path.startswith(prefix)}


def damaged_shards(
    root: str, manifest: CacheManifest, *, checksums: bool = False, fs: pafs.FileSystem | None = None, base: str = ""
) -> list[tuple[ShardRecord, str]]:
    """The shards of `manifest` that are missing or whose size is not the one recorded, each with what is wrong;
    with `checksums`, also those whose sha256 or row count differ (every shard is read)."""
    if fs is None:
        fs, base = open_filesystem(root)
    sizes = shard_sizes(fs, base)
    damaged = []
    for record in manifest.shards:
        size = sizes.get(record.path)
        if size is None:
            damaged.append((record, "is missing"))
        elif size != record.bytes:
            damaged.append((record, f"is corrupt or truncated ({size} bytes, expected {record.bytes})"))
        elif checksums and (problem := _content_problem(fs, base, record)):
            damaged.append((record, problem))
    return damaged


def _content_problem(fs: pafs.FileSystem, base: str, record: ShardRecord, data: bytes | None = None) -> str | None:
    data = read_bytes(fs, f"{base}/{record.path}") if data is None else data
    if len(data) != record.bytes:
        return f"is corrupt or truncated ({len(data)} bytes, expected {record.bytes})"
    if hashlib.sha256(data).hexdigest() != record.sha256:
        return "is corrupt (its sha256 is not the manifest's)"
    try:
        rows = _parquet_rows(data)
    except (pa.ArrowInvalid, OSError) as err:
        return f"is not readable parquet ({err})"
    return None if rows == record.rows else f"has {rows} rows, expected {record.rows}"


def describe_damage(root: str, damaged: list[tuple[ShardRecord, str]]) -> str:
    """One line naming the first damaged shard, how many more there are, and the repair."""
    record, problem = damaged[0]
    more = f" (and {len(damaged) - 1} more damaged shards)" if len(damaged) > 1 else ""
    sized = problem == "is missing" or problem.startswith("is corrupt or truncated")  # what `bae cache` finds
    return (
        f"cache shard {root.rstrip('/')}/{record.path} {problem}{more}; {REPAIR_HINT if sized else DELETE_REPAIR_HINT}"
    )


def verify_cache(root: str, manifest: CacheManifest | None = None) -> int:
    """Check every shard of the cache at `root` (size, sha256, rows); return how many were checked. The
    CacheError names the first damaged shard and counts the others."""
    manifest = manifest or open_cache(root, check_shards=False)
    damaged = damaged_shards(root, manifest, checksums=True)
    if damaged:
        raise CacheError(describe_damage(root, damaged))
    return len(manifest.shards)


def read_shard(root: str, record: ShardRecord, columns: list[str] | None = None) -> pa.Table:
    """One shard as an arrow table; a clear CacheError when the file is unreadable."""
    fs, base = open_filesystem(root)
    path = f"{base}/{record.path}"
    try:
        return pq.read_table(path, columns=columns, filesystem=fs)
    except (pa.ArrowInvalid, OSError) as err:
        raise CacheError(
            f"cache shard {root}/{record.path} is corrupt or truncated ({err}); {DELETE_REPAIR_HINT}"
        ) from err


def shard_uris(root: str, manifest: CacheManifest, split: str, hookpoint: str) -> list[str]:
    """Paths of a hookpoint's shards (with the URI scheme for remote roots), in unit order."""
    return [f"{root.rstrip('/')}/{s.path}" for s in manifest.shards_of(split, hookpoint)]


def units_for(num_sequences: int, sequences_per_unit: int) -> int:
    return math.ceil(num_sequences / sequences_per_unit)
