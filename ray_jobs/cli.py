"""The `bae` command line.

    bae synth      train several coders on one synthetic data set and print their recovery metrics
    bae cache      capture language-model activations into parquet shards with a Ray Data actor pool
    bae train      train one coder on one hookpoint of a cache with Ray Train (data-parallel, resumable)
    bae sweep      run a sweep spec (sweeps/*.yaml) with Ray Tune: grid or Optuna, resumable
    bae study      the whole study of a spec: sweep, score, report (`make quickstart`)
    bae report     the frontier table and a Markdown report with plots and the paper's claims, for a scored run
    bae score      interpretability (lexical or LLM judge), fidelity, density and ablation of every coder of a sweep

Each subcommand imports what it needs when it runs, so `bae --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from bae_core.config import ACTIVATIONS, KINDS


def _csv(allowed: tuple[str, ...], name: str):
    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        bad = [item for item in items if item not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"{name}: {', '.join(bad) or 'nothing'} not allowed; choose from {', '.join(allowed)}"
            )
        return items

    return parse


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
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--optimizer", choices=("adam", "signum"), default="adam")
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="learning rate (recipe: 3e-3, 3e-2 for binary_groupmax; 0: the width scaling rule)",
    )
    p.add_argument("--temperature", type=float, default=None, help="surrogate temperature of binary coders")
    p.add_argument("--surrogate", choices=("sigmoid", "rectangle", "identity"), default=None)
    p.add_argument("--init-threshold", type=float, default=None, help="initial threshold of binary coders")
    p.add_argument("--l0-coef", type=float, default=None, help="L0 penalty for jumprelu/binary_threshold")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object per coder instead of a table")
    p.set_defaults(func=run_synth)


def run_synth(args: argparse.Namespace) -> int:
    """Options left unset take each activation's measured recipe (`bae_core.synthetic.synthetic_recipe`)."""
    from bae_core.config import FREE_L0_ACTIVATIONS, CoderConfig
    from bae_core.synthetic import SyntheticConfig, SyntheticData, recovery_row, synthetic_recipe, train_on_synthetic
    from bae_core.train import TrainConfig

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


def add_cache_parser(sub: argparse._SubParsersAction) -> None:
    from bae_core.cache import STORAGE_DTYPES

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
    p.add_argument("--text-column", default="text")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    p.add_argument(
        "--train-tokens", type=_tokens, default=200_000, help="token budget of the train split (all: no cap)"
    )
    p.add_argument("--heldout-tokens", type=_tokens, default=50_000, help="token budget of the held-out split")
    p.add_argument("--heldout-fraction", type=float, default=0.1, help="fraction of documents held out")
    p.add_argument("--dtype", choices=STORAGE_DTYPES, default="float16", help="storage dtype of activations")
    p.add_argument("--sequences-per-shard", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    p.add_argument("--actors", type=int, default=1, help="model replicas in the actor pool")
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--gpus-per-actor", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0, help="seed of the document split")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--verify", action="store_true", help="only check every shard of an existing cache")
    p.set_defaults(func=run_cache_cmd)


def _tokens(text: str) -> int | None:
    return None if text == "all" else int(text)


