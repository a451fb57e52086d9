"""Lexical scoring throughput (latents/s) of `bae score` and its scaling with Ray workers.

One TopK SAE is trained briefly on a middle MLP layer of the embedded model's cache (made once, before any
timing); then its latents are scored for lexical explainability (token/bigram rules) on the cache's held-out
split, in these rows:

- reference: the coder's codes for every held-out token (`bae_core.evaluation.interp.coder_activations`), the pass every
  scorer makes before it can look at a latent;
- in-process, 1 thread: `coder_latent_scores` on all latents;
- Ray, W workers: `bae score`'s lexical tasks (`ray_jobs.score_tasks.lexical_task`) on W slices of the latents,
  W at a time, each task loading the model's tokenizer, the coder and the codes itself (as in a real run).

Rows are latents/s; the scaling is W workers against 1 worker. Nothing is asserted; the figures are printed and
written to benchmarks/results/lexical_throughput.json.

    .venv/bin/python benchmarks/lexical_throughput.py [--heldout-tokens 32768] [--expansion 8] [--workers 1,2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bae_core.coders.config import CoderConfig
from bae_core.data.cache import open_cache
from bae_core.data.reader import iter_activation_batches
from bae_core.evaluation.interp import ExampleOptions, coder_activations, coder_latent_scores
from bae_core.training import TrainConfig, Trainer, build_coder
from ray_jobs.cache_job import run_cache
from ray_jobs.runtime import connect
from ray_jobs.score_plan import ScoreOptions, ScoreTask
from ray_jobs.score_tasks import _slices, lexical_task
from ray_jobs.spec import parse_spec

RESULTS = Path(__file__).resolve().parent / "results"
HOOKPOINT = "layers.9.mlp"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-tokens", type=int, default=32768)
    parser.add_argument("--heldout-tokens", type=int, default=32768)
    parser.add_argument("--expansion", type=int, default=8, help="latents = expansion x 576")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--workers", default=f"1,{os.cpu_count() or 2}", help="comma-separated worker counts")
    args = parser.parse_args()
    workers = sorted({int(w) for w in args.workers.split(",")})

    work = Path(tempfile.mkdtemp(prefix="bae-lexical-throughput-"))
    cache = str(work / "cache")
    connect(num_cpus=max(workers))
    spec = parse_spec(
        {
            "name": "lexical",
            "output": str(work / "run"),
            "cache": {
                "root": cache,
                "hookpoints": [HOOKPOINT],
                "seq_len": 128,
                "train_tokens": args.train_tokens,
                "heldout_tokens": args.heldout_tokens,
            },
        }
    )
    run_cache(spec.cache_request())
    manifest = open_cache(cache)

    torch.set_num_threads(1)
    cfg = CoderConfig(activation="topk", k=args.k, expansion_factor=args.expansion)
    trainer = Trainer(build_coder(cfg, 576, seed=0), TrainConfig(optimizer="signum", log_every=0))
    batches = iter_activation_batches(cache, HOOKPOINT, batch_size=1024, shuffle_seed=0, epochs=None)
    while trainer.step_count < args.steps:
        trainer.step(next(batches))
    trainer.eval_mode()
    coder = trainer.coder
    checkpoint = coder.save(work / "coder")
    m = coder.num_latents
    print(f"cache and a {m}-latent TopK SAE (k={args.k}, {args.steps} steps) ready in {work}", flush=True)

    timings: dict[str, float] = {}
    start = time.perf_counter()
    acts = coder_activations(coder, cache, HOOKPOINT, "heldout", manifest)
    timings["reference: codes of every held-out token"] = time.perf_counter() - start

    start = time.perf_counter()
    rows = coder_latent_scores(coder, cache, HOOKPOINT, ExampleOptions())
    timings["in-process, 1 thread"] = time.perf_counter() - start
    eligible = sum(r["eligible"] for r in rows)

    import ray

    remote = ray.remote(num_cpus=1)(lexical_task)
    task = ScoreTask("bench", "bench", cache, HOOKPOINT, args.k, str(checkpoint), "topk", "sae", m)
    for w in workers:
        options = ScoreOptions(latents_per_task=-(-m // w))
        slices = _slices(task, options)
        run_dir = str(work / f"run-{w}")
        start = time.perf_counter()
        ray.get([remote.remote(task, run_dir, options, a, b) for a, b in slices])
        timings[f"Ray, {w} worker{'s' if w > 1 else ''} ({len(slices)} slices)"] = time.perf_counter() - start

    latents_per_s = {k: m / v for k, v in timings.items() if not k.startswith("reference")}
    one = next(v for k, v in timings.items() if k.startswith("Ray, 1 worker"))
    scaling = {k: one / v for k, v in timings.items() if k.startswith("Ray,")}
    print()
    print(f"{m} latents ({eligible} eligible), {acts.shape[0]} held-out tokens, {int(acts.nnz)} firings")
    print(f"{'row':<44} {'seconds':>8} {'latents/s':>10} {'vs 1 worker':>12}")
    for label, seconds in timings.items():
        rate = latents_per_s.get(label)
        print(
            f"{label:<44} {seconds:>8.1f} {'' if rate is None else f'{rate:10.1f}':>10} "
            f"{'' if label not in scaling else f'{scaling[label]:.2f}x':>12}"
        )
    ratio = timings["in-process, 1 thread"] / timings["reference: codes of every held-out token"]
    print(f"in-process scoring vs the codes pass: {ratio:.1f}x")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "lexical_throughput.json"
    out.write_text(
        json.dumps(
            {
                "args": vars(args),
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
                "latents": m,
                "eligible": int(eligible),
                "heldout_tokens": int(acts.shape[0]),
                "seconds": timings,
                "latents_per_s": latents_per_s,
                "scaling_vs_1_worker": scaling,
                "mean_token_auroc": float(np.nanmean([r["token_auroc"] for r in rows])),
            },
            indent=2,
        )
    )
    print(f"written to {out}")


if __name__ == "__main__":
    main()
