"""`bae train`: train one coder on one hookpoint of a cache with Ray Train (data-parallel, resumable)."""

from __future__ import annotations

import argparse
import time

from bae_core.coders.config import ACTIVATIONS, KINDS


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    from bae_core.coders.config import SURROGATES

    p = sub.add_parser(
        "train",
        help="train one coder on one hookpoint of a cache (Ray Train, data-parallel, resumable)",
        description="Train one sparse coder on one hookpoint of an activation cache with a Ray Train TorchTrainer. "
        "Checkpoints every --checkpoint-every steps under OUT/NAME; running the same command again resumes "
        "from the last checkpoint. The final coder (sae.safetensors + cfg.json) is copied to OUT/NAME/coder.",
    )
    p.add_argument("cache", help="cache folder or URI written by `bae cache`")
    p.add_argument("--hookpoint", required=True, help="a hookpoint of the cache, e.g. layers.9.mlp")
    p.add_argument("--out", default="runs/train", help="run folder (local path or URI)")
    p.add_argument("--name", default=None, help="run name inside OUT (default: the hookpoint and coder)")
    p.add_argument("--activation", choices=ACTIVATIONS, default="binary_topk", help="the coder's activation")
    p.add_argument("--kind", choices=KINDS, default="sae", help="sae, transcoder or skip_transcoder")
    p.add_argument("--k", type=int, default=32, help="active latents per token (the target L0 of free-L0 activations)")
    p.add_argument("--expansion-factor", type=int, default=32, help="dictionary size as a multiple of the input width")
    p.add_argument("--num-latents", type=int, default=0, help="dictionary size (0: expansion factor x d_in)")
    p.add_argument(
        "--surrogate",
        choices=SURROGATES,
        default=None,
        help="straight-through surrogate of binary coders (default: the config's)",
    )
    p.add_argument(
        "--temperature", type=float, default=None, help="surrogate temperature of binary coders (default: the config's)"
    )
    p.add_argument(
        "--init-threshold",
        type=float,
        default=None,
        help="initial threshold of thresholded coders (default: the config's)",
    )
    p.add_argument(
        "--optimizer",
        choices=("signum", "adam"),
        default="signum",
        help="signum (sign-SGD inside schedule-free, the authors' choice) or adam",
    )
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the width scaling rule)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="fp32, or bf16 for the encoder matmul")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and of the batch order")
    p.add_argument("--steps", type=int, default=1000, help="training steps")
    p.add_argument("--batch-size", type=int, default=4096, help="tokens per step on each worker")
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=200,
        help="steps between checkpoints (a failure loses at most this many)",
    )
    p.add_argument("--workers", type=int, default=1, help="data-parallel workers (DDP)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs each worker holds")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs each worker holds")
    p.add_argument("--max-failures", type=int, default=2, help="restarts from the last checkpoint after a failure")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a local Ray)")
    p.set_defaults(func=run_train_cmd)


def run_train_cmd(args: argparse.Namespace) -> int:
    from bae_core.data.cache import open_cache
    from ray_jobs.cli.checks import writable_folder
    from ray_jobs.cli.errors import RunFailed
    from ray_jobs.runtime import connect, storage_path
    from ray_jobs.train_job import TrainJob, export_coder, run_train

    writable_folder(args.out, "--out")
    manifest = open_cache(args.cache)
    if args.hookpoint not in manifest.hookpoints:
        raise ValueError(
            f"--hookpoint: {args.hookpoint!r} is not in the cache {args.cache}; it has {', '.join(manifest.hookpoints)}"
        )
    coder = {
        "activation": args.activation,
        "kind": args.kind,
        "k": args.k,
        "expansion_factor": args.expansion_factor,
        "num_latents": args.num_latents,
        **{
            key: value
            for key, value in (
                ("surrogate", args.surrogate),
                ("temperature", args.temperature),
                ("init_threshold", args.init_threshold),
            )
            if value is not None
        },
    }
    train = {"optimizer": args.optimizer, "lr": args.lr, "precision": args.precision, "seed": args.seed}
    name = args.name or f"{args.hookpoint}-{args.activation}-{args.kind}-k{args.k}"
    job = TrainJob(
        cache=args.cache,
        hookpoint=args.hookpoint,
        out=storage_path(args.out),
        coder=coder,
        train=train,
        steps=args.steps,
        batch_size=args.batch_size,
        checkpoint_every=args.checkpoint_every,
        workers=args.workers,
        cpus_per_worker=args.cpus_per_worker,
        gpus_per_worker=args.gpus_per_worker,
        max_failures=args.max_failures,
        name=name,
    )
    connect(args.address)
    start = time.perf_counter()
    result = run_train(job)
    if result.error is not None:
        raise RunFailed(
            f"training failed: {result.error}; run the same command again to resume from the last checkpoint"
        )
    dest = export_coder(result, f"{job.out.rstrip('/')}/{name}/coder")
    metrics = result.metrics or {}
    print(
        f"trained {name}: {metrics.get('step', '?')} steps, fvu {metrics.get('fvu', float('nan')):.4f}, "
        f"l0 {metrics.get('l0', float('nan')):.1f} in {time.perf_counter() - start:.0f}s; coder in {dest}"
    )
    return 0