def run_cache_cmd(args: argparse.Namespace) -> int:
    from bae_core.cache import open_cache, verify_cache

    if args.verify:
        n = verify_cache(args.root, open_cache(args.root))
        print(f"cache {args.root}: {n} shards verified")
        return 0

    from ray_jobs.cache_job import CacheRequest, run_cache
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
    connect(args.address)
    start = time.perf_counter()

    def progress(done: int, total: int) -> None:
        print(f"\r  shards {done}/{total}", end="", file=sys.stderr, flush=True)

    manifest = run_cache(req, progress=progress)
    print(file=sys.stderr)
    for split, info in manifest.splits.items():
        print(f"{split}: {info['documents']} documents, {info['sequences']} sequences, {info['tokens']} tokens")
    print(
        f"cache {args.root}: {len(manifest.shards)} shards, {', '.join(manifest.hookpoints)}, "
        f"{time.perf_counter() - start:.1f}s"
    )
    return 0


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    from bae_core.config import SURROGATES

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
    p.add_argument("--activation", choices=ACTIVATIONS, default="binary_topk")
    p.add_argument("--kind", choices=KINDS, default="sae")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--expansion-factor", type=int, default=32)
    p.add_argument("--num-latents", type=int, default=0, help="dictionary size (0: expansion factor x d_in)")
    p.add_argument("--surrogate", choices=SURROGATES, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--init-threshold", type=float, default=None)
    p.add_argument("--optimizer", choices=("signum", "adam"), default="signum")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the width scaling rule)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=4096, help="tokens per step on each worker")
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--workers", type=int, default=1, help="data-parallel workers (DDP)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--gpus-per-worker", type=float, default=0.0)
    p.add_argument("--max-failures", type=int, default=2, help="restarts from the last checkpoint after a failure")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a local Ray)")
    p.set_defaults(func=run_train_cmd)


def run_train_cmd(args: argparse.Namespace) -> int:
    from bae_core.cache import open_cache
    from ray_jobs.runtime import connect, storage_path
    from ray_jobs.train_job import TrainJob, export_coder, run_train

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
        print(f"bae train: training failed: {result.error}", file=sys.stderr)
        return 1
    dest = export_coder(result, f"{job.out.rstrip('/')}/{name}/coder")
    metrics = result.metrics or {}
    print(
        f"trained {name}: {metrics.get('step', '?')} steps, fvu {metrics.get('fvu', float('nan')):.4f}, "
        f"l0 {metrics.get('l0', float('nan')):.1f} in {time.perf_counter() - start:.0f}s; coder in {dest}"
    )
    return 0


def add_sweep_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="run a sweep spec with Ray Tune (grid or Optuna); re-running resumes it",
        description="Validate the spec, create or resume the activation cache, then train one coder per trial with "
        "Ray Tune and write OUTPUT/trials.parquet (one row per trial: settings, held-out FVU, L0, dead, frequent "
        "and dense fractions, checkpoint). Running it again with the same spec and output resumes the sweep: "
        "finished trials are kept, interrupted ones continue from their last checkpoint.",
    )
    p.add_argument("spec", help="a YAML sweep spec, e.g. sweeps/quickstart.yaml")
    p.add_argument("--output", default=None, help="run folder (local path or URI); overrides the spec's output")
    p.add_argument("--dry-run", action="store_true", help="print the trial plan and resources; run nothing")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=run_sweep_cmd)


def run_sweep_cmd(args: argparse.Namespace) -> int:
    from ray_jobs.spec import describe_plan, load_spec

    spec = load_spec(args.spec)
    if args.output:
        spec = spec.model_copy(update={"output": args.output})
    if args.dry_run:
        print(describe_plan(spec, _known_widths(spec), source=args.spec))
        return 0

    from ray_jobs.runtime import connect, storage_path
    from ray_jobs.sweep_job import TRIALS_TABLE, run_sweep

    connect(args.address)
    start = time.perf_counter()
    if not args.quiet:
        print(f"sweep {spec.name}: {spec.num_trials()} trials into {storage_path(spec.run_dir)}", file=sys.stderr)

    def cache_progress(done: int, total: int) -> None:
        if not args.quiet:
            print(f"\r  caching activations: shard {done}/{total}", end="", file=sys.stderr, flush=True)

    results = run_sweep(spec, cache_progress=cache_progress, quiet=args.quiet)
    failed = [r for r in results if r.error is not None]
    table = f"{storage_path(spec.run_dir).rstrip('/')}/{TRIALS_TABLE}"
    print(
        f"sweep {spec.name}: {len(results) - len(failed)} trials finished, {len(failed)} failed, "
        f"{time.perf_counter() - start:.0f}s; trials table: {table}"
    )
    return 1 if failed else 0


