"""Reading ahead (`iter_activation_batches(prefetch=n)`, `bae_core.data.reader.Prefetcher`) on cache shards written
by the cache's own writer: the same batches in the same order, the reader's errors raised in the consumer, no
thread left behind however the consumer stops; and benchmarks/reader_overlap.py in its CI-sized form on the cache
`bae study` made."""

import gc
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bae_core.data.cache import CacheError, CacheManifest, HookpointInfo, build_table, open_filesystem, write_shard
from bae_core.data.reader import Prefetcher, iter_activation_batches

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import reader_overlap  # noqa: E402

HOOK = "layers.9.mlp"


def float16_cache(root: str, shards: int = 6, rows: int = 32, width: int = 5) -> None:
    """A finished float16 cache of random activations (an odd width: the last packed word holds one value)."""
    fs, base = open_filesystem(root)
    m = CacheManifest(
        model="embedded:SmolLM2-135M-Instruct",
        revision="abc",
        dataset="embedded",
        hookpoints={HOOK: HookpointInfo({"input": width, "output": width})},
        dtype="float16",
        seq_len=4,
        sequences_per_unit=rows // 4,
        heldout_fraction=0.1,
        seed=0,
        max_tokens={"train": shards * rows, "heldout": 0},
        complete=True,
    )
    rng = np.random.default_rng(0)
    for unit in range(shards):
        positions = np.arange(rows).reshape(rows // 4, 4)
        tokens = (np.arange(rows // 4), positions, np.full(positions.shape, "doc"), positions)
        acts = {name: rng.normal(size=(rows, width)).astype(np.float32) for name in ("input", "output")}
        m.add(write_shard(fs, base, "train", HOOK, unit, build_table(*tokens, acts, "float16")))
    m.save(fs, base)


def as_list(batches) -> list[tuple[torch.Tensor, ...]]:
    return [b if isinstance(b, tuple) else (b,) for b in batches]


def same(first, second) -> bool:
    return len(first) == len(second) and all(
        all(torch.equal(u, v) for u, v in zip(a, b, strict=True)) for a, b in zip(first, second, strict=True)
    )


def prefetch_threads() -> int:
    return sum(t.name == "bae-prefetch" for t in threading.enumerate())


def wait_for(condition, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_prefetched_batches_are_the_unprefetched_ones(tmp_path):
    root = str(tmp_path)
    float16_cache(root)
    before = threading.active_count()
    settings = [
        dict(batch_size=7, epochs=2, shuffle_shards=2),  # windows of 2 shards, leftovers carried across
        dict(batch_size=7, epochs=2, transcoder=True, shuffle_seed=3),
        dict(batch_size=20, shuffle_seed=None),  # stored order
    ]
    for kw in settings:
        plain = as_list(iter_activation_batches(root, HOOK, **kw))
        assert len(plain) >= 10
        for depth in (1, 3):
            assert same(as_list(iter_activation_batches(root, HOOK, prefetch=depth, **kw)), plain), (kw, depth)
    # Every stream ran to its end: each thread closed its reader and returned.
    assert wait_for(lambda: threading.active_count() == before)
    with pytest.raises(ValueError, match=r"prefetch: must be an integer >= 0 \(batches read ahead; 0: none\), got -1"):
        iter_activation_batches(root, HOOK, prefetch=-1)


def test_a_corrupt_shard_is_raised_in_the_consumer_after_the_batches_before_it(tmp_path):
    root = str(tmp_path)
    float16_cache(root)
    shard = sorted(Path(root, "train", HOOK).glob("*.parquet"))[3]
    shard.write_bytes(b"\0" * shard.stat().st_size)  # the size the manifest expects: only a read finds it
    kw = dict(batch_size=16, shuffle_seed=None)  # stored order: shards 0-2 give 6 batches, then shard 3 fails

    def read(prefetch):
        got = []
        with pytest.raises(CacheError) as err:
            for batch in iter_activation_batches(root, HOOK, prefetch=prefetch, **kw):
                got.append((batch,))
        return got, err.value

    plain, plain_err = read(0)
    ahead, ahead_err = read(2)
    assert len(plain) == 6 and same(ahead, plain)
    assert str(ahead_err) == str(plain_err) and "shard-00003.parquet is corrupt or truncated" in str(ahead_err)
    assert wait_for(lambda: prefetch_threads() == 0)

    # Any exception of the source reaches the consumer as the same object, then the stream is over.
    class Boom(RuntimeError):
        pass

    boom = Boom("reader failed at item 2")

    def source():
        yield 0
        yield 1
        raise boom

    items = Prefetcher(source(), 4)
    assert [next(items), next(items)] == [0, 1]
    with pytest.raises(Boom) as raised:
        next(items)
    assert raised.value is boom and list(items) == []


def test_stopping_early_leaves_no_thread_and_reads_at_most_depth_ahead(tmp_path):
    root = str(tmp_path)
    float16_cache(root)
    before = threading.active_count()

    # close() on an endless stream: the thread has ended when it returns.
    endless = iter_activation_batches(root, HOOK, batch_size=8, epochs=None, prefetch=2)
    assert [len(next(endless)) for _ in range(5)] == [8] * 5
    endless.close()
    assert threading.active_count() == before
    with pytest.raises(StopIteration):
        next(endless)

    # A training loop that stops pulling and drops the stream (a function returns; garbage collection).
    def train_a_little():
        for step, _ in enumerate(iter_activation_batches(root, HOOK, batch_size=8, epochs=None, prefetch=3)):
            if step == 4:
                return

    train_a_little()
    gc.collect()
    assert wait_for(lambda: threading.active_count() == before)
    with iter_activation_batches(root, HOOK, batch_size=8, epochs=None, prefetch=2) as stream:
        next(stream)
    assert threading.active_count() == before

    # The thread makes at most `depth` items the consumer has not taken, and closes its source on the way out.
    made, closed = [], threading.Event()

    def counting():
        try:
            while True:
                made.append(len(made))
                yield made[-1]
        finally:
            closed.set()

    source = counting()  # still referenced after the stream goes: only the thread's close() runs its `finally`
    ahead = Prefetcher(source, 3)
    assert wait_for(lambda: len(made) == 3)
    time.sleep(0.2)
    assert len(made) == 3  # blocked: three made, none taken
    assert next(ahead) == 0 and wait_for(lambda: len(made) == 4) and len(made) == 4
    del ahead
    gc.collect()
    assert closed.wait(5) and wait_for(lambda: threading.active_count() == before)


def test_the_reader_overlap_benchmark_runs_on_a_real_cache(quickstart_run, tmp_path, capsys):
    run, _ = quickstart_run
    out = tmp_path / "overlap.json"
    args = ["--cache", str(run / "cache"), "--small", "--precisions", "fp32", "--prefetch", "2,4", "--out", str(out)]
    assert reader_overlap.main(args) == 0
    printed = capsys.readouterr().out
    assert "prefetch=2: batches identical to unprefetched ones: yes" in printed and "(a)/(c) =" in printed
    result = json.loads(out.read_text())
    feeds = [r["feed"] for r in result["rows"]]
    assert feeds == ["(a) reader", "(b) prefetch=2", "(b) prefetch=4", "(c) memory", "read alone"]
    assert all(r["s_per_step"] > 0 and r["steps"] == 2 * 3 for r in result["rows"])
    reference = result["rows"][3]
    assert reference["ratio_vs_memory"] == 1 and reference["wait_s_per_step"] < result["rows"][0]["wait_s_per_step"]
    assert reader_overlap.main(["--cache", str(tmp_path / "missing")]) == 2
