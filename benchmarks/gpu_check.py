"""One script for a lent GPU: bae_core on CUDA checked against the CPU, and training throughput at the paper's shape.

    python benchmarks/gpu_check.py                          # on CUDA, at the paper's shape (under 5 minutes on an H200)
    python benchmarks/gpu_check.py --device cpu --small     # the same checks, CI-sized, on the CPU

It needs torch, safetensors, schedulefree and transformers (and eai-sparsify for the reference throughput; without
it that row says why it is missing); not Ray, optuna, gguf or the embedded model, which a GPU machine may lack.

(a) **CUDA against the CPU.** Every activation, as an SAE and as a skip transcoder: the forward (reconstruction,
    the selected latents, FVU) and the backward (every parameter's gradient) on the device, in fp32 and in bf16
    (autocast), against fp32 on the CPU from the same weights and inputs. Tolerances are stated in the table.
(b) **Throughput at the paper's shape** (36,864 latents, d_in 576, k 32 and 128, bf16): tokens/s of a full
    training step of `topk` and `binary_topk` against sparsify's `SparseCoder` trained the way its trainer does it,
    and against the bare encoder matmul, on the same device; the batch is the largest of 65,536 / 32,768 / ...
    tokens that fits.
(c) **Splicing.** A coder spliced into a small randomly initialised Llama-shaped model: clean, spliced and
    zero-ablated CE, top-1 and KL on the device against the CPU.
(d) **Top-k at the paper's batch.** The top-k the coders use on one whole batch of bf16 pre-activations (65,536 x
    36,864: more than 2^31 entries, torch.topk's 64-bit-index path) against torch.topk on 4,096-row slices.

It prints one table per part and writes them to benchmarks/results/gpu_check.json. The exit status is 1 when a
check of (a), (c) or (d) fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bae_core import ACTIVATIONS, CoderConfig, TrainConfig, Trainer, build_coder  # noqa: E402
from bae_core.coders.config import GROUP_ACTIVATIONS  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "gpu_check.json"
TOLERANCE = {
    # Relative error ||device - cpu|| / ||cpu|| of the reconstruction and of each gradient, and the share of
    # selected latents that must agree (top-k ties and bf16 rounding move a few across the boundary).
    "fp32": {"output": 1e-4, "grad": 1e-3, "fvu": 1e-4, "codes": 0.999},
    # bf16 against fp32: a latent that crosses the top-k boundary moves a whole decoder row into or out of the output.
    "bf16": {"output": 0.2, "grad": 0.2, "fvu": 0.05, "codes": 0.97},
}
SPLICE_TOLERANCE = {"ce": 1e-3, "kl": 1e-3, "top1": 0.01}
"""Absolute differences between device and CPU in nats (CE, KL) and in top-1 accuracy, fp32."""


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def activations_data(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MLP-input-like x and an output-like y (a fixed random map of x plus noise), on the CPU."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * torch.rand(d, generator=g).add_(0.5) + torch.randn(d, generator=g)
    y = torch.tanh(x @ torch.randn(d, d, generator=g).div_(math.sqrt(d))) + 0.1 * torch.randn(n, d, generator=g)
    return x, y


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _run_coder(coder, x, y, device: torch.device, precision: str):
    """Reconstruction, active (token, latent) pairs, FVU and gradients of one forward and backward."""
    coder.zero_grad(set_to_none=True)
    with autocast(device, precision):
        out = coder(x.to(device), None if y is None else y.to(device))
    if out.fvu.requires_grad:
        out.fvu.backward()
    synchronize(device)
    grads = {name: p.grad.detach().float().cpu() for name, p in coder.named_parameters() if p.grad is not None}
    active = out.code.to_dense(coder.num_latents).detach().cpu() != 0
    return out.output.detach().float().cpu(), active, float(out.fvu.detach()), grads


def check_activations(device: torch.device, d_in: int, latents: int, batch: int) -> list[dict]:
    """Part (a): every activation x (SAE, skip transcoder) x (fp32, bf16) on `device` against fp32 on the CPU.

    Every parameter is perturbed from its initial value first (a fresh transcoder's decoder is zero). binary_groupmax
    trains on Gumbel noise, which no two devices draw alike: it is compared in eval mode (the argmax of each group),
    forward only."""
    import copy

    rows = []
    x, y = activations_data(batch, d_in, seed=1)
    g = torch.Generator().manual_seed(4)
    for activation in ACTIVATIONS:
        for kind in ("sae", "skip_transcoder"):
            k = 8 if activation not in GROUP_ACTIVATIONS else latents // 64
            cfg = CoderConfig(activation=activation, kind=kind, k=k, num_latents=latents)
            d_out = None if kind == "sae" else d_in
            reference = build_coder(cfg, d_in, d_out, seed=0)
            with torch.no_grad():
                for p in reference.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * (p.std() if p.numel() > 1 else 0.01).clamp_min(0.01))
            reference.train(activation != "binary_groupmax")
            target = None if kind == "sae" else y
            ref_out, ref_active, ref_fvu, ref_grads = _run_coder(reference, x, target, torch.device("cpu"), "fp32")
            for precision in ("fp32", "bf16"):
                tol = TOLERANCE[precision]
                coder = copy.deepcopy(reference).to(device)
                out, active, fvu, grads = _run_coder(coder, x, target, device, precision)
                # Active (token, latent) pairs on both sides, over the larger of the two counts.
                same = float((active & ref_active).sum() / max(int(active.sum()), int(ref_active.sum()), 1))
                grad_err = max((_relative(grads[n], ref_grads[n]) for n in ref_grads), default=None)
                row = {
                    "activation": activation,
                    "kind": kind,
                    "precision": precision,
                    "output_rel_err": _relative(out, ref_out),
                    "grad_rel_err_max": grad_err,
                    "fvu_rel_err": abs(fvu - ref_fvu) / max(abs(ref_fvu), 1e-30),
                    "codes_agree": same,
                }
                row["ok"] = (
                    row["output_rel_err"] <= tol["output"]
                    and (grad_err is None or grad_err <= tol["grad"])
                    and row["fvu_rel_err"] <= tol["fvu"]
                    and same >= tol["codes"]
                )
                rows.append(row)
    return rows


# ---- (b) throughput ------------------------------------------------------------------------------------------


def _timed(step, device: torch.device, steps: int, warmup: int = 2) -> float:
    """Median seconds of one call of `step` after `warmup` calls."""
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _bare_matmul(x, d_in: int, latents: int, device: torch.device):
    w = torch.randn(latents, d_in, device=device).div_(math.sqrt(d_in)).bfloat16()
    b = torch.zeros(latents, device=device, dtype=torch.bfloat16)
    xs = x.bfloat16()

    @torch.no_grad()
    def step():
        F.linear(xs, w, b)

    return step


def _sparsify_step(x, d_in: int, latents: int, k: int, lr: float, device: torch.device):
    """sparsify's `SparseCoder` stepped as its trainer does (benchmarks/train_throughput.py), on `device`."""
    from train_throughput import sparsify_step

    return sparsify_step(x, argparse.Namespace(d_in=d_in, k=k, latents=latents), "bf16", lr, str(device))


def _our_step(x, d_in: int, latents: int, k: int, activation: str, lr: float, device: torch.device):
    coder = build_coder(CoderConfig(activation=activation, k=k, num_latents=latents), d_in, seed=0)
    cfg = TrainConfig(optimizer="signum", lr=lr, precision="bf16", log_every=0, device=str(device))
    trainer = Trainer(coder, cfg)
    return lambda: trainer.step(x)


def measure_throughput(device: torch.device, d_in: int, latents: int, ks: list[int], batches: list[int], steps: int):
    """Part (b): tokens/s of each variant, at the largest batch of `batches` that fits on the device."""
    rows = []
    lr = 5e-3 / math.sqrt(latents / 2**14)
    for k in ks:
        for batch in batches:
            try:
                x, _ = activations_data(batch, d_in, seed=2)
                x = x.to(device)
                variants = {"bare encoder matmul": _bare_matmul(x, d_in, latents, device)}
                try:
                    variants["sparsify topk"] = _sparsify_step(x, d_in, latents, k, lr, device)
                except ImportError as err:
                    rows.append({"k": k, "batch": batch, "variant": "sparsify topk", "missing": str(err)})
                for activation in ("topk", "binary_topk"):
                    variants[f"bae_core {activation}"] = _our_step(x, d_in, latents, k, activation, lr, device)
                seconds = {name: _timed(step, device, steps) for name, step in variants.items()}
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                continue
            matmul, reference = seconds["bare encoder matmul"], seconds.get("sparsify topk")
            for name, s in seconds.items():
                rows.append(
                    {
                        "k": k,
                        "batch": batch,
                        "variant": name,
                        "s_per_step": s,
                        "tokens_per_s": batch / s,
                        "x_matmul": s / matmul,
                        "vs_sparsify": None if reference is None or name == "bare encoder matmul" else reference / s,
                    }
                )
            break
    return rows


def check_topk(device: torch.device, d_in: int, latents: int, ks: list[int], batches: list[int]) -> list[dict]:
    """Part (d): the top-k the coders use (`topk_indices`) on a whole batch of bf16 pre-activations against
    torch.topk on slices of 4,096 rows. At the paper's batch (65,536 x 36,864: 2.4e9 entries, more than 2^31)
    torch.topk takes its 64-bit-index path, which is checked here nowhere else; the largest batch that fits is used.
    The chosen values must be the same (ties may choose different indices)."""
    from bae_core.coders.ops import topk_indices

    g = torch.Generator().manual_seed(4)
    weight = (torch.randn(latents, d_in, generator=g) / math.sqrt(d_in)).to(device, torch.bfloat16)
    rows = []
    for k in ks:
        for batch in batches:
            try:
                x, _ = activations_data(batch, d_in, seed=3)
                with torch.no_grad():
                    pre = x.to(device, torch.bfloat16) @ weight.t()
                    got = pre.gather(1, topk_indices(pre, k)).sort(dim=1, descending=True).values
                    want = torch.cat([part.topk(k, dim=1).values for part in pre.split(4096)])
                    equal = torch.equal(got, want)
                    agree = float((got == want).float().mean())
                del pre, got, want
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                continue
            big = batch * latents > 2**31 - 1
            rows.append({"k": k, "batch": batch, "entries": batch * latents, "over_2^31": big, "values_agree": agree,
                         "ok": equal})  # fmt: skip
            break
    return rows


# ---- (c) splicing --------------------------------------------------------------------------------------------


def _small_llama(d_model: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    from bae_core.data.lm import LoadedModel

    cfg = LlamaConfig(
        vocab_size=1024,
        hidden_size=d_model,
        intermediate_size=4 * d_model,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval().requires_grad_(False)
    return LoadedModel(model, None, "random-llama", None, 4, d_model, 4 * d_model, "model.layers")


def check_splice(device: torch.device, d_model: int, sequences: int, seq_len: int) -> list[dict]:
    """Part (c): one skip transcoder, trained for a few steps on the model's own MLP activations on the CPU, spliced
    into the same random model on the CPU and on the device: CE, top-1 and KL of each variant, side by side."""
    import copy

    from bae_core.data.hooks import capture, splice, zero_ablate
    from bae_core.data.lm import resolve_hookpoints
    from bae_core.evaluation.fidelity import next_token_stats

    tokens = torch.randint(0, 1024, (sequences, seq_len), generator=torch.Generator().manual_seed(3))
    loaded = _small_llama(d_model, seed=0)
    (hook,) = resolve_hookpoints(loaded, ["layers.1.mlp"])
    acts = capture(loaded, tokens[: max(1, sequences // 2)], [hook])[hook.name]
    x, y = acts["input"].reshape(-1, d_model), acts["output"].reshape(-1, d_model)
    cfg = CoderConfig(activation="binary_topk", kind="skip_transcoder", k=16, num_latents=4 * d_model)
    coder = build_coder(cfg, d_model, d_model, seed=0)
    trainer = Trainer(coder, TrainConfig(optimizer="signum", log_every=0))
    for _ in range(20):
        trainer.step(x, y)
    results = {}
    for where, dev in (("cpu", torch.device("cpu")), ("device", device)):
        m, c = copy.deepcopy(loaded), copy.deepcopy(coder).to(dev)
        m.model.to(dev)
        variants = {
            "spliced": lambda m=m, c=c: splice(m, hook, c),
            "zero_ablated": lambda m=m: zero_ablate(m, hook),
        }
        results[where] = next_token_stats(m, tokens, variants, batch_size=8)
    rows = []
    for name, cpu in results["cpu"].items():
        dev = results["device"][name]
        row = {
            "variant": name,
            "ce_cpu": cpu.ce,
            "ce_device": dev.ce,
            "top1_cpu": cpu.top1,
            "top1_device": dev.top1,
            "kl_cpu": cpu.kl,
            "kl_device": dev.kl,
        }
        row["ok"] = (
            abs(cpu.ce - dev.ce) <= SPLICE_TOLERANCE["ce"]
            and abs(cpu.top1 - dev.top1) <= SPLICE_TOLERANCE["top1"]
            and (name == "clean" or abs(cpu.kl - dev.kl) <= SPLICE_TOLERANCE["kl"])
        )
        rows.append(row)
    return rows


# ---- the table ----------------------------------------------------------------------------------------------


def _print_table(title: str, rows: list[dict], columns: list[str]) -> None:
    print(f"\n{title}")
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "ok" if value else "FAIL"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--small", action="store_true", help="CI-sized shapes (seconds on a CPU)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant, after 2 warm-up steps")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON of the tables goes")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here (torch.cuda.is_available() is False)")
    if args.small:
        shape = {"d_in": 64, "latents": 512, "ks": [8, 32], "batches": [1024], "check_batch": 256, "d_model": 64}
    else:
        shape = {"d_in": 576, "latents": 36864, "ks": [32, 128], "check_batch": 4096, "d_model": 256}
        shape["batches"] = [65536, 32768, 16384, 8192, 4096]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, shapes {shape}")

    start = time.perf_counter()
    checks = check_activations(device, shape["d_in"], 1024 if not args.small else 256, shape["check_batch"])
    cols = ["activation", "kind", "precision", "output_rel_err", "grad_rel_err_max", "fvu_rel_err", "codes_agree", "ok"]
    _print_table(f"(a) {device} against fp32 on the CPU; tolerances {TOLERANCE}", checks, cols)
    throughput = measure_throughput(device, shape["d_in"], shape["latents"], shape["ks"], shape["batches"], args.steps)
    cols = ["k", "batch", "variant", "s_per_step", "tokens_per_s", "x_matmul", "vs_sparsify", "missing"]
    _print_table(
        f"(b) training step, bf16, d_in {shape['d_in']}, {shape['latents']} latents "
        "(vs_sparsify > 1: faster than sparsify; x_matmul: step time over the bare encoder matmul)",
        throughput,
        cols,
    )
    topk_rows = check_topk(device, shape["d_in"], shape["latents"], shape["ks"], shape["batches"])
    cols = ["k", "batch", "entries", "over_2^31", "values_agree", "ok"]
    _print_table(
        "(d) top-k of a whole batch of bf16 pre-activations against torch.topk on 4,096-row slices", topk_rows, cols
    )
    splice_rows = check_splice(device, shape["d_model"], 16, 64)
    cols = ["variant", "ce_cpu", "ce_device", "top1_cpu", "top1_device", "kl_cpu", "kl_device", "ok"]
    _print_table(f"(c) spliced into a random Llama, fp32; tolerances {SPLICE_TOLERANCE}", splice_rows, cols)
    failed = [r for r in checks + topk_rows + splice_rows if not r["ok"]]
    elapsed = time.perf_counter() - start
    print(f"\n{len(failed)} check(s) failed; {elapsed:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": name, "torch": torch.__version__, "shape": shape, "seconds": elapsed}
    tables = {"activations": checks, "throughput": throughput, "topk": topk_rows, "splice": splice_rows}
    args.out.write_text(json.dumps({"meta": meta, **tables}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