def add_score_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "score",
        help="fidelity, density and interpretability of every coder of a sweep's run folder (Ray tasks)",
        description="For every finished trial of RUN/trials.parquet, and for the MLP's own neurons at the same k "
        "(the baseline): explain each latent on held-out explain windows and score the explanation on held-out "
        "test windows of other documents; splice each coder into the model for its CE increase, KL, top-1 drop "
        "and loss recovered; ablate bins of latents by score. The default judge is lexical explainability "
        "(token/bigram rules), a proxy that needs no LLM; --judge llm adds an OpenAI-compatible LLM judge. "
        "Writes RUN/latents.parquet, coders.parquet, ablation.parquet and density.parquet; running it again does "
        "only what is missing. Defaults come from the sweep spec's `scoring` section.",
    )
    p.add_argument("run", help="a run folder written by `bae sweep`")
    p.add_argument("--judge", choices=JUDGE_CHOICES, default="lexical", help="lexical (default), or llm as well")
    p.add_argument(
        "--min-examples",
        type=int,
        default=None,
        help="activating windows a latent needs to be scored (default: 200 per 10M tokens, at least 5)",
    )
    p.add_argument("--test-windows", type=int, default=None, help="activating test windows per latent (50)")
    p.add_argument("--fidelity-tokens", type=int, default=None, help="held-out tokens for the spliced CE (16384)")
    p.add_argument("--ablation-bins", type=int, default=None, help="bins of the ablation by score; 0 skips it (5)")
    p.add_argument(
        "--lm-dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="the language model's precision for fidelity and ablation (float32)",
    )
    p.add_argument("--seed", type=int, default=None)
    llm = p.add_argument_group("LLM judge (--judge llm), any OpenAI-compatible chat-completions server")
    llm.add_argument(
        "--llm-base-url", default=None, help="e.g. http://127.0.0.1:8080/v1 (default: $BAE_JUDGE_BASE_URL)"
    )
    llm.add_argument("--llm-model", default=None, help="model name (default: $BAE_JUDGE_MODEL)")
    llm.add_argument(
        "--llm-api-key-env",
        default="OPENAI_API_KEY",
        help="name of the environment variable that holds the API key (read, never logged or written)",
    )
    llm.add_argument("--llm-latents", type=int, default=50, help="eligible latents per dictionary to judge (50)")
    llm.add_argument("--llm-concurrency", type=int, default=8, help="requests in flight at once (8)")
    llm.add_argument("--llm-timeout", type=float, default=60.0, help="seconds per request (60)")
    llm.add_argument("--llm-retries", type=int, default=3, help="retries of a failed request, with backoff (3)")
    llm.add_argument(
        "--llm-cache",
        default=None,
        help="folder of the on-disk response cache (default: RUN/llm/cache for a local run folder)",
    )
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a local Ray)")
    p.set_defaults(func=run_score_cmd)


JUDGE_CHOICES = ("lexical", "llm")


def _judge_config(args: argparse.Namespace, run: str):
    from bae_core.judge import JudgeConfig

    cache = args.llm_cache
    if cache is None and "://" not in run:
        cache = str(Path(run) / "llm" / "cache")
    overrides = {k: v for k, v in (("base_url", args.llm_base_url), ("model", args.llm_model)) if v}
    return JudgeConfig.from_env(
        **overrides,
        api_key_env=args.llm_api_key_env,
        concurrency=args.llm_concurrency,
        timeout_s=args.llm_timeout,
        max_retries=args.llm_retries,
        cache_dir=cache,
    )


