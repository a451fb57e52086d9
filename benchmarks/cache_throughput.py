"""Activation-cache throughput of `bae cache` (ray_jobs.cache_job.run_cache), against the bare truncated forward pass.

Measures tokens/s of caching the embedded model (SmolLM2-135M-Instruct) at a hookpoint (default layers.9.mlp),
and compares in the same run, on the same token sequences (exactly those `plan_sequences` gives the cache job,
train and held-out), batched the same way (per unit of `sequences_per_unit` sequences, `--batch-size` sequences
per forward), against:

- bare forward: the minimal computation any implementation must do, with none of the toolkit's code: the token
  embedding, the rotary tables and decoder layers 0..N (N = the deepest hooked layer), called one after another
  under torch.no_grad, in the model's dtype (float32, as the cache job loads it); no hooks, no copies, no
  output kept;
- capture() in-process: the toolkit's `bae_core.data.hooks.capture` (hooks, early stop, float32 copies), no Ray, no
  writing;
- actor work in-process: the cache job's actor (`_CaptureWriter.__call__`: capture, fp16 packing, parquet,
  atomic write to a temp folder), called directly in this process, no Ray;
- run_cache: the full Ray Data job (a local Ray cluster, `--actors` actors, a fresh temp folder), reported twice:
  end to end (driver model load, tokenisation, Ray Data set-up, actor start and its model load, every unit,
  manifest writes; Ray start-up itself excluded), and steady state (the units after the first, from the first
  unit's shard being written to the last one's, by the shards' mtimes: actor start-up, its model load and the
  first unit are excluded).

The goal is run_cache's tokens/s >= 0.85x the bare forward's. Torch threads: Ray gives an actor
OMP_NUM_THREADS = its CPUs (`--cpus-per-actor`, at least 1), so torch in the actor uses that many threads; a
probe actor with the same resources reads the count, and this process sets torch to the same number before
timing the in-process rows. Nothing is asserted; the figures are printed and written to
benchmarks/results/cache_throughput.json. The in-process rows take turns unit by unit (after one warm-up
batch each), then the Ray job runs alone, with the CPU time of its actor, the driver and Ray's other processes
metered; the bare forward is re-timed on the first unit afterwards to show whether the machine's load changed.

    .venv/bin/python benchmarks/cache_throughput.py [--hookpoint layers.9.mlp] [--tokens 32768] [--seq-len 128]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from bae_core.data.cache import STORAGE_DTYPES
from bae_core.data.hooks import capture
from bae_core.data.lm import EMBEDDED_MODEL, load_model, resolve_hookpoints
from ray_jobs.cache_job import CacheRequest, _CaptureWriter, plan_sequences, run_cache
from ray_jobs.runtime import connect

RESULTS = Path(__file__).parent / "results" / "cache_throughput.json"


def units_of(req: CacheRequest, plans: dict[str, dict[str, np.ndarray]]) -> list[dict]:
    """The work items the cache job makes from the plan: one per unit, in the same order (see run_cache)."""
    items = []
    for split, cols in plans.items():
        n = len(cols["seq_index"])
        for lo in range(0, n, req.sequences_per_unit):
            hi = min(n, lo + req.sequences_per_unit)
            item = {key: cols[key][lo:hi] for key in ("seq_index", "token_ids", "doc_id", "doc_position")}
            items.append({"split": split, "unit": lo // req.sequences_per_unit, **item})
    return items


def as_ray_batch(item: dict) -> dict[str, np.ndarray]:
    """A one-row batch shaped like the one Ray Data hands the actor (map_batches with batch_size=1)."""
    return {key: np.asarray([value]) for key, value in item.items()}


def batches_of(item: dict, batch_size: int) -> list[torch.Tensor]:
    """The forward batches the actor runs for one unit (int64 token ids, `batch_size` sequences each)."""
    ids = np.asarray(item["token_ids"], dtype=np.int64)
    return [torch.from_numpy(ids[i : i + batch_size]) for i in range(0, len(ids), batch_size)]


def bare_forward(loaded, depth: int):
    """Embedding + rotary tables + decoder layers 0..depth, no_grad, nothing else (no hooks, no copies)."""
    model = loaded.model
    base = model.get_submodule(model.base_model_prefix)
    embed, rotary, layers = base.embed_tokens, base.rotary_emb, list(loaded.layers)[: depth + 1]
    # SDPA with no mask runs its causal kernel (what the model itself does without padding); other attention
    # implementations need the causal mask spelled out.
    sdpa = model.config._attn_implementation == "sdpa"

    @torch.no_grad()
    def run(ids: torch.Tensor) -> torch.Tensor:
        h = embed(ids)
        t = ids.shape[1]
        pos = torch.arange(t).unsqueeze(0)
        pe = rotary(h, pos)
        mask = None
        if not sdpa:
            mask = torch.full((t, t), torch.finfo(h.dtype).min, dtype=h.dtype).triu_(1)[None, None]
        for layer in layers:
            h = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=pe)
            h = h[0] if isinstance(h, tuple) else h  # transformers 4 returns a tuple
        return h

    return run


def check_bare_forward(loaded, run, ids: torch.Tensor, depth: int) -> float | None:
    """Max |difference| between the bare forward and transformers' own hidden_states[depth + 1] (None: not
    comparable, as transformers reports the last layer after the final norm)."""
    if depth == loaded.num_layers - 1:
        return None
    with torch.no_grad():
        want = loaded.model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states[depth + 1]
    return float((run(ids) - want).abs().max())


def actor_threads(cpus_per_actor: float) -> tuple[int, str | None]:
    """torch.get_num_threads() and OMP_NUM_THREADS inside a Ray actor with the cache actors' CPUs."""
    import ray

    @ray.remote
    class Probe:
        def threads(self):
            import torch

            return torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")

    probe = Probe.options(num_cpus=cpus_per_actor).remote()
    try:
        return ray.get(probe.threads.remote())
    finally:
        ray.kill(probe)


