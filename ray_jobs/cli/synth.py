"""`bae synth`: train several coders on one synthetic data set and print their recovery metrics."""

from __future__ import annotations

import argparse
import json
import sys
import time

from bae_core.coders.config import ACTIVATIONS, KINDS
from ray_jobs.cli.common import _csv, format_table


def add_synth_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="train coders on synthetic data with known features and print how well they recover them",
        description="Train every requested (activation, kind) coder on the same synthetic data with known "
        "sparse features, then report FVU, MMCS, Hungarian-matched |cos|, firing F1, L0 and dead fraction.",
    )
    p.add_argument("--regime", choices=("binary", "continuous"), default="binary", help="feature magnitudes")
    p.add_argument("--features", type=int, default=256, help="number of true features")
    p.add_argument("--dim", type=int, default=64, help="activation width")
    p.add_argument("--mean-active", type=float, default=4.0, help="expected active features per sample")
    p.add_argument("--latents", type=int, default=None, help="dictionary size of every coder (recipe: 512)")
    p.add_argument(
        "--k",
        type=int,
        default=None,
        help="active latents, see CoderConfig.k (recipe: 8; 16 for binary_groupmax, 4 for binary_threshold)",
    )
    p.add_argument(
        "--activations",
        type=_csv(ACTIVATIONS, "--activations"),
        default=["topk", "binary_topk"],
        help=f"comma-separated; from {', '.join(ACTIVATIONS)}",
    )
    p.add_argument(
        "--kinds",
        type=_csv(KINDS, "--kinds"),
        default=["sae", "skip_transcoder"],
        help=f"comma-separated; from {', '.join(KINDS)}",
    )
    p.add_argument(
        "--steps", type=int, default=None, help="training steps per coder (recipe: 1000; 2000 for binary_threshold)"
    )
    p.add_argument("--batch-size", type=int, default=1024, help="samples per training step")
    p.add_argument(
        "--optimizer",
        choices=("adam", "signum"),
        default="adam",
        help="adam, or signum (sign-SGD inside schedule-free)",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="learning rate (recipe: 3e-3, 3e-2 for binary_groupmax; 0: the width scaling rule)",
    )
    p.add_argument("--temperature", type=float, default=None, help="surrogate temperature of binary coders")
    p.add_argument(
        "--surrogate",
        choices=("sigmoid", "rectangle", "identity"),
        default=None,
        help="straight-through surrogate of binary coders (default: each activation's recipe)",
    )
    p.add_argument("--init-threshold", type=float, default=None, help="initial threshold of binary coders")
    p.add_argument("--l0-coef", type=float, default=None, help="L0 penalty for jumprelu/binary_threshold")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="fp32, or bf16 for the encoder matmul")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data and of every coder")
    p.add_argument("--json", action="store_true", help="print one JSON object per coder instead of a table")
    p.set_defaults(func=run_synth)


def run_synth(args: argparse.Namespace) -> int:
    """Options left unset take each activation's measured recipe (`bae_core.synthetic.synthetic_recipe`)."""
    from bae_core.coders.config import FREE_L0_ACTIVATIONS, CoderConfig
    from bae_core.synthetic import SyntheticConfig, SyntheticData, recovery_row, synthetic_recipe, train_on_synthetic
    from bae_core.training import TrainConfig

    data_cfg = SyntheticConfig(
        num_features=args.features, dim=args.dim, mean_active=args.mean_active, regime=args.regime, seed=args.seed
    )
    data = SyntheticData(data_cfg)
    coder_flags = {
        "num_latents": args.latents,
        "k": args.k,
        "temperature": args.temperature,
        "surrogate": args.surrogate,
        "init_threshold": args.init_threshold,
    }
    plan = [(activation, kind) for activation in args.activations for kind in args.kinds]
    if not args.json:
        print(
            f"synthetic {args.regime} truth: {args.features} features in {args.dim} dims, "
            f"~{args.mean_active:g} active; {len(plan)} coders, batch {args.batch_size}",
            file=sys.stderr,
        )
    rows = []
    for activation, kind in plan:
        recipe = synthetic_recipe(activation)
        coder_cfg = CoderConfig(
            activation=activation,
            kind=kind,
            **{**recipe.coder, **{key: value for key, value in coder_flags.items() if value is not None}},
        )
        train = {
            **recipe.train,
            "optimizer": args.optimizer,
            "precision": args.precision,
            "device": args.device,
            "seed": args.seed,
        }
        if args.lr is not None:
            train["lr"] = args.lr or None
        # The L0 penalty exists only for the activations with a free L0.
        if args.l0_coef is not None and activation in FREE_L0_ACTIVATIONS:
            train["l0_coef"] = args.l0_coef
        steps = args.steps if args.steps is not None else recipe.steps
        train["lr_warmup_steps"] = min(train["lr_warmup_steps"], steps)
        start = time.perf_counter()
        _, rec = train_on_synthetic(
            coder_cfg, data, steps=steps, batch_size=args.batch_size, train_cfg=TrainConfig(**train)
        )
        row = {
            **recovery_row(coder_cfg, data_cfg, rec),
            "steps": steps,
            "seconds": round(time.perf_counter() - start, 2),
        }
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print(
                f"  trained {activation} {kind} ({coder_cfg.num_latents} latents, k={coder_cfg.k}, {steps} steps) "
                f"in {row['seconds']:.1f}s",
                file=sys.stderr,
                flush=True,
            )
    if not args.json:
        print(format_table(rows))
    return 0
