"""`bae cache` on a local Ray: the embedded model's activations into shards, resumable (real model)."""

import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from bae_core.data.cache import (
    CacheError,
    load_manifest,
    open_cache,
    open_filesystem,
    unpack_activations,
    verify_cache,
)
from bae_core.data.hooks import capture
from bae_core.data.lm import load_model, resolve_hookpoints
from ray_jobs.cache_job import CacheRequest, run_cache

HOOKS = ["layers.3.mlp", "layers.5"]


def request(root, **kw) -> CacheRequest:
    base = dict(
        root=str(root),
        hookpoints=HOOKS,
        seq_len=32,
        train_tokens=32 * 24,
        heldout_tokens=32 * 8,
        sequences_per_unit=8,
        batch_size=8,
        actors=1,
        cpus_per_actor=1.0,
    )
    return CacheRequest(**{**base, **kw})


@pytest.fixture(scope="module")
def cache(local_ray, tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    return root, run_cache(request(root))


def test_cache_holds_the_models_activations(cache):
    root, manifest = cache
    assert manifest.complete and manifest.dtype == "float16"
    assert manifest.splits["train"] == {
        "documents": manifest.splits["train"]["documents"],
        "sequences": 24,
        "tokens": 768,
        "units": 3,
    }
    assert manifest.hookpoints["layers.3.mlp"].columns == {"input": 576, "output": 576}
    assert manifest.hookpoints["layers.5"].columns == {"output": 576}
    assert len(manifest.shards) == (3 + 1) * 2
    assert verify_cache(str(root)) == 8
    assert manifest.tokens("train") == 768 and manifest.tokens("heldout") == 256

    # The stored activations are what the model computes for those tokens (to float16 precision).
    rec = manifest.shards_of("train", "layers.3.mlp")[1]
    table = pq.read_table(root / rec.path)
    first = table.slice(0, 32)
    assert first.column("position").to_pylist() == list(range(32))
    ids = torch.tensor([first.column("token_id").to_pylist()])
    loaded = load_model()
    direct = capture(loaded, ids, resolve_hookpoints(loaded, ["layers.3.mlp"]))["layers.3.mlp"]
    stored_in = unpack_activations(first.column("input"), "float16", 576)
    stored_out = unpack_activations(first.column("output"), "float16", 576)
    np.testing.assert_allclose(stored_in, direct["input"][0].float().numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(stored_out, direct["output"][0].float().numpy(), rtol=2e-3, atol=2e-3)


def test_train_and_heldout_documents_are_disjoint(cache):
    root, manifest = cache
    docs = {}
    for split in ("train", "heldout"):
        docs[split] = set()
        for rec in manifest.shards_of(split, "layers.5"):
            docs[split] |= set(pq.read_table(root / rec.path, columns=["doc_id"]).column("doc_id").to_pylist())
    assert docs["train"] and docs["heldout"] and not docs["train"] & docs["heldout"]


def test_rerun_resumes_and_rewrites_only_missing_shards(local_ray, tmp_path):
    root = tmp_path / "c"
    first = run_cache(request(root, train_tokens=32 * 16, heldout_tokens=32 * 8))
    lost = first.shards_of("train", "layers.5")[1]
    (root / lost.path).unlink()
    manifest = load_manifest(str(root))
    manifest.shards = [s for s in manifest.shards if s.path != lost.path]
    manifest.complete = False
    manifest.save(*open_filesystem(str(root)))
    # Work is done in units (the same sequences for every hookpoint): only the unit that lost a shard reruns.
    kept = {
        s.path: os.stat(root / s.path).st_mtime_ns
        for s in manifest.shards
        if (s.split, s.unit) != (lost.split, lost.unit)
    }

    again = run_cache(request(root, train_tokens=32 * 16, heldout_tokens=32 * 8))
    assert again.complete and len(again.shards) == len(first.shards)
    assert {s.path: os.stat(root / s.path).st_mtime_ns for s in again.shards if s.path in kept} == kept
    assert (root / lost.path).exists()
    assert verify_cache(str(root)) == len(first.shards)

    with pytest.raises(CacheError, match=r"seq_len: the cache at .* was made with 32, not 16"):
        run_cache(request(root, seq_len=16, train_tokens=32 * 16, heldout_tokens=32 * 8))

    path = root / again.shards[0].path
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CacheError, match=rf"{again.shards[0].path} is corrupt or truncated"):
        verify_cache(str(root), open_cache(str(root)))


def test_unknown_hookpoint_is_refused_before_any_work(local_ray, tmp_path):
    with pytest.raises(ValueError, match=r"layers.99.mlp"):
        run_cache(request(tmp_path / "bad", hookpoints=["layers.99.mlp"]))
    assert not (tmp_path / "bad" / "manifest.json").exists()
