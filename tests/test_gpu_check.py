"""benchmarks/gpu_check.py, the one script a lent GPU runs, in its CI-sized form on the CPU: every activation's
forward and backward against fp32, the throughput table against sparsify and the bare matmul, and a coder spliced
into a random Llama-shaped model."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import gpu_check  # noqa: E402

from bae_core import ACTIVATIONS  # noqa: E402


def test_the_gpu_check_runs_on_the_cpu_and_every_check_passes(tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--device", "cpu", "--small", "--steps", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert all(f"({part})" in printed for part in "abcd") and "0 check(s) failed" in printed
    tables = json.loads(out.read_text())
    checks = tables["activations"]
    assert {r["activation"] for r in checks} == set(ACTIVATIONS) and len(checks) == len(ACTIVATIONS) * 2 * 2
    assert all(r["ok"] for r in checks)
    # fp32 on the same device is the reference itself; bf16 is not, and must differ from it a little.
    assert all(r["output_rel_err"] == 0 for r in checks if r["precision"] == "fp32")
    assert all(r["output_rel_err"] > 0 for r in checks if r["precision"] == "bf16")
    variants = {r["variant"] for r in tables["throughput"]}
    assert variants == {"bare encoder matmul", "sparsify topk", "bae_core topk", "bae_core binary_topk"}
    assert all(r["tokens_per_s"] > 0 for r in tables["throughput"])
    topk = tables["topk"]  # one row per k, at the largest batch that fits (the CPU's memory holds 1,024 x 512)
    assert [(r["k"], r["batch"], r["over_2^31"]) for r in topk] == [(8, 1024, False), (32, 1024, False)]
    assert all(r["ok"] and r["values_agree"] == 1 for r in topk)
    splice = {r["variant"]: r for r in tables["splice"]}
    assert set(splice) == {"clean", "spliced", "zero_ablated"} and all(r["ok"] for r in splice.values())
    assert splice["spliced"]["kl_cpu"] > 0  # the spliced coder changes the model's predictions
