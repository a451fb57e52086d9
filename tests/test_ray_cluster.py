"""Several Ray nodes on one machine (`ray.cluster_utils.Cluster`, real raylets): the cache is written by actors
on more than one node, a node that dies in the middle of a sweep costs no finished trial, and GPUs that no node has
yet are waited for (the cluster may add them) rather than refused."""

import contextlib
import json
import threading
import time

import pandas as pd
import psutil
import pytest
import ray
from ray.cluster_utils import Cluster
from resume_checks import reported_steps, resumed_from

from bae_core.data.cache import verify_cache
from ray_jobs.cache_job import run_cache
from ray_jobs.gpus import require_gpus
from ray_jobs.spec import parse_spec
from ray_jobs.sweep_job import run_sweep
from ray_jobs.trials import TRIALS_TABLE


def complete_lines(result_json) -> list[str]:
    """The reports Tune has written to a trial's result.json, without a line it is still writing."""
    return [line for line in result_json.read_text().splitlines(keepends=True) if line.endswith("\n")]


@pytest.fixture(scope="module")
def cluster():
    # The head runs the drivers only; each worker node has one CPU, so work on two nodes at once proves
    # it was spread, and a trial running there dies with its node.
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers = [c.add_node(num_cpus=1) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    yield c, workers
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def cache_root(cluster, tmp_path_factory):
    from conftest import sweep_spec

    root = tmp_path_factory.mktemp("cache")
    request = parse_spec(sweep_spec("unused", root, cache={"actors": 2, "sequences_per_unit": 8})).cache_request()
    manifest = run_cache(request)
    return root, manifest


def test_cache_is_written_by_actors_on_two_nodes(cluster, cache_root):
    (_, workers), (root, manifest) = cluster, cache_root
    assert {s.node for s in manifest.shards} == {w.node_id for w in workers}
    assert verify_cache(str(root)) == len(manifest.shards) == 2048 // 256 + 2048 // 256


def test_gpus_on_a_joined_cluster_without_them_are_waited_for_with_a_note(cluster):
    # A cluster this process joined may add GPU nodes through its autoscaler (cluster.yaml's GPU workers start
    # from 0), and Ray does not say whether it can: the work is not refused, and the note says how to stop.
    note = require_gpus(0.25, "the spliced fidelity and ablation")
    assert note.startswith(
        "scoring.gpus_per_task (--gpus-per-task) is 0.25 for the spliced fidelity and ablation, but the Ray cluster "
        "has no GPU (3 nodes, 2 CPUs, 0 GPUs) yet: the work waits until the cluster's autoscaler adds a node with GPUs"
    )
    assert note.endswith(
        "stop it with Ctrl-C (what is done is kept) and give --gpus-per-task 0 to run the language "
        "model on CPUs, or join a cluster with GPUs (--address)"
    )


def test_a_node_lost_mid_sweep_costs_no_finished_trial(cluster, cache_root, tmp_path, make_spec):
    c, workers = cluster
    root, _ = cache_root
    run = tmp_path / "run"
    # Four trials, two at a time (one per node); long enough that the last two are caught in the middle.
    spec = parse_spec(
        make_spec(
            run,
            root,
            cache={"sequences_per_unit": 8},
            training={"steps": 150, "checkpoint_every": 10},
            space={"activation": ["topk", "binary_topk"], "kind": ["sae", "skip_transcoder"]},
            resources={"cpus_per_worker": 1, "max_failures": 3},
        )
    )
    seen: dict[str, pd.DataFrame] = {}

    raylet = workers[1].all_processes["raylet"][0].process.pid

    def on_the_node(pid: int) -> bool:
        with contextlib.suppress(psutil.Error):
            return raylet in {p.pid for p in psutil.Process(pid).parents()}
        return False

    def remove_the_node_once_a_trial_finished_and_its_trial_checkpointed():
        # Early in its trial (its checkpoint of step 20 or later reported, 50 or more steps to go), so that the
        # trial is still running when the node goes.
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                table = pd.read_parquet(run / TRIALS_TABLE)
            except (OSError, ValueError):
                table = None
            last = [json.loads(lines[-1]) for p in (run / "tune").glob("*/result.json") if (lines := complete_lines(p))]
            caught = any(20 <= r["steps"] <= 100 and on_the_node(r["pid"]) for r in last)
            if table is not None and (table["status"] == "finished").any() and caught:
                seen["before"] = table
                c.remove_node(workers[1])
                return
            time.sleep(0.02)

    killer = threading.Thread(target=remove_the_node_once_a_trial_finished_and_its_trial_checkpointed, daemon=True)
    killer.start()
    results = run_sweep(spec, quiet=True)
    killer.join(timeout=5)

    assert "before" in seen, "no trial finished before the sweep ended: the node was never removed"
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2  # the head and one worker remain
    trials = pd.read_parquet(run / TRIALS_TABLE)
    assert len(results) == 4 and all(r.error is None for r in results)
    assert len(trials) == 4 and (trials["status"] == "finished").all() and (trials["steps"] == 150).all()
    # The trial that ran on the lost node had reported its checkpoint of step 20 or later; it was retried from its
    # last checkpoint, and says so: after the failure no report came at or before that checkpoint's step (one
    # restarted from step 0 would report step 10 again). A trial that started there later, before its first
    # report, rightly starts from step 0.
    assert trials["failures"].sum() >= 1
    for trial_id in trials.loc[trials["failures"] > 0, "trial_id"]:
        (trial_dir,) = (run / "tune").glob(f"*{trial_id}*")
        steps = reported_steps(trial_dir)
        assert min(resumed_from(trial_dir, 10), default=20) >= 10 and steps.count(10) == 1, steps
        assert steps[-1] == 150
    # The trials finished before the node went are in the final table unchanged.
    before = seen["before"].set_index("trial_id")
    finished = before[before["status"] == "finished"]
    after = trials.set_index("trial_id").loc[finished.index]
    pd.testing.assert_frame_equal(after[finished.columns], finished)
