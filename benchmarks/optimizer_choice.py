"""Which optimiser and learning rate to train with on a short budget: a measurement, not a timing.

Trains the same coders (topk and binary_topk SAEs by default) with sign-SGD in the schedule-free wrapper
at its automatic rate (`default_lr`) and with Adam at several rates, on synthetic data (`bae_core.synthetic`)
and, when `--cache` is given, on a real activation cache (`bae cache`), and reports for each setting the
held-out FVU of the saved weights (`Trainer.eval_mode`, the point a checkpoint holds), the held-out mean L0,
and the latents that never fire on the held-out tokens (dead). Every run starts from the same seed and sees
the same batches.

Adam's rates: the `--adam-lrs` grid, plus its automatic rate (`default_lr(coder, "adam")`) and, for binary
coders, the authors' binary sign-SGD rule 3e-3/sqrt(M/2^15) (the rule the paper's code applies to binary
coders whatever the optimiser). The warm-up is TrainConfig's unless `--warmup` is given. Nothing is
asserted; the table is printed and written to benchmarks/results/optimizer_choice.json.

    .venv/bin/python benchmarks/optimizer_choice.py                      # synthetic: d=128, 1024 latents, k=16
    .venv/bin/python benchmarks/optimizer_choice.py --cache CACHE --hookpoint layers.9.mlp \\
        --latents 2304 --k 32 --steps 300 --batch 1024                   # the quickstart's coders on its cache
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from bae_core import CoderConfig, TrainConfig, Trainer, build_coder
from bae_core.evaluation.metrics import evaluate_coder
from bae_core.synthetic import SyntheticConfig, SyntheticData
from bae_core.training import default_lr

RESULTS = Path(__file__).parent / "results" / "optimizer_choice.json"


def synthetic_source(args):
    """(train batches factory, held-out batches, d_in, description) for the synthetic ground truth."""
    data_cfg = SyntheticConfig(
        num_features=args.features, dim=args.dim, mean_active=args.mean_active, regime="continuous", seed=0
    )

    def train_batches():
        data = SyntheticData(data_cfg)  # a fresh, identically seeded stream for every run
        return data.batches(args.batch, transcoder=False)

    x, _, _ = SyntheticData(data_cfg).sample(args.heldout_tokens, torch.Generator().manual_seed(12345))
    held_out = list(x.split(8192))
    desc = f"synthetic d={args.dim}, {args.features} features, ~{args.mean_active:g} active (continuous)"
    return train_batches, held_out, args.dim, desc


def cache_source(args):
    """The same for a hookpoint of an activation cache written by `bae cache` (SAE on its input column)."""
    from bae_core.data.cache import open_cache
    from bae_core.data.reader import coder_columns, iter_activation_batches

    manifest = open_cache(args.cache)
    x_col, _ = coder_columns(manifest, args.hookpoint, False)
    d_in = manifest.hookpoints[args.hookpoint].columns[x_col]

    def train_batches():
        return iter_activation_batches(
            args.cache, args.hookpoint, batch_size=args.batch, shuffle_seed=0, epochs=None, manifest=manifest
        )

    held_out = []
    tokens = 0
    for x in iter_activation_batches(
        args.cache, args.hookpoint, split="heldout", batch_size=8192, shuffle_seed=None, manifest=manifest
    ):
        held_out.append(x[: args.heldout_tokens - tokens])
        tokens += held_out[-1].shape[0]
        if tokens >= args.heldout_tokens:
            break
    return train_batches, held_out, d_in, f"cache {args.cache} {args.hookpoint} (d={d_in})"


def settings(args, coder) -> list[tuple[str, str, float]]:
    """(optimizer, rate label, lr) for one coder."""
    out = [("signum", "auto", default_lr(coder, "signum"))]
    out += [("adam", f"{lr:g}", lr) for lr in args.adam_lrs]
    out.append(("adam", "auto", default_lr(coder, "adam")))
    if coder.cfg.is_binary:
        out.append(("adam", "binary rule", 3e-3 / math.sqrt(coder.num_latents / 2**15)))
    return out


def run(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    train_batches, held_out, d_in, desc = cache_source(args) if args.cache else synthetic_source(args)
    n_held = sum(x.shape[0] for x in held_out)
    print(f"{desc}; {args.latents} latents, k={args.k}, {args.steps} steps of {args.batch} tokens; held-out {n_held}")
    header = f"{'activation':<12} {'optimizer':<9} {'rate':<12} {'lr':>9} {'fvu':>7} {'l0':>6} {'dead':>10} {'s':>6}"
    print(header)
    rows = []
    for activation in args.activations:
        cfg = CoderConfig(activation=activation, k=args.k, num_latents=args.latents)
        for optimizer, label, lr in settings(args, build_coder(cfg, d_in, seed=0)):
            train = {"optimizer": optimizer, "lr": lr, "log_every": 0}
            if args.warmup is not None:
                train["lr_warmup_steps"] = args.warmup
            trainer = Trainer(build_coder(cfg, d_in, seed=0), TrainConfig(**train))
            started = time.perf_counter()
            trainer.fit(train_batches(), max_steps=args.steps)  # ends at the saved point (eval_mode)
            seconds = time.perf_counter() - started
            ev = evaluate_coder(trainer.coder, held_out)
            dead = round(ev.dead_fraction * args.latents)
            row = {
                "source": desc,
                "activation": activation,
                "optimizer": optimizer,
                "rate": label,
                "lr": lr,
                "lr_warmup_steps": trainer.cfg.lr_warmup_steps if optimizer == "adam" else None,
                "steps": args.steps,
                "batch": args.batch,
                "num_latents": args.latents,
                "k": args.k,
                "heldout_tokens": n_held,
                "heldout_fvu": ev.fvu,
                "heldout_l0": ev.l0,
                "dead_latents": dead,
                "train_seconds": seconds,
            }
            rows.append(row)
            print(
                f"{activation:<12} {optimizer:<9} {label:<12} {lr:>9.2e} {ev.fvu:>7.3f} {ev.l0:>6.1f} "
                f"{dead:>5}/{args.latents:<4} {seconds:>6.0f}",
                flush=True,
            )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", help="a `bae cache` folder; without it, synthetic data")
    p.add_argument("--hookpoint", default="layers.9.mlp")
    p.add_argument("--activations", type=lambda s: s.split(","), default=["topk", "binary_topk"])
    p.add_argument("--latents", type=int, default=1024)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--adam-lrs", type=lambda s: [float(v) for v in s.split(",")], default=[1e-4, 3e-4, 1e-3, 3e-3])
    p.add_argument("--warmup", type=int, default=None, help="Adam warm-up steps (default: TrainConfig's)")
    p.add_argument("--dim", type=int, default=128, help="synthetic: activation width")
    p.add_argument("--features", type=int, default=2048, help="synthetic: number of true features")
    p.add_argument("--mean-active", type=float, default=16.0, help="synthetic: mean active features per sample")
    p.add_argument("--heldout-tokens", type=int, default=16384)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=RESULTS, help="where to write the rows as JSON")
    args = p.parse_args()
    rows = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