def time_bare(bare, item: dict, batch_size: int) -> float:
    """Seconds of the bare forward over one unit."""
    start = time.perf_counter()
    for ids in batches_of(item, batch_size):
        bare(ids)
    return time.perf_counter() - start


def time_in_process(req, loaded, bare, hooks, items, scratch: str) -> dict[str, float]:
    """Seconds of the bare forward, capture() and the actor's work over `items`, taking turns unit by unit."""
    first = batches_of(items[0], req.batch_size)[0]
    writer = _CaptureWriter(CacheRequest(**{**vars(req), "root": scratch}), [h.name for h in hooks])
    # One forward batch of unit 0, written as a unit of its own that the timed calls never write.
    warm = {key: value[: req.batch_size] for key, value in items[0].items() if key not in ("split", "unit")}
    warm.update(split=items[0]["split"], unit=99_999)
    bare(first)  # one warm-up batch each
    capture(loaded, first, hooks)
    writer(as_ray_batch(warm))
    seconds = {"bare": 0.0, "capture": 0.0, "actor": 0.0, "bare_unit0": 0.0}
    for unit, item in enumerate(items):
        batches = batches_of(item, req.batch_size)
        bare_s = time_bare(bare, item, req.batch_size)
        seconds["bare"] += bare_s
        if unit == 0:
            seconds["bare_unit0"] = bare_s
        start = time.perf_counter()
        for ids in batches:
            capture(loaded, ids, hooks)
        seconds["capture"] += time.perf_counter() - start
        start = time.perf_counter()
        writer(as_ray_batch(item))
        seconds["actor"] += time.perf_counter() - start
    return seconds


class CpuMeter:
    """CPU seconds (user + system) used by this process and every process it started (Ray's own processes and the
    actors) while the meter runs, sampled every `interval` s by a thread; a process that ends keeps its last
    sample, so at most `interval` s of its CPU time is missed."""

    def __init__(self, interval: float = 0.5):
        import psutil

        self.psutil, self.interval = psutil, interval
        self.me = psutil.Process()
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.actors: set[int] = set()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for proc in [self.me, *self.me.children(recursive=True)]:
            try:
                with proc.oneshot():
                    times, name = proc.cpu_times(), proc.name()
            except self.psutil.Error:
                continue
            self.first.setdefault(proc.pid, times.user + times.system)
            self.last[proc.pid] = times.user + times.system
            if "_CaptureWriter" in name:
                self.actors.add(proc.pid)

    def _run(self) -> None:
        while not self.stopped.wait(self.interval):
            self._sample()

    def __enter__(self) -> CpuMeter:
        self._sample()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.thread.join()
        self._sample()

    def seconds(self) -> dict[str, float]:
        used = {pid: self.last[pid] - self.first[pid] for pid in self.last}
        actors = sum(used[pid] for pid in self.actors)
        driver = used.get(self.me.pid, 0.0)
        return {"cache_actors": actors, "driver": driver, "other_ray": sum(used.values()) - actors - driver}


