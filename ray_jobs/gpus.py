"""GPUs for the language-model work of `bae score` and `bae probe` (`scoring.gpus_per_task`, `--gpus-per-task`).

    the driver: `check_gpus_per_task` (the value), `require_gpus` (a cluster that can never grant it fails at once,
                naming the option and what the cluster has, since Ray would wait for the resource forever; one
                that may yet add GPU nodes through its autoscaler gets a printed note instead),
                `gpu_slots` (how many such tasks the cluster runs at once)
    a task:     `lm_device` (cuda when Ray gave the task a GPU and torch sees one; else the CPU, with a note that
                the driver prints, because the workers' logs do not reach the console)

The device never changes what counts as done: the settings recorded with a result leave it out (the numbers
depend on `lm_dtype`, which they record, not on where the forwards ran), so a run scored on CPUs is not redone on
GPUs, nor the other way round. Lexical scoring and the probes themselves need no GPU.
"""

from __future__ import annotations

import logging
import math

log = logging.getLogger(__name__)

OPTION = "scoring.gpus_per_task (--gpus-per-task)"


def check_gpus_per_task(value: float) -> None:
    """A value Ray can grant: >= 0, and above 1 a whole number (Ray shares a GPU only in fractions below 1)."""
    if not value >= 0:  # NaN too
        raise ValueError(f"{OPTION}: must be >= 0 (0 runs the language model on CPUs), got {value:g}")
    if value > 1 and value != int(value):
        raise ValueError(
            f"{OPTION}: above 1 it must be a whole number (Ray shares a GPU only in fractions below 1), got {value:g}"
        )


def _nodes() -> list[dict]:
    import ray

    return [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]


def gpu_slots(gpus: float, cpus: float = 1.0) -> int:
    """How many tasks of `gpus` GPUs and `cpus` CPUs the cluster's nodes hold at once (counted per node: a task
    runs on one)."""
    # The small tolerance keeps 1 / 0.1 from rounding down to 9.
    return sum(
        min(math.floor(r.get("CPU", 0) / cpus + 1e-9), math.floor(r.get("GPU", 0) / gpus + 1e-9)) for r in _nodes()
    )


def require_gpus(gpus: float, what: str) -> str | None:
    """Check before any work that the Ray cluster can ever grant tasks of `gpus` GPUs and a CPU; `what` names the
    work that needs them. Ray would otherwise wait for the resource forever.

    - A node has them now (or `gpus` is 0): None.
    - The cluster cannot grow: a ValueError (bad input: exit 2) that says what the cluster has. That is a cluster
      this process started (`bae score` without an address, RAY_ADDRESS=local), or one whose autoscaler reports
      its node types to Ray (`ray._private.state.state.get_cluster_config()`, which Ray Data's autoscaling reads)
      and no type has them.
    - A node type the autoscaler reports has them: a note to print (the work waits for such a node).
    - Otherwise (a cluster this process joined, whose node types Ray does not say, as with the v1 autoscaler of
      `ray up cluster.yaml`, whose GPU workers start from 0): a note to print that the work waits for the
      autoscaler, and how to stop if none comes.
    """
    if not gpus or gpu_slots(gpus) > 0:
        return None
    nodes, types = _nodes(), _node_types()
    cpus = sum(r.get("CPU", 0) for r in nodes)
    most = max((r.get("GPU", 0) for r in nodes), default=0)
    has = f"{_count(len(nodes), 'node')}, {_count(cpus, 'CPU')}"
    if not most:
        problem = f"the Ray cluster has no GPU ({has}, 0 GPUs)"
    else:
        problem = (
            f"no node of the Ray cluster has {gpus:g} GPUs and a CPU ({has}; at most {_count(most, 'GPU')} on a node)"
        )
    if types is not None:
        fitting = sorted(name for name, r, _ in types if r.get("GPU", 0) >= gpus and r.get("CPU", 0) >= 1)
        if fitting:
            return (
                f"{OPTION} is {gpus:g} for {what}, and {problem} yet: the work waits for the autoscaler to start "
                f"a node of type {', '.join(fitting)}"
            )
        problem += f", nor has any node type its autoscaler can start ({', '.join(n for n, _, _ in types)})"
        most = max([most, *(r.get("GPU", 0) for _, r, _ in types if r.get("CPU", 0) >= 1)])
    if not most:
        fix = "give --gpus-per-task 0 to run the language model on CPUs, or join a cluster with GPUs (--address)"
    else:
        fix = f"give --gpus-per-task {most:g} or less"
    if types is None and not _started_here():
        return (
            f"{OPTION} is {gpus:g} for {what}, but {problem} yet: the work waits until the cluster's autoscaler "
            "adds a node with GPUs (cluster.yaml's GPU workers start from 0). If this cluster cannot add one, "
            f"it waits forever: stop it with Ctrl-C (what is done is kept) and {fix}"
        )
    raise ValueError(f"{OPTION} is {gpus:g} for {what}, but {problem}, so Ray would wait for them forever; {fix}")


def _count(n: float, what: str) -> str:
    return f"{n:g} {what}{'' if n == 1 else 's'}"


def _node_types() -> list[tuple[str, dict, int]] | None:
    """The node types the cluster's autoscaler can start, as (name, resources, most nodes), where something has
    reported them to Ray's GCS (a managed cluster may; the v1 autoscaler of `ray up` and a cluster started without
    an autoscaler do not); else None."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 -- a private API: without it, the node types are unknown
        return None
    if config is None or not config.node_group_configs:
        return None
    return [(g.name, dict(g.resources), g.max_count) for g in config.node_group_configs if g.max_count != 0]


def _started_here() -> bool:
    """Whether this process started the Ray cluster it is connected to (ray.init without an address): no
    autoscaler runs for it, so it never has more than it has now."""
    from ray._private import worker

    node = getattr(worker, "_global_node", None)
    return bool(getattr(node, "head", False))


def lm_device(gpus: float) -> tuple[str, str | None]:
    """Inside a Ray task or actor: the torch device for its language model and coder, and, when the task asked for
    GPUs and runs on the CPU all the same, a note that says why (None otherwise; `fallback_notice` words it for the
    driver). With a GPU from Ray but no CUDA in torch (a CPU build of torch, no driver, an emptied
    CUDA_VISIBLE_DEVICES) the work falls back to the CPU, as `bae sweep`'s trials do: the result is the one a CPU
    run gives (the device is not among its settings), only slower."""
    if not gpus:
        return "cpu", None
    import ray
    import torch

    ids = ray.get_gpu_ids()
    if ids and torch.cuda.is_available():
        return "cuda", None
    where = f"the CPU of node {ray.util.get_node_ip_address()}"
    if not ids:
        note = f"the language model ran on {where}: Ray gave the task no GPU"
    else:
        note = (
            f"the language model ran on {where}: Ray gave the task GPU {', '.join(map(str, ids))} and torch sees no "
            f"CUDA device there (torch.cuda.is_available() is False: a CPU build of torch {torch.__version__}, no "
            "NVIDIA driver, or CUDA_VISIBLE_DEVICES); it is only slower"
        )
    log.warning("%s is %g, but %s", OPTION, gpus, note)  # in the worker's log; the driver prints it too
    return "cpu", note


def fallback_notice(gpus: float, note: str) -> str:
    """What the driver prints, once per distinct note, when a task that asked for GPUs ran on the CPU."""
    return f"{OPTION} is {gpus:g}, but {note}"


def device_name(device: str) -> str:
    """What a result records as its device: cpu, or cuda with the GPU's name."""
    if device != "cuda":
        return device
    import torch

    return f"cuda ({torch.cuda.get_device_name()})"
