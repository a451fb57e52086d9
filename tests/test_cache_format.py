"""The activation cache format: packing, manifests, atomic shards and corruption checks (no Ray)."""

from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import bae_core.data.reader as reader_module
from bae_core.data.cache import (
    CacheError,
    CacheManifest,
    HookpointInfo,
    build_table,
    describe_existing_shard,
    load_manifest,
    open_cache,
    open_filesystem,
    pack_activations,
    read_shard,
    unpack_activations,
    verify_cache,
    write_shard,
)
from bae_core.data.reader import coder_columns, iter_activation_batches


def manifest(**overrides) -> CacheManifest:
    kwargs = dict(
        model="embedded:SmolLM2-135M-Instruct",
        revision="abc",
        dataset="embedded",
        hookpoints={"layers.9.mlp": HookpointInfo({"input": 5, "output": 5})},
        dtype="float16",
        seq_len=4,
        sequences_per_unit=2,
        heldout_fraction=0.1,
        seed=0,
        max_tokens={"train": 100, "heldout": 20},
    )
    return CacheManifest(**{**kwargs, **overrides})


def tokens(n_seq: int, seq_len: int) -> tuple[np.ndarray, ...]:
    """seq_index, token_ids, doc_id and doc_position of `n_seq` sequences of one document."""
    positions = np.arange(n_seq * seq_len).reshape(n_seq, seq_len)
    return np.arange(n_seq), positions, np.full(positions.shape, "kjv/Genesis/1"), positions


@pytest.mark.parametrize("width", [6, 5])
def test_float16_packing_round_trips_every_bit_pattern(width):
    bits = np.arange(65536, dtype=np.uint16)
    bits = np.concatenate([bits, np.zeros((-len(bits)) % width, np.uint16)]).reshape(-1, width)
    values = bits.view(np.float16).astype(np.float32)
    back = unpack_activations(pack_activations(values, "float16"), "float16", width)
    finite = np.isfinite(values)
    assert back.shape == values.shape
    np.testing.assert_array_equal(back[finite], values[finite])
    assert np.array_equal(np.isnan(back), np.isnan(values)) and np.array_equal(np.isinf(back), np.isinf(values))


def test_float32_storage_is_exact_and_float16_is_close():
    x = torch.randn(10, 7)
    np.testing.assert_array_equal(unpack_activations(pack_activations(x, "float32"), "float32", 7), x.numpy())
    half = unpack_activations(pack_activations(x, "float16"), "float16", 7)
    np.testing.assert_allclose(half, x.numpy(), rtol=1e-3, atol=1e-3)
    # Ray Data hands a fixed-size list column over as a 2-d numpy array of the stored type.
    stored = pack_activations(x, "float16").values.to_numpy().reshape(10, 4)
    np.testing.assert_array_equal(unpack_activations(stored, "float16", 7), half)


def test_shards_are_written_atomically_and_verified(tmp_path):
    root = str(tmp_path / "cache")
    fs, base = open_filesystem(root)
    table = build_table(*tokens(2, 4), {"input": np.ones((8, 5)), "output": np.zeros((8, 5))}, "float16")
    rec = write_shard(fs, base, "train", "layers.9.mlp", 0, table, node="n1")
    assert rec.rows == 8 and rec.path == "train/layers.9.mlp/shard-00000.parquet" and rec.node == "n1"
    assert sorted(p.name for p in (tmp_path / "cache/train/layers.9.mlp").iterdir()) == ["shard-00000.parquet"]
    read = pq.read_table(tmp_path / "cache" / rec.path)
    assert read.column_names == ["seq_index", "position", "token_id", "doc_id", "doc_position", "input", "output"]
    np.testing.assert_array_equal(unpack_activations(read.column("input"), "float16", 5), np.ones((8, 5)))

    m = manifest(shards=[rec], complete=True, splits={"train": {"units": 1}})
    m.save(fs, base)
    assert verify_cache(root) == 1
    assert load_manifest(root) == m

    path = tmp_path / "cache" / rec.path
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CacheError, match=r"shard-00000.parquet is corrupt or truncated.*run `bae cache` again"):
        verify_cache(root)
    # A file under its final name that cannot be read is not adopted on resume; a good one is.
    assert describe_existing_shard(fs, base, "train", "layers.9.mlp", 0, expected_rows=8) is None
    path.write_bytes(data)
    assert describe_existing_shard(fs, base, "train", "layers.9.mlp", 0, expected_rows=8) == replace(rec, node="")
    assert describe_existing_shard(fs, base, "train", "layers.9.mlp", 0, expected_rows=9) is None
    path.unlink()
    with pytest.raises(CacheError, match="shard-00000.parquet is missing"):
        verify_cache(root)


