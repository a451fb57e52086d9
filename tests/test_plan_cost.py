"""The cost `bae sweep --dry-run` prints: tokens, forward passes, storage, reads, FLOPs and hours, checked against
hand computations; the paper's figures; a GPU rate measured by benchmarks/gpu_check.py replaces the assumed one."""

import json
import sys
from pathlib import Path

import pytest
import torch

from ray_jobs import rates as R
from ray_jobs.cost import Shape, describe_cost, resolve_shape, sweep_cost
from ray_jobs.plan import describe_plan
from ray_jobs.spec import load_spec, parse_spec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def small(**sections) -> dict:
    """A grid spec on layers.3.mlp; each section given is merged into the default one (`space` replaces it)."""
    spec = {
        "name": "t",
        "cache": {"hookpoints": ["layers.3.mlp"], "seq_len": 32, "train_tokens": 1024, "heldout_tokens": 256},
        "coder": {"expansion_factor": 2},
        "space": {"activation": ["topk", "binary_topk"], "k": [4, 8]},
        "training": {"steps": 20, "batch_size": 64, "checkpoint_every": 10},
    }
    for key, value in sections.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) and key != "space" else value
    return spec


# MLP input 6 wide, output 10: an SAE reads `output` (d_in = d_out = 10), a transcoder `input` -> `output`.
WIDTHS = {"layers.3.mlp": {"input": 6, "output": 10}}


def small_spec(tmp_path):
    return parse_spec(
        small(
            output=str(tmp_path / "run"),
            cache={"train_tokens": 1000, "heldout_tokens": 256, "sequences_per_unit": 8, "batch_size": 3},
            space={"activation": ["topk"], "kind": ["sae", "skip_transcoder"], "k": [4, 8]},
            train={"precision": "bf16"},
            resources={"coders_per_trial": 2, "cpus_per_worker": 2},
        )
    )


def test_the_cost_of_a_small_spec_is_the_hand_computation(tmp_path):
    spec = small_spec(tmp_path)
    shape = Shape(WIDTHS, "test", num_layers=4, d_model=8, d_mlp=16)
    rate = R.Rate(1e6, "FLOP/s per thread", "given")
    cost = sweep_cost(spec, shape, train_rate=rate, forward_rate=rate)
    # 1000 // 32 = 31 train sequences (992 tokens), 256 // 32 = 8 held-out (256). Units of 8 sequences, 3 per
    # forward: train 3 full units x 3 passes + 7 sequences in 3 passes = 12; held-out 1 unit x 3 = 3.
    assert (cost.train_sequences, cost.heldout_sequences, cost.tokens, cost.forward_passes) == (31, 8, 1248, 15)
    # float16 packed in uint32: input 6 -> 3 x 4 = 12 bytes, output 10 -> 20 bytes; + the parquet overhead.
    assert cost.bytes_per_token == {"layers.3.mlp": 32 + R.PARQUET_ROW_OVERHEAD.value}
    assert cost.storage_bytes == pytest.approx(1248 * 37.5)
    # Through layers 0-3 (4 layers), seq_len 32: 4 x (2 (4 x 8^2 + 3 x 8 x 16) + 2 x 32 x 8) = 7168 per token.
    assert (cost.layers_run, cost.forward_flops_per_token) == (4, 7168)
    # One stream (layers.3.mlp, seed 0), two coders per trial in grid order: [sae k4, sae k8], [skip k4, skip k8].
    # 20 x 64 = 1280 tokens per trial; the SAEs read output (20 B), the transcoders input + output (32 B).
    assert [(t.coders, t.columns, t.read_bytes) for t in cost.trials] == [
        (2, ("output",), 1280 * 20),
        (2, ("input", "output"), 1280 * 32),
    ]
    # FLOPs per token, 2 M d_in + 2 k d_in + 6 k d_out (+ 4 d_in d_out for the skip), M = 2 x d_in:
    # sae k4: 400 + 80 + 240 = 720; sae k8: 400 + 160 + 480 = 1040;
    # skip k4: 144 + 48 + 240 + 240 = 672; skip k8: 144 + 96 + 480 + 240 = 960.
    assert cost.training_flops == (720 + 1040 + 672 + 960) * 1280
    # 2 threads per trial at 1 MFLOP/s each; reading on one core at the float16 reader's rate.
    one, two = R.READ_DECODE["float16"][1].value, R.READ_DECODE["float16"][2].value  # rows/s reading 1 or 2 columns
    assert cost.trials[0].compute_s == pytest.approx(1760 * 1280 / 2e6)
    assert cost.trials[1].compute_s == pytest.approx(1632 * 1280 / 2e6)
    assert [t.read_s for t in cost.trials] == pytest.approx([1280 / one, 1280 / two])
    busy, overlapped, serial = cost.device_hours()
    assert busy == pytest.approx((1.1264 + 1.04448) * 2 / 3600)
    assert overlapped == busy  # these reads are far quicker than the arithmetic
    assert serial == pytest.approx(busy + (1280 / one + 1280 / two) * 2 / 3600)
    assert cost.write_s == pytest.approx(1248 * 37.5 / R.SHARD_WRITE.value)
    assert cost.forward_s == pytest.approx(7168 * 1248 / 1e6)  # the cache's 1 CPU per actor

    text = " ".join(" ".join(describe_cost(spec, shape, train_rate=rate, forward_rate=rate)).split())  # unwrapped
    for figure in ("1,248 tokens", "992 train + 256 held-out", "15 forward passes", "7.2 kFLOP per token",
                   "37.5 bytes/token", "in all 46.8 kB", "1 read output (25.6 kB each)",
                   "1 read input + output (41.0 kB each)", "4.3 MFLOP counted", "0.0012 CPU core-hours computing",
                   "compute is the bound", "sae 0.7-1.0 kFLOP", "1.0 MFLOP/s per thread: given"):  # fmt: skip
        assert figure in text, figure


