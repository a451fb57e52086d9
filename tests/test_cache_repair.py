"""A damaged cache is named, with its repair, by every command that reads it, and the repair works: `bae cache`
with the same arguments rewrites exactly the missing and damaged shards, after which `bae cache --verify`
passes (real model, real local Ray, the `bae` command in-process)."""

import json
import re
import shlex

import numpy as np
import pytest
import yaml

from bae_core.data.cache import (
    CacheError,
    HookpointInfo,
    build_table,
    damaged_shards,
    load_manifest,
    open_cache,
    open_filesystem,
    verify_cache,
    write_shard,
)
from ray_jobs.cache_job import run_cache
from ray_jobs.cli import main
from ray_jobs.spec import parse_spec

HOOKS = ["layers.3.mlp", "layers.5"]


def mtimes(root) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("shard-*.parquet")}


def error_line(capsys, command: str) -> str:
    """The one `bae COMMAND: error:` line the command printed, without the prefix."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"bae {command}: error: ")]
    assert len(lines) == 1, err[-3000:]
    return lines[0].removeprefix(f"bae {command}: error: ")


@pytest.fixture(scope="module")
def sweep_run(local_ray, tmp_path_factory):
    """A finished one-trial sweep on layers.3.mlp whose cache also holds layers.5."""
    from conftest import sweep_spec

    folder = tmp_path_factory.mktemp("repair")
    spec = sweep_spec(
        folder / "run",
        folder / "cache",
        cache={"hookpoints": HOOKS},
        space={"hookpoint": ["layers.3.mlp"], "activation": ["topk"], "kind": ["sae"]},
        training={"steps": 10, "checkpoint_every": 10},
        scoring={"trial_latents": 0},
    )
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["sweep", str(path), "--quiet"]) == 0
    return path, folder / "run", folder / "cache"


def test_a_damaged_cache_is_refused_by_sweep_train_and_score_and_bae_cache_repairs_it(sweep_run, tmp_path, capsys):
    spec, run, root = sweep_run
    manifest = load_manifest(str(root))
    damaged = next(s for s in manifest.shards if (s.split, s.hookpoint, s.unit) == ("train", "layers.5", 1))
    sibling = next(s for s in manifest.shards if (s.split, s.hookpoint, s.unit) == ("train", "layers.3.mlp", 1))
    path = root / damaged.path
    path.write_bytes(path.read_bytes()[: damaged.bytes // 2])
    before = mtimes(root)
    capsys.readouterr()

    # Every command that reads the cache names the shard, what is wrong and the repair, in one line.
    expected = f"cache shard {root}/{damaged.path} is corrupt or truncated ({damaged.bytes // 2} bytes, expected "
    assert main(["sweep", str(spec), "--quiet"]) == 2
    line = error_line(capsys, "sweep")
    assert line.startswith(expected), line
    # The sweep's cache is described by its spec: the message gives the `bae cache` command line that repairs it.
    repair = re.search(r"; run `(bae cache [^`]+)`: it rewrites missing and damaged shards", line)
    assert repair, line
    assert main(["train", str(root), "--hookpoint", "layers.3.mlp", "--out", str(tmp_path / "t"), "--steps", "2"]) == 2
    assert error_line(capsys, "train").startswith(expected)
    assert main(["score", str(run), "--min-examples", "5", "--fidelity-tokens", "64"]) == 2
    assert error_line(capsys, "score").startswith(expected)
    assert not (run / "scores").exists()  # refused before any task ran
    assert mtimes(root) == before

    # The repair rewrites that shard and nothing else (not even its unit's shard of the other hookpoint).
    assert main(shlex.split(repair.group(1))[1:]) == 0
    after = mtimes(root)
    assert after[damaged.path] != before[damaged.path]
    assert {p: t for p, t in after.items() if p != damaged.path} == {
        p: t for p, t in before.items() if p != damaged.path
    }
    assert after[sibling.path] == before[sibling.path]
    capsys.readouterr()
    assert main(["cache", str(root), "--verify"]) == 0
    assert f"{len(manifest.shards)} shards verified" in capsys.readouterr().out
    assert main(["sweep", str(spec), "--quiet"]) == 0  # finished: nothing to train again

    # Damage that keeps the size is found by --verify, which says to delete the file; `bae cache` then rewrites it.
    other = next(s for s in manifest.shards if (s.split, s.hookpoint, s.unit) == ("heldout", "layers.3.mlp", 0))
    data = bytearray((root / other.path).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (root / other.path).write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["cache", str(root), "--verify"]) == 2
    line = error_line(capsys, "cache")
    assert line.startswith(
        f"cache shard {root}/{other.path} is corrupt (its sha256 is not the manifest's); delete it and run `bae cache` "
        "again with the same arguments: it rewrites missing and damaged shards"
    )
    (root / other.path).unlink()
    assert main(["sweep", str(spec), "--quiet"]) == 2
    assert error_line(capsys, "sweep").startswith(f"cache shard {root}/{other.path} is missing; run `bae cache ")
    assert main(shlex.split(repair.group(1))[1:]) == 0
    assert main(["cache", str(root), "--verify"]) == 0
    assert verify_cache(str(root)) == len(manifest.shards)
    assert load_manifest(str(root)).shards_of("heldout", "layers.3.mlp")[0].sha256 == other.sha256  # the same data


def test_bae_cache_with_checksums_rewrites_a_shard_whose_content_changed(sweep_run):
    _, _, root = sweep_run
    manifest = open_cache(str(root))
    record = manifest.shards_of("train", "layers.3.mlp")[0]
    data = bytearray((root / record.path).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (root / record.path).write_bytes(bytes(data))
    assert open_cache(str(root)) == manifest  # the size is right: only a full read finds it
    request = parse_spec(yaml.safe_load((root.parent / "spec.yaml").read_text())).cache_request()
    assert run_cache(request) == manifest  # nor does a plain `bae cache`
    with pytest.raises(CacheError, match="is corrupt \\(its sha256 is not the manifest's\\)"):
        verify_cache(str(root))
    run_cache(request, checksums=True)
    assert verify_cache(str(root)) == len(manifest.shards)


def test_open_cache_checks_sizes_from_one_listing_and_counts_the_damage(tmp_path):
    from test_cache_format import manifest, tokens

    root = str(tmp_path / "cache")
    fs, base = open_filesystem(root)
    table = build_table(*tokens(2, 4), {"output": np.zeros((8, 3))}, "float32")
    records = [write_shard(fs, base, "train", "layers.9.mlp", unit, table) for unit in range(3)]
    m = manifest(hookpoints={"layers.9.mlp": HookpointInfo({"output": 3})}, shards=records, complete=True)
    m.save(fs, base)
    assert open_cache(root).shards == records and damaged_shards(root, m) == []
    (tmp_path / "cache" / records[0].path).unlink()
    (tmp_path / "cache" / records[2].path).write_bytes(b"x")
    with pytest.raises(CacheError) as err:
        open_cache(root)
    assert str(err.value) == (
        f"cache shard {root}/{records[0].path} is missing (and 1 more damaged shards); run `bae cache` again with the "
        "same arguments: it rewrites missing and damaged shards"
    )
    assert [problem for _, problem in damaged_shards(root, m)] == [
        "is missing",
        f"is corrupt or truncated (1 bytes, expected {records[2].bytes})",
    ]
    # The manifest records each shard's size (and always has): nothing to add to an older manifest.
    assert all(s["bytes"] > 0 for s in json.loads((tmp_path / "cache" / "manifest.json").read_text())["shards"])
