"""A lock file in a folder a command writes to (a run folder, a cache root), so that two commands never write
one folder at once:

    with folder_lock(run_dir, "bae sweep"):
        ...

The lock is FOLDER/.bae-lock, a small JSON file naming its holder: host, pid, command and start time (UTC).
A second command that finds it held is refused at once with `FolderLocked` (a ValueError) naming the holder.
A lock left by a killed command is taken over, with a warning that says whose it was. A process may take a
lock it already holds again (`bae study` runs `bae sweep` and `bae score` on one folder); it is released when
the outermost holder lets go.

- Local folders: the file is held with an exclusive `flock` for as long as the command runs. The kernel drops
  it when the process ends, however it ends, so a lock file whose flock is free is stale whatever it says
  (on network filesystems this holds where they share flock between hosts, as NFSv4 does).
- URIs (s3://, gs://, ...): object stores have no atomic create-if-absent in pyarrow's filesystems, so the lock
  is a best effort. The lock object is read first: a lock of a process of this host that is gone is taken over;
  any other lock is refused (one taken on another host may belong to a live command, which cannot be checked
  from here: once that command is gone, delete the lock object by hand). Otherwise this command writes its own,
  waits `SETTLE_S` and reads it back; of two commands that wrote within that time the last writer proceeds and
  the other is refused. Two commands that both read "free" but write more than `SETTLE_S` apart can still both
  proceed.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)

LOCK_FILE = ".bae-lock"
SETTLE_S = 1.0
"""Seconds a command waits after writing a lock object to a URI folder before reading it back."""


class FolderLocked(ValueError):
    """Another command holds the folder's lock."""


_held: dict[str, list] = {}  # lock path -> [depth, release]
_registry = threading.Lock()


@contextlib.contextmanager
def folder_lock(folder: str, command: str) -> Iterator[dict]:
    """Hold FOLDER/.bae-lock while the block runs; yields the holder's record. `command` names what holds it
    (e.g. "bae sweep"). Raises FolderLocked when another live command holds it."""
    key = _lock_path(folder)
    with _registry:
        entry = _held.get(key)
        if entry is not None:
            entry[0] += 1
    if entry is None:
        holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "command": command,
            "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "token": uuid.uuid4().hex,
        }
        release = _acquire(folder, key, holder)
        entry = [1, release, holder]
        with _registry:
            _held[key] = entry
    try:
        yield entry[2]
    finally:
        with _registry:
            entry[0] -= 1
            last = entry[0] == 0
            if last:
                del _held[key]
        if last:
            entry[1]()


def read_holder(folder: str) -> dict | None:
    """The record in FOLDER/.bae-lock (None when there is none); it may be a stale one."""
    from bae_core.data.cache import open_filesystem

    fs, base = open_filesystem(folder)
    return _read_store(fs, f"{base}/{LOCK_FILE}")


# ---- taking it -----------------------------------------------------------------------------------------------


def _lock_path(folder: str) -> str:
    if "://" in folder:
        return f"{folder.rstrip('/')}/{LOCK_FILE}"
    return os.path.join(os.path.abspath(os.path.expanduser(folder)), LOCK_FILE)


def _acquire(folder: str, path: str, holder: dict) -> Callable[[], None]:
    if "://" not in folder:
        release = _acquire_local(folder, path, holder)
        if release is not None:
            return release
    from bae_core.data.cache import open_filesystem

    fs, base = open_filesystem(folder)
    return _acquire_store(folder, fs, f"{base}/{LOCK_FILE}", holder)


def _acquire_local(folder: str, path: str, holder: dict) -> Callable[[], None] | None:
    """flock on a local lock file; None when the filesystem has no flock (then the object-store way is used)."""
    import fcntl

    os.makedirs(os.path.dirname(path), exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            previous = _parse(_read_fd(fd))
            os.close(fd)
            raise FolderLocked(_held_message(folder, previous, path, remote=False)) from None
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return None
            raise
        # The holder before us may have removed the file between our open and our flock: lock the file that is
        # there now instead.
        try:
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    previous = _parse(_read_fd(fd))
    if previous:
        _took_over(folder, previous)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    os.fsync(fd)

    def release() -> None:
        try:
            os.unlink(path)  # while the flock is still held: nobody else can have taken it
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)

    return release


def _acquire_store(folder: str, fs, path: str, holder: dict) -> Callable[[], None]:
    from bae_core.data.cache import write_bytes_atomic

    previous = _read_store(fs, path)
    if previous is not None:
        if not _gone(previous):
            raise FolderLocked(_held_message(folder, previous, path, remote=True))
        _took_over(folder, previous)
    write_bytes_atomic(fs, path, json.dumps(holder).encode())
    time.sleep(SETTLE_S)
    now = _read_store(fs, path)
    if (now or {}).get("token") != holder["token"]:
        raise FolderLocked(_held_message(folder, now, path, remote=True))

    def release() -> None:
        if (_read_store(fs, path) or {}).get("token") == holder["token"]:
            with contextlib.suppress(FileNotFoundError, OSError):
                fs.delete_file(path)

    return release


# ---- reading and describing holders ----------------------------------------------------------------------------


def _read_fd(fd: int) -> bytes:
    chunks = []
    offset = 0
    while chunk := os.pread(fd, 65536, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _read_store(fs, path: str) -> dict | None:
    try:
        with fs.open_input_stream(path) as f:
            data = f.read()
    except FileNotFoundError:
        return None
    except OSError as err:
        if "not found" in str(err).lower() or "no such file" in str(err).lower():
            return None
        raise
    return _parse(data) or {}


def _parse(data: bytes) -> dict | None:
    """The holder in a lock file; {} for one that cannot be read (being written, or damaged); None when empty."""
    if not data.strip():
        return None
    try:
        holder = json.loads(data.decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _gone(holder: dict) -> bool:
    """Whether the holder is a process of this host that no longer runs."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def describe(holder: dict | None) -> str:
    if not holder:
        return "another command (its lock file cannot be read)"
    return (
        f"`{holder.get('command', '?')}` (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
        f"since {holder.get('started', '?')})"
    )


def _held_message(folder: str, holder: dict | None, path: str, *, remote: bool) -> str:
    text = f"{folder} is in use by {describe(holder)}; wait for it to end, or write to another folder"
    if remote:
        text += f" (if that command is no longer running, delete {path})"
    return text


def _took_over(folder: str, previous: dict) -> None:
    log.warning("%s: taking over the lock of %s, which is no longer running", folder, describe(previous))