def run_score_cmd(args: argparse.Namespace) -> int:
    from ray_jobs.runtime import connect, storage_path
    from ray_jobs.score_job import CODERS_TABLE, LATENTS_TABLE, ScoreOptions, plan, read_table, run_score

    run = storage_path(args.run)
    tasks = plan(run)  # a missing or empty trials table is reported before Ray starts
    options = ScoreOptions.from_run(
        run,
        min_examples=args.min_examples,
        test_windows=args.test_windows,
        fidelity_tokens=args.fidelity_tokens,
        ablation_bins=args.ablation_bins,
        lm_dtype=args.lm_dtype,
        seed=args.seed,
        judge=args.judge,
        llm=_judge_config(args, run) if args.judge == "llm" else None,
        llm_latents=args.llm_latents if args.judge == "llm" else None,
    )
    connect(args.address)
    start = time.perf_counter()
    print(f"scoring {len(tasks)} dictionaries of {run}", file=sys.stderr, flush=True)

    def progress(done: int, total: int, what: str) -> None:
        print(f"  [{done}/{total}] {what} ({time.perf_counter() - start:.0f}s)", file=sys.stderr, flush=True)

    def notice(text: str) -> None:
        print(f"  {text}", file=sys.stderr, flush=True)

    latents = run_score(run, options, progress=progress, notice=notice)
    coders = read_table(run, CODERS_TABLE)
    print(format_coders(coders))
    from analysis.report import seeds_summary

    seeds = seeds_summary(coders)
    if not seeds.empty:
        print("across seeds (mean ± standard deviation):\n" + seeds.to_string(index=False))
    print(
        f"{len(latents)} latents of {len(coders)} dictionaries scored in {time.perf_counter() - start:.0f}s; "
        f"tables: {run.rstrip('/')}/{LATENTS_TABLE}, {run.rstrip('/')}/{CODERS_TABLE}"
    )
    return 0


def format_coders(coders) -> str:
    """The per-dictionary summary `bae score` prints."""
    from bae_core.lexical import LABEL

    columns = [
        ("dictionary", "dictionary"),
        ("k", "k"),
        ("l0_heldout", "L0"),
        ("hookpoint", "hookpoint"),
        ("ce_increase", "CE+"),
        ("loss_recovered", "recovered"),
        ("kl", "KL"),
        ("dead_fraction", "dead"),
        ("frequent_fraction", ">1%"),
        ("dense_fraction", ">10%"),
        ("coverage", "coverage"),
        ("eligible", "eligible"),
        ("test_windows_median", "tests"),
        ("token_auroc", "AUROC"),
        ("auroc_ci", "95% CI"),
        ("token_auroc_weighted", "AUROC(freq)"),
        ("shuffled_token_auroc", "shuffled"),
        ("detection_balanced_accuracy", "LLM det"),
        ("fuzzing_balanced_accuracy", "LLM fuzz"),
        ("llm_failed_fraction", "LLM failed"),
    ]
    coders = coders.copy()
    if "token_auroc_ci_low" in coders:
        coders["auroc_ci"] = [
            f"[{lo:.3f}, {hi:.3f}]" if lo == lo else "-"
            for lo, hi in zip(coders["token_auroc_ci_low"], coders["token_auroc_ci_high"], strict=True)
        ]
    if "underpowered" in coders:
        coders["dictionary"] = [
            f"{d} (underpowered)" if u else d for d, u in zip(coders["dictionary"], coders["underpowered"], strict=True)
        ]
    present = [(c, h) for c, h in columns if c in coders.columns]
    table = coders[[c for c, _ in present]].rename(columns=dict(present))
    return (
        f"AUROC: {LABEL}, mean token AUROC over eligible latents (0.5 = chance) with its 95% bootstrap interval; "
        "tests: median activating test windows per eligible latent; L0: held-out; CE+: spliced CE increase (nats)\n"
        + table.to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep="-")
    )


def add_study_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "study",
        help="the whole study of a sweep spec: bae sweep, then bae score, then bae report (each resumes)",
        description="Run (or resume) the sweep of SPEC, score every coder (lexical judge, fidelity, density, "
        "ablation), and write the frontier table and the report. Each step keeps what an earlier, interrupted "
        "run finished. `make quickstart` runs it on sweeps/quickstart.yaml.",
    )
    p.add_argument("spec", help="a YAML sweep spec, e.g. sweeps/quickstart.yaml")
    p.add_argument("--output", default=None, help="run folder (local path or URI); overrides the spec's output")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--out", default=None, help="folder of the report (default: RUN/report)")
    p.set_defaults(func=run_study_cmd)


