"""`--gpus-per-task` (the spec's scoring.gpus_per_task) of `bae score` and `bae probe`, on machines without a GPU:
a bad value is named in one line before Ray starts; on a real local Ray cluster with one logical GPU
(`ray.init(num_gpus=1)`, no device behind it) the fidelity task and the probing actors are given the GPU, fall back
to the CPU because torch sees no CUDA, and say so once; where a result was computed never makes it stale. (A
cluster without any GPU fails before any work: tests/test_score_reruns.py and tests/test_probing.py, on their
GPU-less clusters.)"""

import json
import shutil
import time

import pytest
import ray
import torch

from bae_core.data.cache import open_filesystem
from ray_jobs.cli import main
from ray_jobs.gpus import gpu_slots, require_gpus
from ray_jobs.probe_activations import activation_stale, activations_path, capture_activations, model_key
from ray_jobs.probe_job import ProbeOptions
from ray_jobs.score_plan import ScoreOptions, plan

FALLBACK = "Ray gave the task GPU 0 and torch sees no CUDA device"


def test_a_bad_value_is_named_in_one_line_and_the_spec_value_is_read(quickstart_run, tmp_path, capsys):
    run = str(quickstart_run[0])
    for command in ("score", "probe"):
        for value, problem in (("-0.5", "must be >= 0"), ("1.5", "above 1 it must be a whole number")):
            capsys.readouterr()
            assert main([command, run, "--gpus-per-task", value]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].endswith(f"got {value}"), err
            assert err[0].startswith(f"bae {command}: error: scoring.gpus_per_task (--gpus-per-task): {problem}")
    assert not ray.is_initialized()  # named before Ray starts
    (tmp_path / "spec.json").write_text(json.dumps({"scoring": {"gpus_per_task": 0.25}}))
    assert ScoreOptions.from_run(str(tmp_path)).gpus_per_task == 0.25
    assert ScoreOptions.from_run(str(tmp_path), gpus_per_task=0.0).gpus_per_task == 0  # the command line wins
    assert ProbeOptions.from_run(str(tmp_path)).gpus_per_task == 0.25
    # Where the forwards run is no setting of a result: a result made on CPUs is not redone on GPUs.
    assert ScoreOptions(gpus_per_task=0.25).evaluation_settings() == ScoreOptions().evaluation_settings()
    assert ProbeOptions(gpus_per_task=1).result_settings("m") == ProbeOptions().result_settings("m")


@pytest.fixture(scope="module")
def logical_gpu(quickstart_run, tmp_path_factory):
    """A local Ray cluster of 2 CPUs and one logical GPU (Ray grants it; torch here sees no CUDA), and a copy of the
    quickstart run to score and probe on it."""
    assert not torch.cuda.is_available(), "this module checks the fallback of a GPU that torch cannot see"
    run = tmp_path_factory.mktemp("gpus") / "run"
    shutil.copytree(quickstart_run[0], run)
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield run
    ray.shutdown()


def test_the_fidelity_task_is_given_the_gpu_and_falls_back_to_the_cpu(logical_gpu, capsys):
    run = logical_gpu
    # Per node: 2 tasks of half a GPU fit, 4 of a quarter GPU would but the node has 2 CPUs, 2 GPUs never do.
    assert (gpu_slots(0.5), gpu_slots(0.25), gpu_slots(1), gpu_slots(2)) == (2, 2, 1, 0)
    with pytest.raises(ValueError, match=r"has 2 GPUs and a CPU \(1 node, 2 CPUs; at most 1 GPU on a node\)"):
        require_gpus(2, "the spliced fidelity and ablation")
    evaluations = sorted((run / "evaluation").glob("trial-*.json"))
    redo, kept = evaluations[0], {p: p.stat().st_mtime_ns for p in evaluations[1:]}
    before = json.loads(redo.read_text())
    redo.unlink()
    capsys.readouterr()
    assert main(["score", str(run), "--gpus-per-task", "0.5"]) == 0
    err = capsys.readouterr().err
    assert err.count(FALLBACK) == 1 and "scoring.gpus_per_task (--gpus-per-task) is 0.5, but the language" in err
    after = json.loads(redo.read_text())
    assert after["device"] == "cpu" and FALLBACK in after["device_note"] and before["device"] == "cpu"
    assert after["settings"] == before["settings"] and {p: p.stat().st_mtime_ns for p in kept} == kept
    # The same computation as the CPU task of the quickstart: the same numbers.
    assert after["fidelity"] == pytest.approx(before["fidelity"], rel=1e-6, nan_ok=True)
    assert after["ablation"] == before["ablation"]
    mtime = redo.stat().st_mtime_ns
    assert main(["score", str(run), "--gpus-per-task", "0"]) == 0  # back on CPUs: nothing is redone
    assert redo.stat().st_mtime_ns == mtime and "redoing" not in capsys.readouterr().err


