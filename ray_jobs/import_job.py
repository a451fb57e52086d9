"""`bae import RUN SOURCE`: coders trained elsewhere (sparsify, SAELens, another run of this project) converted into
this project's coder format, checked against the package that wrote them, and registered in the run, so that
`bae score`, `bae probe` and `bae report` treat them like the run's own coders.

    SOURCE (a folder, a folder of hookpoint folders as sparsify's `load_many` reads, or a hub repo id)
      -> per coder: `bae_core.coders.external.read_external` (refuses by name what it cannot represent)
      -> the run's hookpoint: --hookpoint, else the name the checkpoint gives (sparsify's folder name, SAELens'
         hf_hook_name or hook_name mapped by `bae_hookpoint`); it must be in the run's cache, at the coder's widths
      -> the converted coder against the original package on the cache's first held-out tokens
         (`bae_core.coders.reference`; a conversion that does not reproduce it is refused, with the numbers)
      -> its held-out FVU, L0 and density on the run's evaluation tokens (the trials' own basis)
      -> RUN/imported/<name>/<hookpoint>/ (cfg.json + sae.safetensors) and a row of RUN/imported.parquet

Importing the same SOURCE again under the same name replaces its rows (it resumes nothing: an import takes
seconds); a name another SOURCE holds is refused. Runs without Ray, holding the run folder's lock.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from bae_core.coders.external import bae_hookpoint, detect_format, read_external
from bae_core.data.cache import open_cache, open_filesystem
from bae_core.data.paths import copy_folder, relative_to, resolve
from ray_jobs.lock import folder_lock
from ray_jobs.score_plan import IMPORTED_DIR, IMPORTED_TABLE, read_table
from ray_jobs.sweep_job import SPEC_COPY
from ray_jobs.trials import TRIALS_TABLE, write_parquet_atomic

CHECK_TOKENS = 2048
"""Held-out tokens on which a conversion is checked against the original package."""
_HUB_ID = re.compile(r"(?:hub:|hf://)?([A-Za-z0-9][\w.-]*/[\w.-]+)(?:/(.+))?")


def resolve_source(source: str) -> tuple[Path, str]:
    """(a local folder, how the origin is written) for SOURCE: a local folder, or a Hugging Face hub repo id
    (owner/name, optionally hub:owner/name/sub/folder), downloaded with huggingface_hub."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"SOURCE {source}: a file; give a coder folder or a folder of them")
        return path.resolve(), str(path.resolve())
    match = _HUB_ID.fullmatch(source)
    if match is None:
        raise FileNotFoundError(f"SOURCE {source}: no such folder, and not a hub repo id (owner/name)")
    repo, sub = match[1], match[2]
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo, allow_patterns=[f"{sub}/*"] if sub else None)
    except Exception as err:
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") else ""
        raise ConnectionError(
            f"SOURCE {source}: no such folder, and the hub repo {repo} could not be downloaded{offline}: "
            f"{type(err).__name__}; give a local folder, or run where the hub is reachable"
        ) from None
    return Path(folder) / (sub or ""), f"hub:{repo}" + (f"/{sub}" if sub else "")


def find_coders(folder: Path) -> list[tuple[Path, str]]:
    """(folder, format) of the coder in `folder`, or of each coder folder directly under it."""
    fmt = detect_format(folder)
    if fmt is not None:
        return [(folder, fmt)]
    found = [(p, f) for p in sorted(folder.iterdir()) if p.is_dir() and (f := detect_format(p)) is not None]
    if not found:
        raise FileNotFoundError(
            f"SOURCE {folder}: no coder folder (cfg.json with sae.safetensors or sae_weights.safetensors) in it or "
            "directly under it"
        )
    return found


def _run_caches(run_dir: str) -> dict[str, object]:
    """{cache: manifest} of the run's finished trials."""
    trials = read_table(run_dir, TRIALS_TABLE, ["status", "cache"])
    caches = sorted({resolve(run_dir, c) for c in trials.loc[trials["status"] == "finished", "cache"]})
    if not caches:
        raise ValueError(f"run {run_dir}: {TRIALS_TABLE} has no finished trial, so no cache to score coders on")
    return {c: open_cache(c) for c in caches}


