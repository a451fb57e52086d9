"""Connecting to Ray: a local cluster started for you, `RAY_ADDRESS`, or an explicit address."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
from collections.abc import Iterator
from urllib.parse import urlsplit

log = logging.getLogger(__name__)


def connect(address: str | None = None, *, num_cpus: int | None = None, quiet: bool = True) -> None:
    """Join the Ray cluster at `address` (or `RAY_ADDRESS`), or start a local one when neither is set.

    Inside `ray job submit` the driver already runs on the cluster and `RAY_ADDRESS` is set for it.
    An unreachable address is a ConnectionError that names it.
    """
    import ray

    if ray.is_initialized():
        return
    # A later `ray start --head` turns token auth on once any ray.init() has written ~/.ray/auth_token;
    # local use is consistent only when every process agrees, so default to no auth unless asked.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs = {"log_to_driver": False, "logging_level": logging.WARNING} if quiet else {}
    if address and address not in ("auto", "local"):
        check_reachable(address)
    try:
        if address in (None, "local"):
            # "local" always starts a new cluster; None joins one that `ray start` runs on this machine, if any.
            ray.init(address=address, num_cpus=num_cpus, include_dashboard=False, **kwargs)
        else:
            ray.init(address=address, **kwargs)
    except (ConnectionError, TimeoutError, RuntimeError) as err:
        where = address or "a new local cluster"
        raise ConnectionError(
            f"ray: cannot connect to {where}: {err}. Check the address (RAY_ADDRESS or --address), "
            "that the head node is up (`ray status`), and that this machine can reach it"
        ) from err
    log.info("ray: connected to %s", ray.get_runtime_context().gcs_address)


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast, naming the address, when nothing listens there: `ray.init` would wait minutes first."""
    parts = urlsplit(address if "://" in address else f"ray-gcs://{address}")
    host, port = parts.hostname, parts.port
    if port is None:
        port = 10001 if parts.scheme == "ray" else None
    if not host or port is None:
        raise ConnectionError(
            f"ray: {address!r} is not a Ray address; give host:port of the head node (e.g. 10.0.0.5:6379), "
            "or ray://host:10001 for Ray Client"
        )
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        raise ConnectionError(
            f"ray: cannot reach the cluster at {address} ({err.strerror or err}). Check the address (RAY_ADDRESS or "
            "--address), that the head node is up (`ray status` on it), and that this machine can reach its port"
        ) from None


def storage_path(path: str) -> str:
    """A run folder as Ray's storage wants it: URIs unchanged, local paths absolute (a job submitted with
    `--working-dir` runs in a temporary copy of it, where a relative path would be lost)."""
    if "://" in path:
        return path
    resolved = os.path.abspath(os.path.expanduser(path))
    if not os.path.isabs(os.path.expanduser(path)) and "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
        log.warning(
            "%s is relative, and this command runs inside `ray job submit`, so it is resolved in the job's temporary "
            "copy of the working directory: %s. Pass an absolute path, or a URI every node reaches (s3://...)",
            path,
            resolved,
        )
    return resolved


ACTOR_ARGUMENTS_NOTE = "has constructor arguments in the object store"
"""Ray's error-level note on every actor pool of Ray Data (its actors are restartable and their arguments live in
the object store); nothing a user can act on."""


@contextlib.contextmanager
def dropped_stderr_lines(*fragments: str) -> Iterator[None]:
    """While active, drop the lines that contain any of `fragments` from everything this process writes to its
    standard error, Ray's C++ core included (which Python's logging cannot filter); other lines pass unchanged."""
    wanted = [f.encode() for f in fragments]
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        with os.fdopen(read_end, "rb") as source:
            for line in source:
                if not any(fragment in line for fragment in wanted):
                    os.write(saved, line)

    thread = threading.Thread(target=pump, name="stderr-filter", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end: the pump reads to its end and stops
        thread.join(timeout=5)
        os.close(saved)
