"""`bae score`: interpretability (lexical or LLM judge), fidelity, density and ablation of every coder of a
sweep."""

from __future__ import annotations

import argparse
import sys
import time


def add_score_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "score",
        add_help=False,
        help="fidelity, density and interpretability of every coder of a sweep's run folder (Ray tasks)",
        description="For every finished trial of RUN/trials.parquet, and for the MLP's own neurons at the same k "
        "(the baseline): explain each latent on held-out explain windows and score the explanation on held-out "
        "test windows of other documents; splice each coder into the model for its CE increase, KL, top-1 drop "
        "and loss recovered; ablate bins of latents by score. The default judge is lexical explainability "
        "(token/bigram rules), a proxy that needs no LLM; --judge llm adds an OpenAI-compatible LLM judge. "
        "Writes RUN/latents.parquet, coders.parquet, ablation.parquet and density.parquet; running it again does "
        "only what is missing. Defaults come from the sweep spec's `scoring` section.",
    )
    p.add_argument("-h", "--help", action=RunHelp, help="show this help (after RUN: with the values RUN will use)")
    p.add_argument("run", help="a run folder written by `bae sweep`")
    p.add_argument("--judge", choices=JUDGE_CHOICES, default="lexical", help="lexical, or llm as well")
    p.add_argument(
        "--coder",
        action="append",
        default=[],
        metavar="SOURCE",
        help="also score a coder trained elsewhere: `bae import RUN SOURCE` first (a sparsify or SAELens folder, a "
        "hub repo id); repeatable",
    )
    spec_option(p, "--min-examples", type=int, help="activating windows a latent needs to be scored")
    spec_option(p, "--test-windows", type=int, help="activating test windows per latent, and as many non-activating")
    spec_option(p, "--fidelity-tokens", type=int, help="held-out tokens for the spliced CE, KL and top-1")
    spec_option(p, "--ablation-bins", type=int, help="equal-firing-mass bins of the ablation by score; 0 skips it")
    spec_option(
        p,
        "--lm-dtype",
        choices=("float32", "bfloat16", "float16"),
        help="the language model's precision for fidelity and ablation",
    )
    spec_option(
        p,
        "--gpus-per-task",
        type=float,
        help="GPUs of each task that runs the language model (fidelity and ablation); fractions share a GPU; 0: CPUs",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the test windows' draws and of the LLM judge's sample (default: 0)",
    )
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
    llm.add_argument("--llm-latents", type=int, default=50, help="eligible latents per dictionary to judge")
    llm.add_argument("--llm-concurrency", type=int, default=8, help="requests in flight at once")
    llm.add_argument("--llm-timeout", type=float, default=60.0, help="seconds per request")
    llm.add_argument("--llm-retries", type=int, default=3, help="retries of a failed request, with backoff")
    llm.add_argument(
        "--llm-cache",
        default=None,
        help="folder or URI of the response cache (default: RUN/llm/cache)",
    )
    llm.add_argument(
        "--llm-no-logprobs",
        action="store_true",
        help="do not ask for the answers' logprobs: detection and fuzzing AUROC from the 0/1 answers",
    )
    llm.add_argument(
        "--llm-constrain-answers",
        action="store_true",
        help="constrain scoring answers to a list of 0/1 with a JSON schema (llama.cpp's servers; small judges)",
    )
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a local Ray)")
    p.set_defaults(func=run_score_cmd)


JUDGE_CHOICES = ("lexical", "llm")
SPEC_DEFAULTS = {
    "min_examples": "200 per 10M held-out tokens, at least 5",
    "test_windows": 50,
    "fidelity_tokens": 16384,
    "ablation_bins": 5,
    "lm_dtype": "float32",
    "gpus_per_task": 0,
}
"""What applies to an option of `bae score` that neither the command line nor the run's spec sets."""


def spec_option(parser: argparse.ArgumentParser, flag: str, **kwargs) -> None:
    """An option whose value, when not given, comes from the run's spec (its `scoring` section)."""
    dest = flag.lstrip("-").replace("-", "_")
    help_text = f"{kwargs.pop('help')} (default: the run's spec, scoring.{dest}; if it has none, {SPEC_DEFAULTS[dest]})"
    parser.add_argument(flag, default=None, help=help_text, **kwargs)


class RunHelp(argparse.Action):
    """`bae score --help`; after RUN (`bae score RUN --help`), each spec-governed option shows the value RUN's
    spec gives it, which is what a run of the command would use."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        run = getattr(namespace, "run", None)
        if run:
            applied = _spec_values(run)
            for action in parser._actions:
                if action.dest in applied and action.help:
                    action.help = f"{action.help.split(' (default:')[0]} (for {run}: {applied[action.dest]})"
        parser.print_help()
        parser.exit()


def _spec_values(run: str) -> dict:
    """The scoring values RUN's spec gives (with the defaults where it has none); {} when RUN is not a run."""
    from ray_jobs.runtime import storage_path
    from ray_jobs.score_plan import ScoreOptions

    try:
        options = ScoreOptions.from_run(storage_path(run))
    except Exception:  # not a run folder: the plain help is the answer
        return {}
    values = {name: getattr(options, name) for name in SPEC_DEFAULTS}
    if values["min_examples"] is None:
        values["min_examples"] = SPEC_DEFAULTS["min_examples"]
    return values


def _judge_config(args: argparse.Namespace, run: str):
    from bae_core.evaluation.judge import JudgeConfig

    # RUN/llm/cache, for a run folder at a URI (s3://...) too.
    cache = args.llm_cache or f"{run.rstrip('/')}/llm/cache"
    overrides = {k: v for k, v in (("base_url", args.llm_base_url), ("model", args.llm_model)) if v}
    return JudgeConfig.from_env(
        **overrides,
        api_key_env=args.llm_api_key_env,
        concurrency=args.llm_concurrency,
        timeout_s=args.llm_timeout,
        max_retries=args.llm_retries,
        cache_dir=cache,
        logprobs=not args.llm_no_logprobs,
        constrain_answers=args.llm_constrain_answers,
    )


def run_score_cmd(args: argparse.Namespace) -> int:
    from ray_jobs.cli.checks import judge_server, scored_run
    from ray_jobs.runtime import connect, storage_path
    from ray_jobs.score_job import run_score
    from ray_jobs.score_plan import CODERS_TABLE, LATENTS_TABLE, ScoreOptions, plan, read_table

    run = storage_path(args.run)
    scored_run(run)
    for source in args.coder:
        from ray_jobs.import_job import import_coders

        for r in import_coders(run, source, notice=lambda text: print(f"  {text}", file=sys.stderr, flush=True)):
            print(f"imported {r['coder_id']} ({r['origin']}) at {r['hookpoint']}", file=sys.stderr, flush=True)
    tasks = plan(run)  # a missing or empty trials table is reported before Ray starts
    options = ScoreOptions.from_run(
        run,
        min_examples=args.min_examples,
        test_windows=args.test_windows,
        fidelity_tokens=args.fidelity_tokens,
        ablation_bins=args.ablation_bins,
        lm_dtype=args.lm_dtype,
        gpus_per_task=args.gpus_per_task,
        seed=args.seed,
        judge=args.judge,
        llm=_judge_config(args, run) if args.judge == "llm" else None,
        llm_latents=args.llm_latents if args.judge == "llm" else None,
    )
    if options.llm is not None:
        judge_server(options.llm.base_url)
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
    from bae_core.evaluation.lexical import LABEL

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