def _eval_tokens(run_dir: str) -> int | None:
    """The run's `training.eval_tokens`: the held-out tokens its trials' FVU and L0 were measured on."""
    fs, base = open_filesystem(run_dir)
    path = f"{base}/{SPEC_COPY}"
    if fs.get_file_info(path).type.name == "NotFound":
        return None
    with fs.open_input_stream(path) as f:
        return (json.loads(f.read().decode()).get("training") or {}).get("eval_tokens")


def _place(ext, folder: Path, hookpoint: str | None, caches: dict) -> tuple[str, str]:
    """(cache, hookpoint) where the coder belongs; a ValueError says why it fits none."""
    transcoder = ext.coder.cfg.is_transcoder
    hookpoint = hookpoint or bae_hookpoint(ext.hook_name, transcoder) or bae_hookpoint(folder.name, transcoder)
    available = sorted({h for m in caches.values() for h in m.hookpoints})
    if hookpoint is None:
        named = f"'s hook {ext.hook_name!r} has no counterpart here" if ext.hook_name else " names no hookpoint"
        raise ValueError(
            f"{folder}: the checkpoint{named}; pass --hookpoint (the run's cache has {', '.join(available)})"
        )
    cache = next((c for c, m in caches.items() if hookpoint in m.hookpoints), None)
    if cache is None:
        raise ValueError(f"{folder}: hookpoint {hookpoint} is not in the run's cache (it has {', '.join(available)})")
    coder, columns = ext.coder, caches[cache].hookpoints[hookpoint].columns
    if coder.cfg.is_transcoder and "input" not in columns:
        raise ValueError(
            f"{folder}: a {coder.cfg.kind} needs the module's input, and {hookpoint} caches only its output"
        )
    x_width = columns["input"] if coder.cfg.is_transcoder else columns["output"]
    if (coder.d_in, coder.d_out) != (x_width, columns["output"]):
        raise ValueError(
            f"{folder}: width mismatch at {hookpoint}: the coder maps {coder.d_in} -> {coder.d_out}, the cache holds "
            f"{x_width} -> {columns['output']}"
        )
    return cache, hookpoint


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "coder"


def import_coders(
    run_dir: str,
    source: str,
    *,
    hookpoint: str | None = None,
    name: str | None = None,
    check_tokens: int = CHECK_TOKENS,
    notice=None,
) -> list[dict]:
    """Import the coder(s) of SOURCE into the run (see the module docstring); returns the rows registered."""
    folder, where = resolve_source(source)
    found = find_coders(folder)
    caches = _run_caches(run_dir)
    if found[0][0] != folder:  # sparsify's load_many layout: the hookpoints the run has, or the one --hookpoint names
        names = {p: bae_hookpoint(p.name) or bae_hookpoint(p.name, transcoder=True) for p, _ in found}
        cached = {h for m in caches.values() for h in m.hookpoints}
        found = [(p, f) for p, f in found if names[p] == hookpoint or (hookpoint is None and names[p] in cached)]
        if not found:
            raise ValueError(
                f"SOURCE {source}: none of its coder folders ({', '.join(p.name for p in names)}) is "
                f"{'hookpoint ' + hookpoint if hookpoint else 'at a hookpoint of the run cache'} "
                f"({', '.join(sorted(cached))})"
            )
    base_name = _slug(name or (where.split("/", 2)[-1] if where.startswith("hub:") else folder.name))
    with folder_lock(run_dir, "bae import"):
        _check_names(run_dir, [_names(base_name, where, p, f, p != folder) for p, f in found])
        rows = [
            _import_one(run_dir, p, f, where, hookpoint, base_name, p != folder, caches, check_tokens, notice)
            for p, f in found
        ]
        _register(run_dir, rows)
    return rows


def _names(base_name: str, where: str, folder: Path, fmt: str, nested: bool) -> tuple[str, str, str]:
    """(name, coder id, origin) of an imported coder; one in a folder of hookpoint folders is named after its
    hookpoint too."""
    name = f"{base_name}-{bae_hookpoint(folder.name) or _slug(folder.name)}" if nested else base_name
    return name, f"imported-{name}", f"{fmt}:{where}" + (f"/{folder.name}" if nested else "")


def _check_names(run_dir: str, planned: list[tuple[str, str, str]]) -> None:
    """A coder id that another source holds is refused before anything is written."""
    fs, base = open_filesystem(run_dir)
    if fs.get_file_info(f"{base}/{IMPORTED_TABLE}").type.name == "NotFound":
        return
    old = read_table(run_dir, IMPORTED_TABLE, ["coder_id", "origin"])
    held = dict(zip(old["coder_id"], old["origin"], strict=True))
    for _, coder_id, origin in planned:
        if held.get(coder_id, origin) != origin:
            raise ValueError(f"--name: {coder_id} is already imported from {held[coder_id]}; choose another --name")