def test_the_plan_says_when_widths_or_tokens_are_unknown_and_optuna_is_not_estimated(tmp_path):
    spec = small_spec(tmp_path)
    plan = describe_plan(spec, None)
    assert "1,248 tokens" in plan and "give --d-model N" in plan and "core-hours" not in plan
    everything = parse_spec(small(output=str(tmp_path / "run"), cache={"train_tokens": None}))
    assert "known only once tokenised" in describe_plan(everything, WIDTHS)
    optuna = parse_spec(
        small(output=str(tmp_path / "run"), space={"k": {"int": [4, 8]}}, search={"algorithm": "optuna"})
    )
    plan = " ".join(describe_plan(optuna, WIDTHS).split())
    assert "in all 48.0 kB" in plan and "optuna: each trial's size is sampled" in plan


def test_the_papers_cost_by_hand():
    spec = load_spec(ROOT / "sweeps" / "paper_smollm2_135m.yaml")
    shape = resolve_shape(spec)
    assert shape.num_layers == 30 and shape.widths["layers.9.mlp"] == {"input": 576, "output": 576}
    cost = sweep_cost(spec, shape)
    # 50M // 2048 = 24,414 sequences, 1M // 2048 = 488; 381 full units of 64 (2 forwards of 32) + 30 sequences
    # (1 forward), 7 held-out units + 40 sequences (2 forwards).
    assert (cost.tokens, cost.forward_passes) == (24_902 * 2048, 381 * 2 + 1 + 7 * 2 + 2)
    # 4 hookpoints x (input + output, 576 wide in float16: 2 x 1152 bytes + 5.5) per token: about 471 GB.
    assert cost.storage_bytes == pytest.approx(4 * 2309.5 * 50_999_296) and 471e9 < cost.storage_bytes < 472e9
    # 24 trials (4 hookpoints x 3 seeds x 2 groups of 8) of 3,000 x 65,536 tokens: a stream's 8 SAEs read the output,
    # its 8 skip transcoders input + output.
    assert (
        len(cost.trials) == 24 and [t.read_bytes for t in cost.trials] == [196_608_000 * 1152, 196_608_000 * 2304] * 12
    )
    assert [t.columns for t in cost.trials[:2]] == [("output",), ("input", "output")]
    # Per 16 coders of a stream: 16 x 2 x 36,864 x 576 + 4 x (2 + 6) x 576 x (16 + 32 + 64 + 128) + 8 x 4 x 576^2.
    assert cost.training_flops == 12 * 196_608_000 * (16 * 42_467_328 + 4 * 4608 * 240 + 8 * 1_327_104)
    busy, overlapped, _ = cost.device_hours()
    if R.gpu_train_rate("bf16").assumed:
        assert busy == pytest.approx(cost.training_flops / 98.9e12 / 3600)  # 4.6 GPU-hours
        # Reading 65,536 rows of input and output per step on one core outlasts 8 transcoders' arithmetic.
        assert all(t.read_s > t.compute_s for t in cost.trials[1::2])
        held = sum(max(t.read_s, t.compute_s) for t in cost.trials)
        assert overlapped == pytest.approx(held / 3600)
        two = 3000 * 65536 / R.READ_DECODE["float16"][2].value
        assert all(t.read_s == pytest.approx(two) for t in cost.trials[1::2])


