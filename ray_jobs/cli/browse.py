"""`bae browse`: a static HTML feature browser of a scored run (`analysis.browse`); needs no Ray."""

from __future__ import annotations

import argparse
import sys
import time


def add_browse_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "browse",
        help="write a static HTML feature browser of a scored run: dictionaries, latents, examples (no Ray needed)",
        description="From the tables `bae score` wrote and the run's held-out cache: OUT/index.html, a site that "
        "opens from disk (no server) with every dictionary's key numbers; per dictionary a table of its latents, "
        "sortable and filterable; per latent its explanation, scores with the test windows they rest on, firing "
        "rate, activation histogram and example windows (top-activating, and the test windows the score used, by "
        "decile), re-encoded with the coder from the held-out split; and a binary and a continuous coder side by "
        "side on the same held-out documents. Running it again redoes only the dictionaries whose scores, "
        "checkpoint or options changed.",
    )
    p.add_argument("run", help="a run folder scored by `bae score`")
    p.add_argument("--out", default=None, help="folder of the browser, on this machine (default: RUN/browse)")
    p.add_argument(
        "--latents",
        default="all",
        help="latents with a page and examples: all (every latent that fires on the held-out split), eligible "
        "(those the judge scored), or indices and ranges in every dictionary, e.g. 0-99,512",
    )
    p.add_argument("--coders", default=None, help="comma-separated coder ids to include (default: every dictionary)")
    p.add_argument(
        "--pair",
        default=None,
        metavar="BINARY,CONTINUOUS",
        help="the two coder ids the side-by-side page opens with (default: a binary coder and the continuous one "
        "of the same kind, hookpoint and k)",
    )
    p.add_argument("--top-windows", type=int, default=10, help="top-activating windows per latent")
    p.add_argument("--nonactivating-windows", type=int, default=5, help="non-activating test windows per latent")
    p.add_argument("--documents", type=int, default=3, help="held-out test-side documents on the side-by-side page")
    p.add_argument("--document-tokens", type=int, default=128, help="tokens of each of those documents")
    p.set_defaults(func=run_browse_cmd)


def run_browse_cmd(args: argparse.Namespace) -> int:
    from analysis.browse import BrowseOptions, write_browser
    from bae_core.data.cache import open_filesystem
    from bae_core.data.paths import is_uri
    from ray_jobs.cli.checks import scored_run, writable_folder
    from ray_jobs.cli.console import Progress
    from ray_jobs.cli.errors import InputError
    from ray_jobs.lock import folder_lock

    scored_run(args.run)
    fs, base = open_filesystem(args.run)
    for table in ("coders.parquet", "latents.parquet"):  # bae score's tables (ray_jobs.score_plan imports Ray)
        if fs.get_file_info(f"{base}/{table}").type.name == "NotFound":
            raise InputError(f"run: {args.run!r} has no {table}; run `bae score {args.run}` first")
    if args.out is None and is_uri(args.run):
        raise InputError(f"--out: the run {args.run} is not on this machine; give a local folder for the browser")
    out = args.out or f"{args.run.rstrip('/')}/browse"
    if is_uri(out):
        raise InputError(f"--out: {out} is a URI; the browser is opened from disk, so give a local folder")
    writable_folder(out, "--out")
    pair = None
    if args.pair is not None:
        pair = tuple(c.strip() for c in args.pair.split(","))
        if len(pair) != 2 or not all(pair):
            raise InputError(f"--pair: give two coder ids, BINARY,CONTINUOUS; got {args.pair!r}")
    try:  # the library's errors name its fields (top_windows: ...); here they are options (--top-windows: ...)
        options = BrowseOptions(
            latents=args.latents,
            coders=tuple(c.strip() for c in args.coders.split(",") if c.strip()) if args.coders else None,
            pair=pair,
            top_windows=args.top_windows,
            nonactivating_windows=args.nonactivating_windows,
            documents=args.documents,
            document_tokens=args.document_tokens,
        )
    except ValueError as err:
        raise _as_option(err) from None
    start = time.perf_counter()
    progress = Progress("dictionaries")
    with folder_lock(out, "bae browse"):
        try:
            summary = write_browser(args.run, out, options, progress=lambda done, total, _: progress(done, total))
        except ValueError as err:
            raise _as_option(err) from None
    progress.end()
    for coder_id, count in summary.mismatched.items():
        print(
            f"warning: {coder_id}: the redrawn test windows of {count} latent(s) differ in number from "
            "latents.parquet's (the cache or the checkpoint changed since `bae score`); its page says so",
            file=sys.stderr,
        )
    up_to_date = summary.dictionaries - summary.redone
    print(
        f"browser: {summary.index} ({summary.dictionaries} dictionaries, {summary.latents:,} latent pages, "
        f"{summary.bytes / 1e6:.1f} MB; {summary.redone} written, {up_to_date} up to date; "
        f"{time.perf_counter() - start:.0f} s)"
    )
    print(f"open file://{summary.index.resolve()} in a browser (no server needed)")
    return 0


def _as_option(err: ValueError) -> Exception:
    """An error of `analysis.browse` that names one of its fields, named by its option instead."""
    from ray_jobs.cli.errors import InputError

    field, _, rest = str(err).partition(":")
    options = ("latents", "coders", "pair", "top_windows", "nonactivating_windows", "documents", "document_tokens")
    return InputError(f"--{field.replace('_', '-')}:{rest}") if field in options and rest else err
