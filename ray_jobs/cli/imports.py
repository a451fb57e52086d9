"""`bae import`: coders trained elsewhere (sparsify, SAELens, another run, a hub repo) registered in a run, so that
`bae score`, `bae probe` and `bae report` treat them like its own coders."""

from __future__ import annotations

import argparse
import sys


def add_import_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import",
        help="register coders trained elsewhere (sparsify, SAELens, a hub repo) in a run, to be scored beside its own",
        description="Convert the coder(s) of SOURCE into this project's coder format under RUN/imported/, check "
        "the conversion against the package that wrote them (sparsify or SAELens, when installed) on the run's "
        "held-out activations, measure their held-out FVU and L0 as a trial's, and register them in "
        "RUN/imported.parquet; `bae score RUN` then scores them (and only what is new). SOURCE is a sparsify "
        "checkpoint folder (cfg.json + sae.safetensors) or a folder of them, one per hookpoint; a SAELens folder "
        "(cfg.json + sae_weights.safetensors: standard, topk, jumprelu, batchtopk saved as jumprelu, transcoders); "
        "a coder folder of another run; or a Hugging Face hub repo id (owner/name[/sub/folder]). What a coder of "
        "this project cannot compute is refused by name. No Ray needed.",
    )
    p.add_argument("run", help="a run folder written by `bae sweep` (its cache holds the hookpoint)")
    p.add_argument("source", help="a coder folder, a folder of hookpoint folders, or a hub repo id owner/name")
    p.add_argument(
        "--hookpoint",
        default=None,
        help="the run's hookpoint the coder reads, e.g. layers.9.mlp (default: from the checkpoint's own hook name: "
        "blocks.N.hook_mlp_out is layers.N.mlp, blocks.N.hook_resid_post is layers.N); in a folder of hookpoint "
        "folders, the one to import",
    )
    p.add_argument(
        "--name",
        default=None,
        help="name of the import; the coder id is imported-NAME (default: the folder's or repo's name)",
    )
    p.add_argument(
        "--check-tokens",
        type=int,
        default=2048,
        help="held-out tokens on which the conversion is compared with the original package",
    )
    p.set_defaults(func=run_import_cmd)


def run_import_cmd(args: argparse.Namespace) -> int:
    from ray_jobs.cli.checks import scored_run
    from ray_jobs.cli.errors import InputError
    from ray_jobs.import_job import import_coders
    from ray_jobs.runtime import storage_path

    if args.check_tokens < 1:
        raise InputError(f"--check-tokens: must be >= 1, got {args.check_tokens}")
    run = storage_path(args.run)
    scored_run(run)

    def notice(text: str) -> None:
        print(f"  {text}", file=sys.stderr, flush=True)

    rows = import_coders(
        run, args.source, hookpoint=args.hookpoint, name=args.name, check_tokens=args.check_tokens, notice=notice
    )
    for r in rows:
        source = f" (from {r['source_hook_name']})" if r["source_hook_name"] not in (None, r["hookpoint"]) else ""
        print(
            f"{r['coder_id']}: {r['format']} {r['architecture']} as a {r['activation']} {r['kind']} (k={r['k']}, "
            f"{r['num_latents']} latents) at {r['hookpoint']}{source}; held-out FVU {r['fvu']:.3f}, L0 {r['l0']:.1f} "
            f"on {r['eval_tokens']} tokens"
        )
        if r.get("conversion"):
            print(f"  converted: {r['conversion']}")
        if r.get("check_reference"):
            print(
                f"  same codes and outputs as {r['check_reference']} on {r['check_tokens']} held-out tokens: max "
                f"|code diff| {r['check_max_code_diff']:.2e}, max |output diff| {r['check_max_output_diff']:.2e}, "
                f"{r['check_support_mismatch']} tokens with other active latents"
            )
    print(f"registered in {run.rstrip('/')}/imported.parquet; score with: bae score {args.run}")
    return 0