def test_a_gpu_rate_measured_by_gpu_check_replaces_the_assumption(tmp_path):
    import gpu_check

    # Throughput rows as benchmarks/gpu_check.py writes them (here measured on the CPU at a tiny shape), under a
    # GPU's name: the rate is the median over bae_core's rows of tokens/s x the FLOPs counted for that shape.
    shape = {"d_in": 16, "latents": 64}
    rows = gpu_check.measure_throughput(torch.device("cpu"), 16, 64, [4], [256], steps=1)
    results = tmp_path / "gpu_check.json"
    results.write_text(json.dumps({"meta": {"device": "NVIDIA H200", "shape": shape}, "throughput": rows}))
    rate = R.gpu_train_rate("bf16", results)
    ours = [r for r in rows if r["variant"].startswith("bae_core")]
    flops = 2 * 64 * 16 + 2 * 4 * 16 + 6 * 4 * 16
    assert len(ours) == 2 and not rate.assumed and "NVIDIA H200" in rate.source
    assert rate.value == pytest.approx(sum(r["tokens_per_s"] for r in ours) / 2 * flops)
    assert R.gpu_train_rate("fp32", results).assumed  # gpu_check measures bf16 only
    results.write_text(json.dumps({"meta": {"device": "cpu", "shape": shape}, "throughput": rows}))
    assert R.gpu_train_rate("bf16", results).assumed  # a CPU's run says nothing about a GPU


def test_the_io_benchmark_runs_at_ci_size(tmp_path, capsys):
    import io_throughput

    out = tmp_path / "io.json"
    assert (
        io_throughput.main(["--shards", "2", "--rows", "256", "--width", "16", "--repeats", "1", "--out", str(out)])
        == 0
    )
    result = json.loads(out.read_text())["dtypes"]
    # float16: 2 columns x 8 uint32 = 64 bytes of activations per row, float32 twice that; parquet adds a little.
    assert result["float16"]["activation_bytes_per_row"] == 64 and result["float32"]["activation_bytes_per_row"] == 128
    assert all(64 < r["bytes_per_row"] < 64 * 3 for r in result.values())
    assert all(min(r["reader, SAE (output)"]["rows_per_s"]) > 0 for r in result.values())
    assert "bytes per row on disk" in capsys.readouterr().out


def test_the_command_line_takes_a_width_and_a_training_rate(capsys):
    from ray_jobs.cli import main

    paper = str(ROOT / "sweeps" / "paper_smollm2_135m.yaml")
    assert main(["sweep", paper, "--dry-run", "--d-model", "576", "--tflops", "250"]) == 0
    raw = capsys.readouterr().out
    out = " ".join(raw.split())
    # 1.641e18 counted FLOPs at 250 TFLOP/s: 1.8 GPU-hours; the forward needs the layers, which a width does not give.
    assert (
        "widths --d-model 576" in out
        and "1.8 GPU-hours computing" in out
        and "250 TFLOP/s per GPU: given: --tflops 250" in out
    )
    assert "in all 471 GB" in out and "the forward passes need the model's layers" in out
    # Memory (schedule-free sign-SGD in bf16): 4 + 4 + 4 + 2 bytes per parameter (weight, gradient, z, the bf16
    # copy) and per batch row and latent the bf16 pre-activations, twice for binary_topk (its scores).
    sae, skip, rows = 42_504_768, 42_836_544, 65_536 * 36_864
    table = {line.split()[0]: line.split() for line in raw.splitlines() if line[:5].strip().isdigit()}
    assert table["1"][2:4] == ["binary_topk", "sae"] and table["1"][7:9] == [
        f"{(14 * sae + 4 * rows) / 2**30:.1f}",
        "GiB",
    ]
    assert table["13"][2:4] == ["binary_topk", "skip_transcoder"] and table["13"][7] == "9.6"
    assert (
        table["190"][2:4] == ["topk", "skip_transcoder"] and table["190"][7] == f"{(14 * skip + 2 * rows) / 2**30:.1f}"
    )
    # A trial of 8 skip transcoders holds their weights and state, and one binary_topk step at a time.
    peak = 14 * 8 * skip + 4 * rows
    assert f"one coder's step at a time: up to {peak / 2**30:.1f} GiB" in out and "13.5 GiB" in out
    for bad in (["--d-model", "0"], ["--tflops", "0"]):
        assert main(["sweep", paper, "--dry-run", *bad]) == 2
        assert f"bae sweep: error: {bad[0]}: must be a positive" in capsys.readouterr().err
    quick = str(ROOT / "sweeps" / "quickstart.yaml")  # the embedded model's config (or a cache) says 576
    assert main(["sweep", quick, "--dry-run", "--d-model", "512"]) == 2
    assert "--d-model: 512, but" in capsys.readouterr().err