def time_run_cache(req: CacheRequest) -> dict:
    """run_cache end to end, when each unit's shards were written (their mtimes on the local disk), and the CPU
    time of the actors, of this process and of Ray's other processes meanwhile.

    The shards' mtimes are used rather than the progress callback's calls because Ray Data hands the driver a
    unit's record only about when the next unit is done (the last two arrive together).
    """
    start_wall, start = time.time(), time.perf_counter()
    with CpuMeter() as cpu:
        manifest = run_cache(req)
    end = time.perf_counter()
    units: dict[tuple[str, int], dict] = {}
    for s in manifest.shards:
        done = os.stat(Path(req.root) / s.path).st_mtime - start_wall
        unit = units.setdefault((s.split, s.unit), {"tokens": s.rows, "done_s": done})
        unit["done_s"] = max(unit["done_s"], done)
    order = sorted(units.values(), key=lambda u: u["done_s"])
    done_s, unit_tokens = [u["done_s"] for u in order], [u["tokens"] for u in order]
    return {
        "end_to_end_s": end - start,
        "tokens": sum(unit_tokens),
        "first_unit_s": done_s[0],
        "steady_tokens": sum(unit_tokens[1:]),
        "steady_s": done_s[-1] - done_s[0] if len(done_s) > 1 else float("nan"),
        "unit_done_s": done_s,
        "unit_tokens": unit_tokens,
        "bytes": sum(s.bytes for s in manifest.shards),
        "cpu_s": cpu.seconds(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hookpoint", default="layers.9.mlp", help="hookpoint(s), comma-separated")
    parser.add_argument("--tokens", type=int, default=32768, help="train-split token budget")
    parser.add_argument("--heldout-tokens", type=int, default=2048, help="held-out token budget (also cached)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    parser.add_argument("--sequences-per-unit", type=int, default=64, help="sequences per shard")
    parser.add_argument(
        "--dtype", choices=STORAGE_DTYPES, default="float16", help="storage dtype of the activations (the model: fp32)"
    )
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--cpus-per-actor", type=float, default=1.0, help="Ray CPUs per actor = torch threads")
    args = parser.parse_args()

    logging.basicConfig(level=logging.WARNING)
    hookpoints = [h.strip() for h in args.hookpoint.split(",") if h.strip()]
    with tempfile.TemporaryDirectory(prefix="bae-cache-bench-") as tmp:
        req = CacheRequest(
            root=str(Path(tmp) / "ray-cache"),
            hookpoints=hookpoints,
            model=EMBEDDED_MODEL,
            seq_len=args.seq_len,
            train_tokens=args.tokens,
            heldout_tokens=args.heldout_tokens,
            dtype=args.dtype,
            sequences_per_unit=args.sequences_per_unit,
            batch_size=args.batch_size,
            actors=args.actors,
            cpus_per_actor=args.cpus_per_actor,
        )

        start = time.perf_counter()
        connect()  # Ray start-up: not part of any figure
        ray_start_s = time.perf_counter() - start
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        threads, omp = actor_threads(args.cpus_per_actor)
        driver_threads = torch.get_num_threads()
        torch.set_num_threads(threads)

        start = time.perf_counter()
        loaded = load_model(req.model)
        load_s = time.perf_counter() - start
        hooks = resolve_hookpoints(loaded, hookpoints)
        depth = max(h.layer for h in hooks)
        start = time.perf_counter()
        plans = plan_sequences(req, loaded.tokenizer)
        plan_s = time.perf_counter() - start
        items = units_of(req, plans)
        tokens = sum(item["token_ids"].size for item in items)

        bare = bare_forward(loaded, depth)
        first = batches_of(items[0], req.batch_size)[0]
        check = {"bare_forward_max_abs_diff": check_bare_forward(loaded, bare, first, depth)}
        seconds = time_in_process(req, loaded, bare, hooks, items, str(Path(tmp) / "in-process"))
        ray_run = time_run_cache(req)
        # The Ray job runs alone, after the rows it is compared with: re-time the bare forward on unit 0 to see
        # whether the machine's load changed meanwhile.
        seconds["bare_unit0_after"] = time_bare(bare, items[0], req.batch_size)

    if ray_run["tokens"] != tokens:
        raise RuntimeError(f"run_cache cached {ray_run['tokens']} tokens, the in-process rows ran {tokens}")
    bare_tps = tokens / seconds["bare"]
    measured = [
        ("bare forward", "embed + layers 0..N, no_grad, no hooks", tokens, seconds["bare"]),
        ("capture() in-process", "toolkit capture: hooks, early stop, fp32 copies", tokens, seconds["capture"]),
        ("actor work in-process", "_CaptureWriter: capture + pack + parquet write", tokens, seconds["actor"]),
        ("run_cache end to end", "Ray job: loads, tokenise, actor start, all units", tokens, ray_run["end_to_end_s"]),
        ("run_cache steady state", "Ray job: units after the first", ray_run["steady_tokens"], ray_run["steady_s"]),
    ]
    rows = [
        {"row": name, "what": what, "tokens": n, "seconds": s, "tokens_per_s": n / s, "vs_bare": n / s / bare_tps}
        for name, what, n, s in measured
    ]

    config = {
        **vars(args),
        "hookpoints": hookpoints,
        "deepest_layer": depth,
        "units": len(items),
        "torch_threads": threads,
        "actor_omp_num_threads": omp,
        "driver_default_threads": driver_threads,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    print(
        f"\nmodel={EMBEDDED_MODEL} hookpoints={','.join(hookpoints)} (layers 0..{depth}) seq_len={args.seq_len} ",
        end="",
    )
    print(f"batch={args.batch_size} storage={args.dtype} actors={args.actors} units={len(items)}")
    print(
        f"torch threads={threads} in every row (the Ray actor's OMP_NUM_THREADS={omp}, from --cpus-per-actor "
        f"{args.cpus_per_actor:g}; this process defaults to {driver_threads}) on {os.cpu_count()} CPUs, torch "
        f"{torch.__version__}"
    )
    diff = check["bare_forward_max_abs_diff"]
    diff_text = "not comparable (last layer)" if diff is None else f"{diff:.2e}"
    print(f"bare forward vs transformers' hidden_states[{depth + 1}]: max |diff| = {diff_text}")
    print(
        f"fixed costs, not in the in-process rows: Ray start-up {ray_start_s:.1f} s (in no row), model load "
        f"{load_s:.1f} s, tokenise/plan {plan_s:.1f} s"
    )
    first_work_s = ray_run["unit_tokens"][0] / rows[-1]["tokens_per_s"]
    print(
        f"run_cache: first unit's shards written {ray_run['first_unit_s']:.1f} s after the call, of which about "
        f"{ray_run['first_unit_s'] - first_work_s:.1f} s start-up (driver load + plan, Ray Data set-up, actor "
        f"start, its model load) and {first_work_s:.1f} s the unit itself at the steady rate"
    )
    cpu = ray_run["cpu_s"]
    print(
        f"run_cache CPU time over its {ray_run['end_to_end_s']:.1f} s: cache actor(s) {cpu['cache_actors']:.1f} s "
        f"(with their imports and model load), this driver {cpu['driver']:.1f} s, Ray's other processes "
        f"{cpu['other_ray']:.1f} s"
    )
    before, after = seconds["bare_unit0"], seconds["bare_unit0_after"]
    change = after / before - 1
    print(
        f"bare forward on unit 0: {before:.2f} s before the Ray job, {after:.2f} s after ({change:+.0%})"
        + ("; the machine's load changed, rerun on an idle machine" if abs(change) > 0.1 else "")
    )
    print("vs bare = tokens/s / bare forward tokens/s (goal for run_cache >= 0.85)\n")
    header = f"{'row':<24}{'what':<50}{'tokens':>8}{'seconds':>9}{'tokens/s':>10}{'vs bare':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['row']:<24}{r['what']:<50}{r['tokens']:>8}{r['seconds']:>9.2f}{r['tokens_per_s']:>10.0f}"
            f"{r['vs_bare']:>9.2f}"
        )

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    fixed = {"ray_start_s": ray_start_s, "model_load_s": load_s, "plan_s": plan_s}
    check = {**check, "bare_unit0_s_before": before, "bare_unit0_s_after": after}
    out = {"config": config, "fixed_costs": fixed, **check, "rows": rows, "run_cache": ray_run}
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