def test_uri_roots_use_pyarrow_filesystems(tmp_path):
    root = f"file://{tmp_path}/remote"
    fs, base = open_filesystem(root)
    rec = write_shard(
        fs, base, "heldout", "layers.3", 7, build_table(*tokens(1, 4), {"output": np.ones((4, 3))}, "float32")
    )
    m = manifest(hookpoints={"layers.3": HookpointInfo({"output": 3})}, shards=[rec], complete=True)
    m.save(fs, base)
    assert (tmp_path / "remote/heldout/layers.3/shard-00007.parquet").exists()
    assert open_cache(root).shards == [rec]
    assert verify_cache(root) == 1
    with pytest.raises(CacheError, match="cannot open 'nosuchscheme://x'"):
        open_filesystem("nosuchscheme://x")


def test_manifest_refuses_other_settings_and_unfinished_caches(tmp_path):
    with pytest.raises(CacheError, match=r"seq_len: the cache at /c was made with 4, not 8"):
        manifest().check_matches(manifest(seq_len=8), "/c")
    manifest().check_matches(manifest(shards=[], complete=True), "/c")  # progress is not a setting
    with pytest.raises(CacheError, match="no manifest.json under .*; create it with `bae cache`"):
        open_cache(str(tmp_path))
    fs, base = open_filesystem(str(tmp_path))
    manifest().save(fs, base)
    with pytest.raises(CacheError, match="is unfinished; run `bae cache` again"):
        open_cache(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CacheError, match="manifest.json: not valid JSON"):
        load_manifest(str(tmp_path))


def test_finished_units_need_every_hookpoint(tmp_path):
    fs, base = open_filesystem(str(tmp_path))
    m = manifest(hookpoints={"layers.3": HookpointInfo({"output": 3}), "layers.5": HookpointInfo({"output": 3})})
    t = build_table(*tokens(1, 4), {"output": np.ones((4, 3))}, "float16")
    m.add(write_shard(fs, base, "train", "layers.3", 0, t))
    assert m.finished_units("train") == set()
    m.add(write_shard(fs, base, "train", "layers.5", 0, t))
    m.add(write_shard(fs, base, "train", "layers.5", 0, t))  # rewriting a shard replaces its record
    assert m.finished_units("train") == {0} and len(m.shards) == 2
    assert m.tokens("train") == 4
    with pytest.raises(CacheError, match="hookpoint 'layers.7': not in this cache; it has layers.3, layers.5"):
        m.shards_of("train", "layers.7")


def test_activation_batches_visit_every_row_once_per_epoch(tmp_path):
    root = str(tmp_path)
    fs, base = open_filesystem(root)
    m = manifest(dtype="float32", complete=True)
    values = torch.arange(3 * 8 * 10, dtype=torch.float32).reshape(3, 8, 10)  # 3 shards of 8 rows
    for unit in range(3):
        t = build_table(*tokens(2, 4), {"input": values[unit, :, :5], "output": values[unit, :, 5:]}, "float32")
        m.add(write_shard(fs, base, "train", "layers.9.mlp", unit, t))
    m.save(fs, base)

    batches = list(iter_activation_batches(root, "layers.9.mlp", batch_size=5, epochs=2))
    assert [len(b) for b in batches] == [5, 5, 5, 5, 4] * 2
    first = torch.cat(batches[:5])
    assert sorted(first[:, 0].tolist()) == sorted(values[:, :, 5].flatten().tolist())  # SAE: the output
    assert not torch.equal(torch.cat(batches[:5]), torch.cat(batches[5:]))  # reshuffled per epoch

    pairs = list(iter_activation_batches(root, "layers.9.mlp", batch_size=24, transcoder=True, shuffle_seed=None))
    ((x, y),) = pairs
    torch.testing.assert_close(x, values[:, :, :5].reshape(24, 5))
    torch.testing.assert_close(y, values[:, :, 5:].reshape(24, 5))

    share = list(iter_activation_batches(root, "layers.9.mlp", batch_size=100, shard_slice=(1, 2)))
    assert len(share) == 1 and len(share[0]) == 8  # worker 1 of 2 reads the middle shard only
    with pytest.raises(CacheError, match="no heldout shards of layers.9.mlp"):
        next(iter_activation_batches(root, "layers.9.mlp", split="heldout"))
    m2 = manifest(hookpoints={"layers.3": HookpointInfo({"output": 3})})
    with pytest.raises(CacheError, match="a transcoder needs the module's input and output"):
        coder_columns(m2, "layers.3", transcoder=True)