def run_study_cmd(args: argparse.Namespace) -> int:
    from ray_jobs.runtime import storage_path
    from ray_jobs.spec import load_spec

    spec = load_spec(args.spec)
    run = storage_path(args.output or spec.run_dir)
    start = time.perf_counter()
    steps = (
        ("sweep", run_sweep_cmd, {"spec": args.spec, "output": args.output, "dry_run": False, "quiet": False}),
        ("score", run_score_cmd, {"run": run, **SCORE_DEFAULTS}),
        ("report", run_report_cmd, {"run": run, "out": args.out}),
    )
    for i, (name, command, values) in enumerate(steps, 1):
        print(f"[{i}/3] {name} ({time.perf_counter() - start:.0f}s)", file=sys.stderr, flush=True)
        rc = command(argparse.Namespace(address=args.address, **values))
        if rc:
            print(f"bae study: `bae {name}` failed (exit {rc}); fix it and run the same command again to resume")
            return rc
    print(f"study done in {time.perf_counter() - start:.0f}s")
    return 0


SCORE_DEFAULTS = {
    "judge": "lexical",
    "min_examples": None,
    "test_windows": None,
    "fidelity_tokens": None,
    "ablation_bins": None,
    "lm_dtype": None,
    "seed": None,
    "llm_latents": 50,
}
"""`bae score`'s options when `bae study` runs it: the spec's `scoring` section decides."""


def add_report_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="write the frontier table and a Markdown report with plots for a scored run (no Ray needed)",
        description="From RUN/trials.parquet and the tables `bae score` wrote: RUN/frontier.parquet (the Pareto "
        "frontier of reconstruction against interpretability per coder family), and RUN/report/report.md with "
        "its PNG figures: the frontier, firing-rate histograms, firing rate vs score, the ablation by score, "
        "training curves, the coders' table and the paper's claims checked on this run's numbers.",
    )
    p.add_argument("run", help="a run folder scored by `bae score`")
    p.add_argument("--out", default=None, help="folder of the report (default: RUN/report)")
    p.set_defaults(func=run_report_cmd)


def run_report_cmd(args: argparse.Namespace) -> int:
    from analysis import claims_table, load_run, write_report

    path = write_report(args.run, args.out)
    tables = load_run(args.run)
    claims = claims_table(tables.coders, tables.latents)
    print("the paper's claims on this run's numbers:")
    for r in claims.itertuples():
        print(f"  {r.verdict:<13} {r.claim}")
    run = args.run.rstrip("/")
    print(f"report: {path}")
    print(f"tables: {run}/trials.parquet, {run}/latents.parquet, {run}/coders.parquet, {run}/frontier.parquet")
    return 0


def _known_widths(spec) -> dict[str, dict[str, int]] | None:
    """Hookpoint widths for a dry run: from the existing cache, else the model's config; validates names."""
    from bae_core.cache import load_manifest
    from bae_core.lm import model_shape

    try:
        manifest = load_manifest(spec.cache_root)
    except ValueError:
        manifest = None
    if manifest is not None:
        return {name: info.columns for name, info in manifest.hookpoints.items()}
    cache = spec.cache_request()
    shape = model_shape(cache.model, revision=cache.revision)
    return shape.hookpoint_widths(cache.hookpoints) if shape else None


def format_table(rows: list[dict]) -> str:
    columns = ["activation", "kind", "regime", "fvu", "mmcs", "hungarian_cos", "firing_f1", "l0", "dead_fraction"]
    cells = [[f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bae",
        description="Binary and continuous sparse coders on language-model activations.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    add_synth_parser(sub)
    add_cache_parser(sub)
    add_train_parser(sub)
    add_sweep_parser(sub)
    add_score_parser(sub)
    add_report_parser(sub)
    add_study_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if not args.verbose:
        # The commands print their own progress; Ray Data and Tune log theirs to files under /tmp/ray.
        for name in ("ray.data", "ray.tune", "ray.train"):
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except (ValueError, ConnectionError) as err:
        print(f"bae {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
