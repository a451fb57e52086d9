"""Paths inside a run folder, and folders on any pyarrow filesystem (a local path or a URI such as s3://bucket/run).

A run folder stores the paths of what it holds (checkpoints, a cache inside it) relative to itself, so it can be
moved or copied to another machine or bucket and read there; `relative_to` makes such a path and `resolve` turns
it back into a usable one. Paths outside the run (a shared cache at another URI) are stored as they are, and
absolute paths written by older versions still resolve to themselves.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

import pyarrow.fs as pafs


def is_uri(path: str) -> bool:
    return "://" in path


def _local(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def relative_to(root: str, path: str | None, filesystem: pafs.FileSystem | None = None) -> str | None:
    """`path` relative to the run folder `root` when it lies inside it, else `path` unchanged.

    `path` is a local path, a URI, or a path on `root`'s filesystem without the scheme (what Ray Tune hands out
    for checkpoints: `bucket/run/tune/...`); such a path outside `root` on a remote `filesystem` is returned as a
    URI, so it stays readable."""
    if path is None:
        return None
    root = root.rstrip("/")
    if is_uri(root):
        # The URI, and the same place without its scheme (s3://bucket/run: bucket/run).
        candidates = [root, root.split("://", 1)[1]]
    else:
        candidates = [_local(root), os.path.realpath(_local(root))]
        path = path if is_uri(path) else _local(path)
    for base in candidates:
        if path == base:
            return "."
        if path.startswith(f"{base}/"):
            return path[len(base) + 1 :]
    if not is_uri(path) and filesystem is not None and filesystem.type_name != "local":
        return f"{filesystem.type_name}://{path}"
    return path


def resolve(root: str, path):
    """A path stored in the run folder `root`, made usable: a relative one under `root` (absolute for a local
    root), a URI or an absolute path as it is; anything else (None, NaN, "") as it is."""
    if not isinstance(path, str) or not path or is_uri(path) or os.path.isabs(path):
        return path
    if is_uri(root):
        return root.rstrip("/") if path == "." else f"{root.rstrip('/')}/{path}"
    return os.path.normpath(os.path.join(_local(root), path))


def copy_folder(source: str, dest: str, names: tuple[str, ...] | None = None) -> None:
    """Copy every file under the folder `source` (or only those whose path in it is one of `names`) into `dest`,
    each a local path or a URI, keeping the layout."""
    from bae_core.data.cache import open_filesystem, write_bytes_atomic

    src_fs, src_base = open_filesystem(source)
    dest_fs, dest_base = open_filesystem(dest)
    dest_fs.create_dir(dest_base, recursive=True)
    for info in src_fs.get_file_info(pafs.FileSelector(src_base, recursive=True)):
        name = info.path[len(src_base.rstrip("/")) + 1 :]
        if info.type != pafs.FileType.File or (names is not None and name not in names):
            continue
        with src_fs.open_input_stream(info.path) as f:
            data = f.read()
        write_bytes_atomic(dest_fs, f"{dest_base}/{name}", data)


@contextlib.contextmanager
def local_folder(path: str, names: tuple[str, ...] | None = None) -> Iterator[str]:
    """A local folder with the files of `path` (or those of `names`): the folder itself when it is local, else a
    temporary copy, removed on exit."""
    if not is_uri(path):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="bae-") as d:
        copy_folder(path, d, names)
        yield d
