"""`bae export`: a coder as a SAELens folder, checked by loading it back with SAELens."""

from __future__ import annotations

import argparse
import sys


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a coder as a SAELens folder (sae_lens.SAE.load_from_disk reads it), checked by loading it back",
        description="Write CODER (a coder folder: cfg.json + sae.safetensors; or RUN with --trial) as a SAELens 6 "
        "folder (cfg.json + sae_weights.safetensors). topk SAEs become SAELens' topk, jumprelu coders its jumprelu "
        "(transcoders: jumprelu_transcoder, jumprelu_skip_transcoder), batchtopk coders a jumprelu with their "
        "inference threshold on every latent (as SAELens saves its own batchtopk SAEs). No SAELens architecture "
        "computes binary coders (latents exactly 0 or 1), topk or groupmax transcoders or groupmax SAEs: they are "
        "refused, or with --custom-architecture written as the architecture 'bae_sparse_coder', which SAELens "
        "loads after `from bae_core.coders.saelens import register_saelens; register_saelens()`. The folder is "
        "loaded back with SAELens (when installed) and must give the coder's codes and outputs, on the run's "
        "held-out activations with --trial, else on normal inputs of scales 0.1 to 1000.",
    )
    p.add_argument("coder", help="a coder folder (cfg.json + sae.safetensors), or a run folder with --trial")
    p.add_argument(
        "--trial", default=None, help="with CODER a run: the trial id (or coder id, imported ones too) to export"
    )
    p.add_argument("--format", choices=("saelens",), default="saelens", help="the format to write")
    p.add_argument("--out", required=True, help="the folder to write (created if needed)")
    p.add_argument(
        "--custom-architecture",
        action="store_true",
        help="write a coder no SAELens architecture computes as the registered architecture 'bae_sparse_coder'",
    )
    p.add_argument("--check-tokens", type=int, default=2048, help="inputs on which the written folder is checked")
    p.set_defaults(func=run_export_cmd)


def _coder_of_run(run: str, trial: str) -> tuple[str, str, str | None, str | None]:
    """(checkpoint, hookpoint, model, cache) of a trial or an imported coder of the run."""
    from bae_core.data.paths import resolve
    from ray_jobs.cli.checks import scored_run
    from ray_jobs.cli.errors import InputError
    from ray_jobs.score_plan import imported_tasks, read_table
    from ray_jobs.trials import TRIALS_TABLE

    scored_run(run)
    trials = read_table(run, TRIALS_TABLE)
    rows = trials[(trials["trial_id"] == trial) | ("trial-" + trials["trial_id"] == trial)]
    if len(rows) and isinstance(rows["checkpoint"].iloc[0], str):
        r = rows.iloc[0]
        return resolve(run, r["checkpoint"]), r["hookpoint"], r.get("model"), resolve(run, r["cache"])
    imported = {t.coder_id: t for t in imported_tasks(run)}
    if trial in imported:
        t = imported[trial]
        return t.checkpoint, t.hookpoint, None, t.cache
    known = sorted(trials["trial_id"]) + sorted(imported)
    raise InputError(f"--trial: {trial!r} is no finished trial or imported coder of {run}; it has {', '.join(known)}")


def _inputs(coder, cache: str | None, hookpoint: str | None, tokens: int):
    """The cache's first held-out inputs of the coder; without a cache, normal inputs (seeded) whose scale sweeps
    0.1 to 1000 over the rows, so that latents fire whatever their thresholds."""
    import torch

    if cache is None:
        scales = torch.logspace(-1, 3, tokens)[:, None]
        x = torch.randn(tokens, coder.d_in, generator=torch.Generator().manual_seed(0)) * scales
        return x, "normal inputs of scales 0.1 to 1000"
    from bae_core.data.reader import iter_activation_batches

    xs, n = [], 0
    for batch in iter_activation_batches(
        cache, hookpoint, split="heldout", batch_size=4096, transcoder=coder.cfg.is_transcoder, shuffle_seed=None
    ):
        x = batch[0] if isinstance(batch, tuple) else batch
        xs.append(x[: tokens - n])
        n += len(xs[-1])
        if n >= tokens:
            break
    return torch.cat(xs), f"held-out activations of {hookpoint}"


def run_export_cmd(args: argparse.Namespace) -> int:
    from bae_core.coders.reference import compare, reference_outputs
    from bae_core.coders.saelens import export_saelens
    from bae_core.data.paths import local_folder
    from ray_jobs.cli.checks import writable_folder
    from ray_jobs.cli.errors import InputError, RunFailed
    from ray_jobs.runtime import storage_path
    from ray_jobs.score_tasks import _load_coder

    if args.check_tokens < 1:
        raise InputError(f"--check-tokens: must be >= 1, got {args.check_tokens}")
    writable_folder(args.out, "--out")
    hookpoint = model = cache = None
    if args.trial is not None:
        checkpoint, hookpoint, model, cache = _coder_of_run(storage_path(args.coder), args.trial)
    else:
        checkpoint = storage_path(args.coder)
        with local_folder(checkpoint) as d:
            from pathlib import Path

            if not (Path(d) / "sae.safetensors").is_file():
                raise InputError(
                    f"CODER {args.coder}: not a coder folder (cfg.json + sae.safetensors); for a run, add --trial"
                )
    coder = _load_coder(checkpoint)
    architecture = export_saelens(coder, args.out, hookpoint=hookpoint, model=model, custom=args.custom_architecture)
    print(f"{args.out}: SAELens architecture {architecture} ({coder.cfg.activation} {coder.cfg.kind}, k={coder.cfg.k})")
    x, what = _inputs(coder, cache, hookpoint, args.check_tokens)
    try:
        codes, outputs, reference = reference_outputs(args.out, "saelens", x)
    except ModuleNotFoundError:
        print("  not loaded back: sae-lens is not installed", file=sys.stderr)
        return 0
    check = compare(coder, x, codes, outputs, reference)
    if not check.ok:
        raise RunFailed(f"{args.out}: loaded back, it does not compute what the coder does: {check.describe()}")
    print(f"  loaded back, the same codes and outputs, {check.describe()} ({what})")
    return 0
