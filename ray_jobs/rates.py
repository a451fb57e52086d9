"""The rates behind `bae sweep --dry-run`'s cost estimate, each with where it comes from.

A rate is either measured (by a script in benchmarks/, on the machine named) or assumed (no measurement exists:
the text says what it is a fraction of). GPU training prefers a measurement: when benchmarks/gpu_check.py has
written benchmarks/results/gpu_check.json on a CUDA device, its training throughput replaces the assumption.
Nothing here imports Ray."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

GPU_CHECK_RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "gpu_check.json"
DEV_MACHINE = "the project's 2-core x86 development machine, shared, torch 2.13 CPU"


@dataclass(frozen=True)
class Rate:
    value: float
    unit: str
    source: str

    @property
    def assumed(self) -> bool:
        return self.source.startswith("assumed")


# ---- CPUs (measured) ----------------------------------------------------------------------------------------
# Quiet-machine figures (load average about 1 on 2 cores); under the other engineers' load the same scripts gave
# 1.5-3x less, as the ranges say.
CPU_MATMUL = {
    "bf16": Rate(
        172e9,
        "FLOP/s per thread",
        "measured: benchmarks/train_throughput.py, the bare encoder matmul in bf16 (4,096 x 576 x 4,608) on 2 threads: "
        f"172, 182 and 146 (loaded) GFLOP/s per thread in 3 runs on {DEV_MACHINE}",
    ),
    "fp32": Rate(
        81e9,
        "FLOP/s per thread",
        f"measured: benchmarks/train_throughput.py, the same matmul in fp32: 83, 81 and 75 (loaded) in 3 runs on "
        f"{DEV_MACHINE}",
    ),
}
CPU_STEP_OVER_MATMUL = {
    "bf16": Rate(
        2.7,
        "x",
        "measured: benchmarks/train_throughput.py, a full training step of a topk or binary_topk SAE over the bare "
        "encoder matmul, bf16: 2.5-3.1x in the same 3 runs",
    ),
    "fp32": Rate(1.85, "x", "measured: benchmarks/train_throughput.py, the same in fp32: 1.7-2.0x in the same 3 runs"),
}
CPU_FORWARD = Rate(
    95e9,
    "FLOP/s per thread",
    "measured: the bare forward of benchmarks/cache_throughput.py (embedded SmolLM2-135M-Instruct in float32, layers "
    "0-9, 4 x 128 tokens) on 1 thread: 95-100 GFLOP/s as ray_jobs/cost.py counts, 5 steps (37-44 under load) on "
    f"{DEV_MACHINE}",
)
READ_DECODE = {
    # {dtype: {columns read: rate}}: reading input and output costs more than twice one column (twice the window).
    "float16": {
        1: Rate(
            309e3,
            "rows/s per core",
            "measured: benchmarks/io_throughput.py, iter_activation_batches (parquet read, shuffle window, float16 "
            "unpacked into float32 tensors) reading one 576-wide column on 1 thread: 307k, 309k and 317k rows/s in 3 "
            f"runs (110k under load) on {DEV_MACHINE}",
        ),
        2: Rate(
            111e3,
            "rows/s per core",
            "measured: benchmarks/io_throughput.py, iter_activation_batches reading input and output (576 wide each, "
            "float16 unpacked into float32 tensors) on 1 thread: 111k, 85k and 153k rows/s in 3 runs (52k under load) "
            f"on {DEV_MACHINE}",
        ),
    },
    "float32": {
        1: Rate(
            134e3, "rows/s per core", "measured: benchmarks/io_throughput.py, a float32 cache, one column: 116-176k"
        ),
        2: Rate(59e3, "rows/s per core", "measured: benchmarks/io_throughput.py, a float32 cache, two columns: 56-59k"),
    },
}
SHARD_WRITE = Rate(
    200e6,
    "B/s of shards per core",
    "measured: benchmarks/io_throughput.py, write_shard (float16 packing, parquet, sha256, the atomic write) on 1 "
    f"thread: 218, 189 and 222 MB/s in 3 runs (128 under load) on {DEV_MACHINE}",
)
PARQUET_ROW_OVERHEAD = Rate(
    5.5,
    "bytes per token per hookpoint",
    "measured: the token columns and list levels beyond the activations' own bytes: 5.3 on the quickstart's cache "
    "(131,072 train tokens, 16 shards, seq_len 128), 4.8 on a 4,096-token cache, 5.7 in benchmarks/io_throughput.py",
)

# ---- GPUs (assumed until benchmarks/gpu_check.py has run) ---------------------------------------------------
H100_DATASHEET = {"bf16": 989e12, "fp32": 67e12}
"""NVIDIA H100 / H200 SXM datasheet, dense (no sparsity): bf16 tensor cores, and fp32 without tensor cores."""
GPU_TRAIN_FRACTION = 0.10
GPU_FORWARD_FRACTION = 0.30


def gpu_train_rate(precision: str, results: Path | None = GPU_CHECK_RESULTS) -> Rate:
    """Counted training FLOP/s of one GPU: measured by benchmarks/gpu_check.py when `results` exists (bf16 only),
    else an assumed fraction of the datasheet."""
    if precision == "bf16" and results is not None and results.is_file():
        measured = measured_gpu_rate(results)
        if measured is not None:
            return measured
    peak = H100_DATASHEET[precision]
    return Rate(
        GPU_TRAIN_FRACTION * peak,
        "FLOP/s per GPU",
        f"assumed: {GPU_TRAIN_FRACTION:.0%} of the H100/H200 datasheet's dense {precision} ({peak / 1e12:,.0f} "
        "TFLOP/s), counted FLOPs only (topk selection and the sparse gathers are memory-bound); this puts a step of "
        "one coder at the paper's shape near 30 ms, inside the 20-40 ms expected (not measured) on an H200; no GPU "
        "measurement yet (benchmarks/gpu_check.py writes one); for another GPU (cluster.yaml's A10G is several "
        "times slower) give --tflops",
    )


def gpu_forward_rate() -> Rate:
    peak = H100_DATASHEET["fp32"]
    return Rate(
        GPU_FORWARD_FRACTION * peak,
        "FLOP/s per GPU",
        f"assumed: {GPU_FORWARD_FRACTION:.0%} of the H100/H200 datasheet's fp32 ({peak / 1e12:,.0f} TFLOP/s; the cache "
        "job runs the model in float32); not measured",
    )


def cpu_train_rate(precision: str) -> Rate:
    """Counted training FLOP/s per thread on a CPU: the bare matmul's rate over the full step's overhead."""
    matmul, ratio = CPU_MATMUL[precision], CPU_STEP_OVER_MATMUL[precision]
    return Rate(
        matmul.value / ratio.value,
        "FLOP/s per thread",
        f"{matmul.value / 1e9:.0f} GFLOP/s per thread over {ratio.value}x; {matmul.source}; {ratio.source}",
    )


def measured_gpu_rate(results: Path) -> Rate | None:
    """Counted FLOP/s from gpu_check.json's throughput table: bae_core's topk and binary_topk steps (bf16), each
    converted with the same FLOP count the plan uses; the median over its rows. None without such rows."""
    from ray_jobs.cost import training_flops

    try:
        data = json.loads(results.read_text())
        shape, meta = data["meta"]["shape"], data["meta"]
        rows = [
            r for r in data["throughput"] if str(r.get("variant", "")).startswith("bae_core ") and "tokens_per_s" in r
        ]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not rows or meta.get("device", "cpu") == "cpu":
        return None
    d, m = shape["d_in"], shape["latents"]
    rates = [r["tokens_per_s"] * training_flops(r["variant"].split()[1], "sae", d, d, m, r["k"]) for r in rows]
    tokens = ", ".join(f"{r['variant'].split()[1]} k {r['k']}: {r['tokens_per_s']:,.0f}" for r in rows)
    return Rate(
        statistics.median(rates),
        "FLOP/s per GPU",
        f"measured: benchmarks/gpu_check.py on {meta['device']} ({results.name}): bf16 SAE steps at d_in {d}, {m:,} "
        f"latents, batch {rows[0]['batch']:,}, tokens/s {tokens}; median over {len(rows)} rows",
    )
