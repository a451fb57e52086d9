"""Checks of a command's inputs that run before anything heavy (Ray, the language model): each raises an
`InputError` that names the input and the fix."""

from __future__ import annotations

import os
from pathlib import Path

from ray_jobs.cli.errors import InputError


def writable_folder(path: str, option: str) -> None:
    """`path` is, or can be created as, a folder this process can write to. URIs (s3://...) are checked by
    opening their filesystem only: writing is tried by the command itself."""
    if "://" in path and not path.startswith("file://"):
        from bae_core.data.cache import open_filesystem

        try:
            open_filesystem(path)
        except Exception as err:  # pyarrow raises ArrowInvalid or OSError for an unknown scheme or bad URI
            raise InputError(f"{option}: cannot open {path!r} ({err})") from None
        return
    local = Path(path.removeprefix("file://")).expanduser()
    if local.exists() and not local.is_dir():
        raise InputError(f"{option}: {path} is a file, not a folder; give a folder (new or existing)")
    existing = local if local.exists() else next((p for p in local.absolute().parents if p.exists()), None)
    if existing is None or not existing.is_dir():
        raise InputError(f"{option}: {path} cannot be created ({existing} is not a folder)")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == local else f" ({existing} is not writable)"
        raise InputError(f"{option}: cannot write to {path}{where}; choose a folder you can write to")


def model_and_dataset(model: str, revision: str | None, dataset: str, text_column: str) -> None:
    """The model can be loaded and the dataset read, as far as can be told without loading them."""
    from bae_core.data.lm import check_model_available
    from bae_core.data.text import EMBEDDED_CORPUS, LOCAL_FILE_BUILDERS, check_dataset_file

    check_model_available(model, revision)
    if dataset != EMBEDDED_CORPUS and (Path(dataset).suffix.lower() in LOCAL_FILE_BUILDERS or Path(dataset).exists()):
        if Path(dataset).is_dir():
            return  # a dataset folder is read by `datasets` itself
        check_dataset_file(dataset, text_column)


def scored_run(run: str) -> None:
    """A run folder that `bae score` or `bae report` can read: it exists and holds a sweep's trials table."""
    from bae_core.data.cache import open_filesystem
    from ray_jobs.trials import TRIALS_TABLE

    try:
        fs, base = open_filesystem(run)
        kind = fs.get_file_info(base).type.name
    except Exception as err:
        raise InputError(f"run: cannot open {run!r} ({err})") from None
    if kind == "NotFound":
        raise InputError(f"run: no such folder {run!r}; give a run folder written by `bae sweep`")
    if kind != "Directory":
        raise InputError(f"run: {run!r} is a file; give a run folder written by `bae sweep`")
    if fs.get_file_info(f"{base}/{TRIALS_TABLE}").type.name == "NotFound":
        raise InputError(f"run: {run!r} has no {TRIALS_TABLE}; run `bae sweep` into this folder first")


def judge_server(base_url: str, timeout: float = 5.0) -> None:
    """Something listens at the LLM judge's server (one TCP connection): a wrong --llm-base-url is named before
    any scoring rather than after the lexical scores."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(base_url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    shown = f"{parts.scheme}://{parts.hostname}:{port}{parts.path}"  # never the user:password part
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError as err:
        raise InputError(
            f"--llm-base-url: cannot reach the judge at {shown} ({err.strerror or err}); check the server and the "
            "URL (or BAE_JUDGE_BASE_URL)"
        ) from None
