"""Training throughput of bae_core's sparse coders, against EleutherAI's sparsify and the bare encoder matmul.

Measures tokens/s of one full training step (forward, backward, optimiser step) of an SAE at
d_in=576, 4608 latents, k=32, a batch of 4096 tokens, in fp32 and bf16 (autocast), for the `topk`
and `binary_topk` activations, and compares in the same run against:

- sparsify's `SparseCoder` (continuous topk only, so it is the reference for both activations),
  trained the way sparsify's trainer does it, with the same optimiser (sign-SGD in schedulefree's
  `ScheduleFreeWrapper`, momentum 0.95) and learning rate;
- the bare dense encoder matmul `F.linear(x, W_enc, b_enc)` (forward only, no grad), the cost that
  no implementation avoids.

The targets are ratios, not absolute times: >= 1x sparsify's throughput, and a step that costs
<= 2x the bare encoder matmul. Nothing is asserted; the figures are printed and written to
benchmarks/results/train_throughput.json. Variants never run concurrently: after 2 warm-up steps each,
they take turns one timed step at a time, and the median step of each is reported, with the interquartile
range of the ratios taken round by round (each step against the matmul or sparsify step next to it).

    .venv/bin/python benchmarks/train_throughput.py [--steps 5] [--batch 4096] [--latents 4608] [--k 32] [--d-in 576]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from schedulefree import ScheduleFreeWrapper
from sparsify import SparseCoder, SparseCoderConfig
from sparsify.sign_sgd import SignSGD

from bae_core import CoderConfig, TrainConfig, Trainer, build_coder

RESULTS = Path(__file__).parent / "results" / "train_throughput.json"
WARMUP = 2


def time_round_robin(steps_by_name: dict, steps: int) -> dict[str, list[float]]:
    """Wall-clock seconds of `steps` calls of each step function, after WARMUP untimed calls each.

    The variants take turns, one call at a time (never concurrently), so that load from other
    processes on the machine falls on all of them alike rather than on whichever ran at the time.
    """
    for step in steps_by_name.values():
        for _ in range(WARMUP):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps_by_name}
    for _ in range(steps):
        for name, step in steps_by_name.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return times


def quartiles(values: list[float]) -> tuple[float, float]:
    """The 25th and 75th percentiles (nearest rank)."""
    ordered = sorted(values)
    return ordered[int(0.25 * (len(ordered) - 1))], ordered[int(round(0.75 * (len(ordered) - 1)))]


def autocast(precision: str, device: str = "cpu"):
    return torch.autocast(device, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def bare_matmul(x, args, precision: str):
    """The dense encoder matmul alone: forward, no grad (bf16 = x and W cast to bfloat16)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    w = torch.randn(args.latents, args.d_in).div_(math.sqrt(args.d_in)).to(dtype)
    b = torch.zeros(args.latents, dtype=dtype)
    xs = x.to(dtype)

    @torch.no_grad()
    def step():
        F.linear(xs, w, b)

    return step


def sparsify_step(x, args, precision: str, lr: float, device: str = "cpu"):
    """What sparsify's trainer does per step (its own autocast only targets CUDA, so ours wraps the forward)."""
    torch.manual_seed(0)
    cfg = SparseCoderConfig(activation="topk", k=args.k, num_latents=args.latents)
    sae = SparseCoder(args.d_in, cfg, device=device)
    opt = ScheduleFreeWrapper(SignSGD(sae.parameters(), lr), momentum=0.95)
    opt.train()

    def step():
        with autocast(precision, torch.device(device).type):
            out = sae(x)
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        sae.set_decoder_norm_to_unit_norm()

    return step


def our_step(x, args, activation: str, precision: str, lr: float):
    coder = build_coder(CoderConfig(activation=activation, k=args.k, num_latents=args.latents), args.d_in, seed=0)
    trainer = Trainer(coder, TrainConfig(optimizer="signum", lr=lr, precision=precision, log_every=0))
    return lambda: trainer.step(x)  # step() calls .item(), so it is synchronous


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4096, help="tokens per step")
    parser.add_argument("--latents", type=int, default=4608, help="number of latents M")
    parser.add_argument("--k", type=int, default=32, help="active latents per token")
    parser.add_argument("--d-in", type=int, default=576, help="input width")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (after 2 warm-up steps)")
    args = parser.parse_args()

    lr = 5e-3 / math.sqrt(args.latents / 2**14)
    g = torch.Generator().manual_seed(0)
    # Residual-stream-like activations: a shared offset plus per-dimension scales.
    x = torch.randn(args.batch, args.d_in, generator=g) * torch.rand(args.d_in, generator=g).add_(0.5) * 3
    x += torch.randn(args.d_in, generator=g)

    rows = []
    for precision in ("fp32", "bf16"):
        variants = {
            "bare encoder matmul": bare_matmul(x, args, precision),
            "sparsify topk": sparsify_step(x, args, precision, lr),
            "bae_core topk": our_step(x, args, "topk", precision, lr),
            "bae_core binary_topk": our_step(x, args, "binary_topk", precision, lr),
        }
        times = time_round_robin(variants, args.steps)
        seconds = {name: statistics.median(t) for name, t in times.items()}
        matmul_s, ref_s = seconds["bare encoder matmul"], seconds["sparsify topk"]
        for variant, s in seconds.items():
            per_round = zip(times[variant], times["bare encoder matmul"], times["sparsify topk"], strict=True)
            x_matmul, vs_ref = zip(*((t / m, r / t) for t, m, r in per_round), strict=True)
            rows.append(
                {
                    "variant": variant,
                    "precision": precision,
                    "s_per_step": s,
                    "tokens_per_s": args.batch / s,
                    "vs_sparsify": None if variant == "bare encoder matmul" else ref_s / s,
                    "vs_sparsify_iqr": None if variant == "bare encoder matmul" else quartiles(vs_ref),
                    "vs_matmul": s / matmul_s,
                    "vs_matmul_iqr": quartiles(x_matmul),
                    "all_s": times[variant],
                }
            )

    print(f"\nbatch={args.batch} d_in={args.d_in} latents={args.latents} k={args.k} steps={args.steps} ", end="")
    print(f"threads={torch.get_num_threads()} torch={torch.__version__} lr={lr:.3g}")
    print("vs sparsify = our tokens/s / sparsify tokens/s (>1 is faster; sparsify is topk for both activations)")
    print("x matmul    = step time / bare encoder matmul time, same precision (goal <= 2.0)")
    print("[a-b]       = interquartile range of the same ratio taken round by round\n")
    header = (
        f"{'variant':<22}{'precision':<11}{'s/step':>9}{'tokens/s':>11}{'vs sparsify':>13}{'[IQR]':>14}"
        f"{'x matmul':>10}{'[IQR]':>14}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        vs, vs_iqr = "-", ""
        if r["vs_sparsify"] is not None:
            vs, vs_iqr = f"{r['vs_sparsify']:.2f}x", "[{:.2f}-{:.2f}]".format(*r["vs_sparsify_iqr"])
        xm_iqr = "[{:.2f}-{:.2f}]".format(*r["vs_matmul_iqr"])
        print(
            f"{r['variant']:<22}{r['precision']:<11}{r['s_per_step']:>9.4f}{r['tokens_per_s']:>11.0f}"
            f"{vs:>13}{vs_iqr:>14}{r['vs_matmul']:>9.2f}x{xm_iqr:>14}"
        )

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    meta = {**vars(args), "lr": lr, "threads": torch.get_num_threads(), "torch": torch.__version__}
    RESULTS.write_text(json.dumps({"config": meta, "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