def test_the_probing_actors_are_given_the_gpu_and_fall_back_to_the_cpu(logical_gpu):
    run = str(logical_gpu)
    options = ProbeOptions.from_run(run, tasks=["5_hist_fig_ismale"], max_examples=20, gpus_per_task=0.5)
    cache = plan(run)[0].cache
    steps, notices = [], []
    capture_activations(
        run, cache, ["layers.9.mlp"], list(options.tasks), options, step=steps.append, notice=notices.append
    )
    assert steps == ["activations 5_hist_fig_ismale"]
    assert len(notices) == 1 and FALLBACK in notices[0] and notices[0].startswith("scoring.gpus_per_task")
    model, folder = model_key(cache)
    fs, base = open_filesystem(run)
    name = activations_path(folder, "layers.9.mlp", "5_hist_fig_ismale")
    on_cpus = ProbeOptions.from_run(run, tasks=["5_hist_fig_ismale"], max_examples=20, gpus_per_task=0)
    assert activation_stale(fs, base, name, on_cpus.activation_settings(model)) is None  # done, wherever it ran
    deadline = time.monotonic() + 10
    while ray.available_resources().get("GPU") != 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ray.available_resources().get("GPU") == 1  # the actor is gone and its share of the GPU with it


def test_a_cluster_whose_autoscaler_can_add_gpu_nodes_is_waited_for_and_one_that_cannot_is_refused(logical_gpu):
    """The node types an autoscaler reports to Ray's GCS (written here through the GCS client's own call for it,
    `report_cluster_config`) decide: a type with the GPUs is waited for with a note; none is refused, naming the
    types."""
    from ray._private.worker import global_worker
    from ray.core.generated.autoscaler_pb2 import ClusterConfig, NodeGroupConfig

    def report(*groups: NodeGroupConfig) -> None:
        global_worker.gcs_client.report_cluster_config(ClusterConfig(node_group_configs=groups).SerializeToString())

    head = NodeGroupConfig(name="head", resources={"CPU": 2}, min_count=1, max_count=1)
    try:
        report(head, NodeGroupConfig(name="gpu_worker", resources={"CPU": 8, "GPU": 4}, min_count=0, max_count=2))
        note = require_gpus(2, "the spliced fidelity and ablation")
        assert note == (
            "scoring.gpus_per_task (--gpus-per-task) is 2 for the spliced fidelity and ablation, and no node of the "
            "Ray cluster has 2 GPUs and a CPU (1 node, 2 CPUs; at most 1 GPU on a node) yet: the work waits for the "
            "autoscaler to start a node of type gpu_worker"
        )
        with pytest.raises(
            ValueError,
            match=r"nor has any node type its autoscaler can start \(head, gpu_worker\), so "
            r"Ray would wait for them forever; give --gpus-per-task 4 or less$",
        ):
            require_gpus(8, "the spliced fidelity and ablation")
        report(head, NodeGroupConfig(name="gpu_worker", resources={"CPU": 8, "GPU": 4}, min_count=0, max_count=0))
        with pytest.raises(ValueError, match=r"can start \(head\), so .* give --gpus-per-task 1 or less$"):
            require_gpus(2, "x")  # a type that may have no node is not one the autoscaler can start
        assert require_gpus(1, "x") is None  # the node has it now
    finally:
        report()  # no node types: a cluster this process started, which never grows
    with pytest.raises(ValueError, match=r"on a node\), so Ray would wait for them forever; give --gpus-per-task 1"):
        require_gpus(2, "x")