def planted_cache(root: str, shards: int, rows: int, dtype: str = "float16") -> None:
    """A finished cache of `shards` train shards of `rows` rows each, where a row's input and output both
    hold its shard's index and its index within the shard (and then 0 for the input, 1 for the output)."""
    fs, base = open_filesystem(root)
    m = manifest(hookpoints={"layers.9.mlp": HookpointInfo({"input": 3, "output": 3})}, dtype=dtype, complete=True)
    for unit in range(shards):
        ids = np.stack([np.full(rows, unit), np.arange(rows)], axis=1)
        acts = {"input": np.c_[ids, np.zeros(rows)], "output": np.c_[ids, np.ones(rows)]}
        m.add(write_shard(fs, base, "train", "layers.9.mlp", unit, build_table(*tokens(rows // 4, 4), acts, dtype)))
    m.save(fs, base)


def row_ids(batch: torch.Tensor) -> list[tuple[int, int]]:
    return [(int(s), int(r)) for s, r in batch[:, :2].tolist()]


def test_a_training_batch_draws_rows_from_several_shards(tmp_path, monkeypatch):
    root = str(tmp_path)
    planted_cache(root, shards=6, rows=32)
    every_row = sorted((s, r) for s in range(6) for r in range(32))
    batches = list(iter_activation_batches(root, "layers.9.mlp", batch_size=8, epochs=2))
    assert [len(b) for b in batches] == [8] * 48
    shards_per_batch = [len({s for s, _ in row_ids(b)}) for b in batches]
    # Eight rows drawn from six shards of 32: nearly always four or more shards, never a single one.
    assert min(shards_per_batch) >= 2 and np.mean(shards_per_batch) > 3.5
    assert sorted(row_ids(torch.cat(batches[:24]))) == every_row  # every row once per epoch
    assert sorted(row_ids(torch.cat(batches[24:]))) == every_row and row_ids(batches[0]) != row_ids(batches[24])

    # The order is a function of the seed; a transcoder's input and output rows stay paired.
    again = list(iter_activation_batches(root, "layers.9.mlp", batch_size=8, epochs=2))
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))
    other = next(iter_activation_batches(root, "layers.9.mlp", batch_size=8, shuffle_seed=1))
    assert row_ids(other) != row_ids(batches[0])
    for x, y in iter_activation_batches(root, "layers.9.mlp", batch_size=8, transcoder=True):
        assert torch.equal(x[:, :2], y[:, :2]) and (x[:, 2] == 0).all() and (y[:, 2] == 1).all()

    # A window of two shards: memory holds two shards (the first batch comes after two reads), and each batch
    # comes from the two shards of its window. The last batch of an epoch takes what is left over.
    reads = []
    monkeypatch.setattr(reader_module, "read_shard", lambda *a, **k: reads.append(a[1].unit) or read_shard(*a, **k))
    windowed = iter_activation_batches(root, "layers.9.mlp", batch_size=12, shuffle_shards=2, epochs=1)
    first = next(windowed)
    assert len(reads) == 2 and {s for s, _ in row_ids(first)} <= set(reads)
    rest = list(windowed)
    assert len(reads) == 6 and [len(b) for b in [first, *rest]] == [12] * 16
    assert sorted(row_ids(torch.cat([first, *rest]))) == every_row

    # Without a seed: stored order, one shard at a time, batches running across shard boundaries.
    reads.clear()
    ordered = iter_activation_batches(root, "layers.9.mlp", batch_size=20, shuffle_seed=None)
    assert row_ids(next(ordered)) == every_row[:20] and reads == [0]
    assert row_ids(torch.cat([next(ordered), *ordered])) == every_row[20:] and reads == list(range(6))
    with pytest.raises(ValueError, match="shuffle_shards: must be a finite number > 0, got 0"):
        next(iter_activation_batches(root, "layers.9.mlp", shuffle_shards=0))
