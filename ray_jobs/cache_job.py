"""`bae cache`: language-model activations into parquet shards, with a Ray Data actor pool.

    documents -> train / held-out split by document -> fixed-length token sequences (the driver)
      -> units of sequences (a Ray dataset, one row per unit still to do)
      -> an actor pool; each actor holds the model, runs batched capture and writes one shard
         per hookpoint per unit (atomically) -> shard records back to the driver -> manifest.json

Re-running with the same arguments resumes: finished units are skipped, and a shard that was
renamed into place just before a crash is adopted after a check. It also repairs: shards that are
missing or whose size is not the manifest's (or, with `checksums`, whose sha256 differs) are rewritten,
and only those. Other settings on an existing cache are refused with the setting named. While it
writes, it holds the cache root's lock (`ray_jobs.lock`): a second writer is refused.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict, dataclass

import numpy as np

from bae_core.coders.config import check_choice, check_positive
from bae_core.data.cache import (
    SPLITS,
    STORAGE_DTYPES,
    CacheError,
    CacheManifest,
    HookpointInfo,
    ShardRecord,
    build_table,
    damaged_shards,
    describe_damage,
    describe_existing_shard,
    load_manifest,
    open_filesystem,
    units_for,
    write_shard,
)
from ray_jobs.lock import folder_lock
from ray_jobs.runtime import ACTOR_ARGUMENTS_NOTE, dropped_stderr_lines

log = logging.getLogger(__name__)


@dataclass
class CacheRequest:
    """What to cache and how."""

    root: str
    """Local path or pyarrow filesystem URI (e.g. s3://bucket/cache)."""
    hookpoints: list[str]
    model: str = "embedded:SmolLM2-135M-Instruct"
    revision: str | None = None
    dataset: str = "embedded"
    text_column: str = "text"
    seq_len: int = 128
    train_tokens: int | None = 200_000
    """Token budget of the training split (None: every training document)."""
    heldout_tokens: int | None = 50_000
    heldout_fraction: float = 0.1
    seed: int = 0
    dtype: str = "float16"
    sequences_per_unit: int = 64
    batch_size: int = 16
    """Sequences per forward pass inside an actor."""
    actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    device: str | None = None
    """Torch device of the model in each actor (default: cuda when the actor has a GPU)."""

    def __post_init__(self) -> None:
        if not self.hookpoints:
            raise ValueError("hookpoints: name at least one, e.g. layers.9.mlp")
        check_choice("dtype", self.dtype, STORAGE_DTYPES)
        for name in ("seq_len", "sequences_per_unit", "batch_size", "actors"):
            check_positive(name, getattr(self, name), integer=True)
        check_positive("cpus_per_actor", self.cpus_per_actor)
        if self.gpus_per_actor < 0:
            raise ValueError(f"gpus_per_actor: must be >= 0, got {self.gpus_per_actor}")
        for name in ("train_tokens", "heldout_tokens"):
            value = getattr(self, name)
            if value is not None:
                check_positive(name, value, integer=True)
                if value < self.seq_len:
                    raise ValueError(
                        f"{name}: {value} tokens is less than one sequence (seq_len={self.seq_len}); the split would "
                        f"hold no sequence. Raise {name} to at least {self.seq_len}, or lower seq_len"
                    )
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction: must be between 0 and 1 (exclusive), got {self.heldout_fraction}")


class _CaptureWriter:
    """Ray Data actor: holds the model, captures a unit's activations and writes its shards (of the hookpoints
    the unit's row names: all but those already written when a damaged shard is repaired)."""

    def __init__(self, req: CacheRequest, hookpoints: list[str]):
        import ray
        import torch

        from bae_core.data.lm import load_model, resolve_hookpoints

        self.req = req
        device = req.device or ("cuda" if req.gpus_per_actor > 0 and torch.cuda.is_available() else "cpu")
        self.loaded = load_model(req.model, revision=req.revision, device=device)
        self.hookpoints = resolve_hookpoints(self.loaded, hookpoints)
        self.device = device
        self.fs, self.base = open_filesystem(req.root)
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from bae_core.data.hooks import capture

        records: list[dict] = []
        for i in range(len(batch["unit"])):
            split, unit = str(batch["split"][i]), int(batch["unit"][i])
            token_ids = np.asarray(batch["token_ids"][i], dtype=np.int64)
            n = len(token_ids)
            names = str(batch["hookpoints"][i]).split(",")
            hookpoints = [h for h in self.hookpoints if h.name in names]
            acts: dict[str, dict[str, list]] = {h.name: {} for h in hookpoints}
            for start in range(0, n, self.req.batch_size):
                ids = torch.from_numpy(token_ids[start : start + self.req.batch_size]).to(self.device)
                captured = capture(self.loaded, ids, hookpoints)
                for name, cols in captured.items():
                    for col, value in cols.items():
                        acts[name].setdefault(col, []).append(value.reshape(-1, value.shape[-1]).float().cpu())
            sequences = (batch["seq_index"][i], token_ids, batch["doc_id"][i], batch["doc_position"][i])
            for name, cols in acts.items():
                columns = {col: torch.cat(parts).numpy() for col, parts in cols.items()}
                table = build_table(*sequences, columns, self.req.dtype)
                records.append(asdict(write_shard(self.fs, self.base, split, name, unit, table, node=self.node)))
        return {key: np.asarray([r[key] for r in records]) for key in records[0]}


def plan_sequences(req: CacheRequest, tokenizer) -> dict[str, dict[str, np.ndarray]]:
    """Tokenise the split documents into fixed-length sequences (columns per split)."""
    from bae_core.data.text import load_documents, sequences_to_columns, split_documents, tokenize_documents

    docs = load_documents(req.dataset, text_column=req.text_column)
    train_docs, heldout_docs = split_documents(docs, heldout_fraction=req.heldout_fraction, seed=req.seed)
    plans = {}
    for split, split_docs, budget in (
        ("train", train_docs, req.train_tokens),
        ("heldout", heldout_docs, req.heldout_tokens),
    ):
        seqs = list(tokenize_documents(split_docs, tokenizer, req.seq_len, max_tokens=budget))
        if not seqs:
            raise ValueError(
                f"{split}: no complete sequence of seq_len={req.seq_len} tokens; lower seq_len or add documents"
            )
        cols = sequences_to_columns(seqs)
        cols["doc_id"] = np.asarray([d.doc_id for d in split_docs])[cols.pop("doc_index")]
        plans[split] = cols
    return plans


def cache_command(req: CacheRequest) -> str:
    """The `bae cache` command line with the settings of `req` that decide the cache's content: it creates,
    resumes or repairs that cache."""
    import shlex

    flags = [
        ("--hookpoints", ",".join(req.hookpoints)),
        ("--model", req.model),
        ("--revision", req.revision),
        ("--dataset", req.dataset),
        ("--text-column", req.text_column),
        ("--seq-len", req.seq_len),
        ("--train-tokens", "all" if req.train_tokens is None else req.train_tokens),
        ("--heldout-tokens", "all" if req.heldout_tokens is None else req.heldout_tokens),
        ("--heldout-fraction", req.heldout_fraction),
        ("--dtype", req.dtype),
        ("--sequences-per-shard", req.sequences_per_unit),
        ("--seed", req.seed),
    ]
    args = ["bae", "cache", req.root] + [str(a) for flag, value in flags if value is not None for a in (flag, value)]
    return shlex.join(args)


def run_cache(req: CacheRequest, *, progress=None, repair: bool = True, checksums: bool = False) -> CacheManifest:
    """Create, resume or repair the cache described by `req`; returns the finished manifest.

    A finished cache whose shards all have their recorded sizes (with `checksums`, also their sha256 and rows:
    every shard is read) is returned as it is, and its lock is not taken. Otherwise, holding the cache root's
    lock, the missing units and the missing or damaged shards are written; with `repair` False, a damaged
    finished cache is refused instead, with a CacheError naming the shard and the repair."""
    from bae_core.data.lm import load_model, resolve_hookpoints

    fs, base = open_filesystem(req.root)
    loaded = load_model(req.model, revision=req.revision)
    hooks = resolve_hookpoints(loaded, req.hookpoints)
    wanted = CacheManifest(
        model=req.model,
        revision=loaded.revision,
        dataset=req.dataset,
        hookpoints={
            h.name: HookpointInfo(columns={"input": h.d_in, "output": h.d_out} if h.has_input else {"output": h.d_out})
            for h in hooks
        },
        dtype=req.dtype,
        seq_len=req.seq_len,
        sequences_per_unit=req.sequences_per_unit,
        heldout_fraction=req.heldout_fraction,
        seed=req.seed,
        max_tokens={"train": req.train_tokens, "heldout": req.heldout_tokens},
    )
    tokenizer = loaded.tokenizer
    del loaded
    existing = load_manifest(req.root)
    if existing is not None:
        existing.check_matches(wanted, req.root)
        if existing.complete:
            damaged = damaged_shards(req.root, existing, checksums=checksums, fs=fs, base=base)
            if not damaged:
                return existing
            if not repair:
                raise CacheError(describe_damage(req.root, damaged))
    with folder_lock(req.root, "bae cache"):
        return _build(req, wanted, tokenizer, fs, base, progress, checksums)


def _build(req, wanted, tokenizer, fs, base, progress, checksums) -> CacheManifest:
    manifest = load_manifest(req.root)  # read again under the lock
    if manifest is None:
        manifest = wanted
    else:
        manifest.check_matches(wanted, req.root)
        damaged = damaged_shards(req.root, manifest, checksums=checksums, fs=fs, base=base)
        for record, problem in damaged:
            log.warning("cache: rewriting %s/%s, which %s", req.root.rstrip("/"), record.path, problem)
            if problem != "is missing":  # gone, so that it is not adopted again below
                fs.delete_file(f"{base}/{record.path}")
        bad = {(r.split, r.hookpoint, r.unit) for r, _ in damaged}
        manifest.shards = [s for s in manifest.shards if (s.split, s.hookpoint, s.unit) not in bad]

    plans = plan_sequences(req, tokenizer)
    items = []
    for split in SPLITS:
        cols = plans[split]
        n = len(cols["seq_index"])
        units = units_for(n, req.sequences_per_unit)
        manifest.splits[split] = {
            "documents": len(np.unique(cols["doc_id"])),
            "sequences": n,
            "tokens": n * req.seq_len,
            "units": units,
        }
        written = {(s.hookpoint, s.unit) for s in manifest.shards if s.split == split}
        for unit in range(units):
            lo, hi = unit * req.sequences_per_unit, min(n, (unit + 1) * req.sequences_per_unit)
            todo = []
            for name in manifest.hookpoints:
                if (name, unit) in written:
                    continue
                # A shard renamed into place just before a crash is complete; adopt it after a check.
                adopted = describe_existing_shard(fs, base, split, name, unit, (hi - lo) * req.seq_len)
                if adopted is not None:
                    manifest.add(adopted)
                else:
                    todo.append(name)
            if todo:
                items.append(
                    {
                        "split": split,
                        "unit": unit,
                        "hookpoints": ",".join(todo),
                        "seq_index": cols["seq_index"][lo:hi],
                        "token_ids": cols["token_ids"][lo:hi],
                        "doc_id": cols["doc_id"][lo:hi],
                        "doc_position": cols["doc_position"][lo:hi],
                    }
                )
    manifest.complete = False
    manifest.save(fs, base)
    total = sum(manifest.splits[s]["units"] for s in SPLITS)
    log.info("cache: %d of %d units to write", len(items), total)
    if items:
        _write_units(req, manifest, items, fs, base, progress)
    missing = [s for s in SPLITS if len(manifest.finished_units(s)) != manifest.splits[s]["units"]]
    if missing:
        raise CacheError(f"cache: units of {', '.join(missing)} are still missing; run `bae cache` again to finish")
    manifest.complete = True
    manifest.save(fs, base)
    return manifest


def _write_units(req, manifest, items, fs, base, progress) -> None:
    import ray

    # The caller shows progress: Ray Data's own bars and log lines (and its note that they are off) would
    # repeat it. A dataset keeps the context it was created with, so this comes first.
    ctx = ray.data.DataContext.get_current()
    quiet = {
        logging.getLogger("ray.data._internal.progress"): logging.ERROR,
        logging.getLogger("ray.data._internal.execution.streaming_executor"): logging.WARNING,
    }
    saved = ctx.enable_progress_bars, ctx.print_on_execution_start, {lg: lg.level for lg in quiet}
    if progress is not None:
        ctx.enable_progress_bars, ctx.print_on_execution_start = False, False
        for lg, level in quiet.items():
            lg.setLevel(level)
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    # Ray Data places its actors with DataContext.scheduling_strategy, SPREAD by default: one per node first.
    records = ds.map_batches(
        _CaptureWriter,
        fn_constructor_args=(req, list(manifest.hookpoints)),
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=req.actors),
        num_cpus=req.cpus_per_actor,
        num_gpus=req.gpus_per_actor or None,
    )
    last_save = time.monotonic()
    # Ray's core notes at error level, on every build, that Ray Data's restartable actors keep their constructor
    # arguments in the object store: true, and nothing to act on; the caller's console shows progress instead.
    quiet_lines = dropped_stderr_lines(ACTOR_ARGUMENTS_NOTE) if progress is not None else contextlib.nullcontext()
    with quiet_lines:
        try:
            for done, row in enumerate(records.iter_rows(), start=1):
                manifest.add(ShardRecord(**{k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}))
                if progress is not None:
                    progress(done, sum(len(item["hookpoints"].split(",")) for item in items))
                if time.monotonic() - last_save > 10:  # a crash of the driver loses at most ~10 s of records
                    manifest.save(fs, base)
                    last_save = time.monotonic()
        finally:
            ctx.enable_progress_bars, ctx.print_on_execution_start = saved[:2]
            for lg, level in saved[2].items():
                lg.setLevel(level)
    manifest.save(fs, base)
