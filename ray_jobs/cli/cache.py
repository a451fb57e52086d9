"""`bae cache`: capture language-model activations into parquet shards with a Ray Data actor pool."""

from __future__ import annotations

import argparse
import time

from ray_jobs.cli.common import _tokens


def add_cache_parser(sub: argparse._SubParsersAction) -> None:
    from bae_core.data.cache import STORAGE_DTYPES

    p = sub.add_parser(
        "cache",
        help="capture language-model activations into parquet shards (Ray Data)",
        description="Split documents into train and held-out sets by document, tokenise them into fixed-length "
        "sequences, run the model in a Ray Data actor pool and write parquet shards per hookpoint plus a "
        "manifest. Re-running with the same arguments resumes and skips finished shards.",
    )
    p.add_argument("root", help="cache folder or pyarrow filesystem URI (e.g. s3://bucket/cache)")
    p.add_argument(
        "--hookpoints",
        type=lambda text: [h.strip() for h in text.split(",") if h.strip()],
        default=["layers.9.mlp"],
        help="comma-separated: layers.N.mlp (MLP input and output) or layers.N (residual stream after layer N)",
    )
    p.add_argument("--model", default="embedded:SmolLM2-135M-Instruct", help="hub id, local folder, or the default")
    p.add_argument("--revision", default=None, help="model revision on the hub")
    p.add_argument("--dataset", default="embedded", help="datasets id, local .jsonl/.parquet/.txt, or the default")
    p.add_argument("--text-column", default="text", help="the column or field that holds the text")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    p.add_argument(
        "--train-tokens", type=_tokens, default=200_000, help="token budget of the train split (all: no cap)"
    )
    p.add_argument("--heldout-tokens", type=_tokens, default=50_000, help="token budget of the held-out split")
    p.add_argument("--heldout-fraction", type=float, default=0.1, help="fraction of documents held out")
    p.add_argument("--dtype", choices=STORAGE_DTYPES, default="float16", help="storage dtype of activations")
    p.add_argument(
        "--sequences-per-shard", type=int, default=64, help="sequences in each parquet shard (one unit of work)"
    )
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    p.add_argument("--actors", type=int, default=1, help="model replicas in the actor pool")
    p.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs each model replica holds")
    p.add_argument(
        "--gpus-per-actor", type=float, default=0.0, help="GPUs each model replica holds (fractions share a GPU)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the document split")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--verify", action="store_true", help="only check every shard of an existing cache")
    p.set_defaults(func=run_cache_cmd)


def run_cache_cmd(args: argparse.Namespace) -> int:
    from bae_core.data.cache import open_cache, verify_cache

    if args.verify:
        n = verify_cache(args.root, open_cache(args.root))
        print(f"cache {args.root}: {n} shards verified")
        return 0

    from ray_jobs.cache_job import CacheRequest, run_cache
    from ray_jobs.cli.checks import model_and_dataset, writable_folder
    from ray_jobs.cli.console import Progress
    from ray_jobs.runtime import connect

    req = CacheRequest(
        root=args.root,
        hookpoints=args.hookpoints,
        model=args.model,
        revision=args.revision,
        dataset=args.dataset,
        text_column=args.text_column,
        seq_len=args.seq_len,
        train_tokens=args.train_tokens,
        heldout_tokens=args.heldout_tokens,
        heldout_fraction=args.heldout_fraction,
        seed=args.seed,
        dtype=args.dtype,
        sequences_per_unit=args.sequences_per_shard,
        batch_size=args.batch_size,
        actors=args.actors,
        cpus_per_actor=args.cpus_per_actor,
        gpus_per_actor=args.gpus_per_actor,
    )
    writable_folder(args.root, "root")
    model_and_dataset(req.model, req.revision, req.dataset, req.text_column)
    connect(args.address)
    start = time.perf_counter()
    progress = Progress("shards")
    try:
        manifest = run_cache(req, progress=progress)
    finally:
        progress.end()
    for split, info in manifest.splits.items():
        print(f"{split}: {info['documents']} documents, {info['sequences']} sequences, {info['tokens']} tokens")
    print(
        f"cache {args.root}: {len(manifest.shards)} shards, {', '.join(manifest.hookpoints)}, "
        f"{time.perf_counter() - start:.1f}s"
    )
    return 0