def _import_one(run_dir, folder, fmt, where, hookpoint, base_name, nested, caches, check_tokens, notice) -> dict:
    import torch

    from bae_core.coders.reference import PACKAGES, check_conversion
    from bae_core.data.reader import iter_activation_batches
    from bae_core.evaluation.metrics import evaluate_coder

    ext = read_external(folder, fmt)
    cache, hookpoint = _place(ext, folder, hookpoint, caches)
    coder, manifest = ext.coder, caches[cache]
    transcoder = coder.cfg.is_transcoder

    def batches():
        return iter_activation_batches(
            cache,
            hookpoint,
            split="heldout",
            batch_size=4096,
            transcoder=transcoder,
            shuffle_seed=None,
            manifest=manifest,
        )

    check = None
    if fmt != "bae":
        xs, n = [], 0
        for batch in batches():
            x = batch[0] if isinstance(batch, tuple) else batch
            xs.append(x[: check_tokens - n])
            n += len(xs[-1])
            if n >= check_tokens:
                break
        try:
            check = check_conversion(coder, folder, fmt, torch.cat(xs))
        except ModuleNotFoundError:
            if notice is not None:
                notice(f"{folder}: not checked against {PACKAGES[fmt]}, which is not installed (pip install it)")
        if check is not None and not check.ok:
            raise ValueError(
                f"{folder}: the converted coder does not compute what the original does: {check.describe()}"
            )
    evaluation = evaluate_coder(coder, batches(), max_tokens=_eval_tokens(run_dir))
    if not ext.k_known:  # a ReLU or jumprelu coder: k is a label, its held-out L0 rounded
        k = min(max(1, round(evaluation.l0)), coder.num_latents - 1)
        coder.cfg = replace(coder.cfg, k=k)
    name, coder_id, origin = _names(base_name, where, folder, ext.format, nested)
    checkpoint = f"{run_dir.rstrip('/')}/{IMPORTED_DIR}/{name}/{hookpoint}"
    _save(coder, checkpoint)
    if evaluation.fvu >= 1 and notice is not None:
        names = ", ".join(f"{what} {v!r}" for what, v in (("hook", ext.hook_name), ("model", ext.model_name)) if v)
        notice(
            f"{coder_id}: held-out FVU {evaluation.fvu:.3f} on this cache (>= 1: worse than the mean); check that "
            f"the checkpoint reads {hookpoint} of {manifest.model}" + (f" (it names {names})" if names else "")
        )
    return {
        "coder_id": coder_id,
        "name": name,
        "origin": origin,
        "format": ext.format,
        "architecture": ext.architecture,
        "hookpoint": hookpoint,
        "cache": relative_to(run_dir, cache),
        "checkpoint": relative_to(run_dir, checkpoint),
        "activation": coder.cfg.activation,
        "kind": coder.cfg.kind,
        "k": coder.cfg.k,
        "num_latents": coder.num_latents,
        "d_in": coder.d_in,
        "d_out": coder.d_out,
        "dtype": str(coder.dtype).removeprefix("torch."),
        "source_hook_name": ext.hook_name,
        "source_model": ext.model_name,
        "conversion": "; ".join(ext.notes),
        **{f"check_{k}": v for k, v in (check.summary() if check else {"reference": None}).items()},
        **evaluation.summary(),
        "imported_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _save(coder, checkpoint: str) -> None:
    if "://" not in checkpoint:
        coder.save(checkpoint)
        return
    with tempfile.TemporaryDirectory(prefix="bae-import-") as d:
        coder.save(d)
        copy_folder(d, checkpoint)


def _register(run_dir: str, rows: list[dict]) -> None:
    """Add `rows` to RUN/imported.parquet, replacing those of the same coder."""
    import pandas as pd

    fs, base = open_filesystem(run_dir)
    table = pd.DataFrame(rows)
    if fs.get_file_info(f"{base}/{IMPORTED_TABLE}").type.name != "NotFound":
        old = read_table(run_dir, IMPORTED_TABLE)
        table = pd.concat([old[~old["coder_id"].isin(table["coder_id"])], table], ignore_index=True)
    write_parquet_atomic(run_dir, IMPORTED_TABLE, table)
