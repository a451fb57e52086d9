"""Activation-cache I/O on one core: writing shards (the cache job's side) and reading + decoding batches (a trial's).

Builds a temporary cache of one MLP hookpoint (input and output columns, width `--width`, synthetic activations
from a fixed seed) with bae_core's own writer (`build_table`, `write_shard`, the manifest), once in float16 (bits
packed in uint32) and once in float32, and times on one thread (pyarrow's CPU pool, torch and numpy's callers set
to 1), in the same run:

- write side, per shard: **bare write** (the shard's bytes into a file: the reference) against **write_shard**
  (packing by `build_table`, parquet, sha256 and the atomic write the cache actor does for each hookpoint);
- read side, per epoch: **bare parquet read** (`pq.read_table` of the columns, no shuffle, no decode: the
  reference) against **reader** (`iter_activation_batches`: a shuffled window of shards, decoded batch by batch
  into float32 tensors), for an SAE (reads `output`) and for a transcoder (reads `input` and `output`);
- the bytes per row on disk against the raw activation bytes: the parquet overhead.

After a warm-up round, the variants take turns (A, B, A, B ...) `--repeats` times; the median and the range are
printed, with the rates `ray_jobs/rates.py` quotes (rows/s per core of the reader, MB/s per core of write_shard).
Nothing is asserted. Results go to benchmarks/results/io_throughput.json.

    .venv/bin/python benchmarks/io_throughput.py              # 4 shards x 16,384 rows, width 576, ~1 min on 2 cores
    .venv/bin/python benchmarks/io_throughput.py --shards 2 --rows 1024 --repeats 1 --width 64   # CI-sized
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from bae_core.data.cache import CacheManifest, HookpointInfo, build_table, open_filesystem, write_shard
from bae_core.data.reader import iter_activation_batches

RESULTS = Path(__file__).parent / "results" / "io_throughput.json"
HOOKPOINT = "layers.9.mlp"
SEQ_LEN = 128


def make_inputs(shards: int, rows: int, width: int) -> list[dict]:
    """Per shard, the token columns and the two activation columns (MLP-output-like scale, float32)."""
    rng = np.random.default_rng(0)
    out = []
    for unit in range(shards):
        n = rows // SEQ_LEN
        out.append(
            {
                "seq_index": np.arange(unit * n, (unit + 1) * n),
                "token_ids": rng.integers(0, 49152, (n, SEQ_LEN)),
                "doc_id": np.repeat(np.arange(n) // 4, SEQ_LEN).reshape(n, SEQ_LEN).astype(str),
                "doc_position": np.tile(np.arange(SEQ_LEN), (n, 1)),
                "activations": {
                    c: rng.standard_normal((n * SEQ_LEN, width), dtype=np.float32) * rng.uniform(0.1, 3, width)
                    for c in ("input", "output")
                },
            }
        )
    return out


def write_cache(root: str, inputs: list[dict], dtype: str, width: int) -> tuple[CacheManifest, list[float]]:
    """The cache written with write_shard (the cache actor's call), and the seconds of each shard."""
    fs, base = open_filesystem(root)
    manifest = CacheManifest(
        model="synthetic", revision=None, dataset="synthetic",
        hookpoints={HOOKPOINT: HookpointInfo({"input": width, "output": width})},
        dtype=dtype, seq_len=SEQ_LEN, sequences_per_unit=len(inputs[0]["seq_index"]), heldout_fraction=0.1, seed=0,
        max_tokens={"train": None, "heldout": None},
    )  # fmt: skip
    seconds = []
    for unit, s in enumerate(inputs):
        start = time.perf_counter()
        table = build_table(s["seq_index"], s["token_ids"], s["doc_id"], s["doc_position"], s["activations"], dtype)
        manifest.add(write_shard(fs, base, "train", HOOKPOINT, unit, table))
        seconds.append(time.perf_counter() - start)
    manifest.complete = True
    manifest.save(fs, base)
    return manifest, seconds


def bare_write(folder: Path, manifest: CacheManifest) -> list[float]:
    """Seconds to write each shard's number of bytes (random, so nothing compresses) into a plain file."""
    seconds = []
    for record in manifest.shards:
        data = np.random.default_rng(record.unit).bytes(record.bytes)
        start = time.perf_counter()
        (folder / f"bare-{record.unit}").write_bytes(data)
        seconds.append(time.perf_counter() - start)
    return seconds


def bare_read(root: str, manifest: CacheManifest, columns: list[str]) -> float:
    start = time.perf_counter()
    for record in manifest.shards:
        pq.read_table(f"{root}/{record.path}", columns=columns)
    return time.perf_counter() - start


def reader_epoch(root: str, manifest: CacheManifest, transcoder: bool, batch_size: int) -> float:
    start = time.perf_counter()
    for batch in iter_activation_batches(
        root, HOOKPOINT, batch_size=batch_size, transcoder=transcoder, manifest=manifest, shuffle_shards=2
    ):
        del batch
    return time.perf_counter() - start


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):,.0f} [{min(values):,.0f}-{max(values):,.0f}]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--rows", type=int, default=16384, help="rows (tokens) per shard, a multiple of 128")
    parser.add_argument("--width", type=int, default=576)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    torch.set_num_threads(1)
    rows = args.shards * (args.rows // SEQ_LEN * SEQ_LEN)
    inputs = make_inputs(args.shards, args.rows, args.width)
    result = {"config": vars(args) | {"out": str(args.out), "rows": rows, "machine": platform.machine()}, "dtypes": {}}
    print(f"{rows:,} rows of width {args.width} (input and output), {args.shards} shards; 1 thread; "
          f"{args.repeats} repeats, median [min-max]")  # fmt: skip
    for dtype in ("float16", "float32"):
        with tempfile.TemporaryDirectory(prefix="bae-io-") as tmp:
            times: dict[str, list[float]] = {}
            for r in range(args.repeats + 1):  # the first round warms up and is not kept
                root = f"{tmp}/cache-{r}"
                manifest, written = write_cache(root, inputs, dtype, args.width)
                round_ = {"write_shard": sum(written), "bare write": sum(bare_write(Path(tmp), manifest))}
                round_["bare parquet read, output"] = bare_read(root, manifest, ["output"])
                round_["reader, SAE (output)"] = reader_epoch(root, manifest, False, args.batch_size)
                round_["bare parquet read, input+output"] = bare_read(root, manifest, ["input", "output"])
                round_["reader, transcoder (input+output)"] = reader_epoch(root, manifest, True, args.batch_size)
                for name, seconds in round_.items() if r else ():
                    times.setdefault(name, []).append(seconds)
                if r < args.repeats:
                    for f in Path(root).rglob("*.parquet"):
                        f.unlink()
            disk = sum(s.bytes for s in manifest.shards)
            per_col = (-(-args.width // 2) * 4) if dtype == "float16" else args.width * 4
        print(f"\n{dtype}: {disk / rows:,.1f} bytes per row on disk, {2 * per_col:,} of activations "
              f"(+{disk / rows - 2 * per_col:.1f} bytes, {disk / (rows * 2 * per_col) - 1:+.2%})")  # fmt: skip
        print(f"  {'row':36s} {'seconds':>8s} {'rows/s':>24s} {'MB/s':>8s}  vs reference")
        table = {}
        for name, secs in times.items():
            ref = {"write_shard": "bare write", "reader, SAE (output)": "bare parquet read, output"}.get(name)
            ref = ref or {"reader, transcoder (input+output)": "bare parquet read, input+output"}.get(name)
            ratio = statistics.median(secs) / statistics.median(times[ref]) if ref else 1.0
            rates = [rows / s for s in secs]
            mbs = disk / statistics.median(secs) / 1e6
            table[name] = {"seconds": secs, "rows_per_s": rates, "mb_per_s_of_shard": mbs, "x_reference": ratio}
            print(f"  {name:36s} {statistics.median(secs):8.2f} {spread(rates):>24s} {mbs:8.0f}  {ratio:.2f}x")
        result["dtypes"][dtype] = {"bytes_per_row": disk / rows, "activation_bytes_per_row": 2 * per_col, **table}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {args.out} (cpu count {os.cpu_count()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
