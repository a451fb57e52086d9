"""The `bae` commands as a user runs them, in their own processes: a driver killed part-way through a sweep or
a cache resumes, a sweep submitted with `ray job submit` to a head started with `ray start --head`, and an
unreachable cluster named in the error."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import a_trial_finished

from bae_core.data.cache import load_manifest, verify_cache
from ray_jobs.cli import main
from ray_jobs.trials import TRIALS_TABLE

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def env(**extra) -> dict[str, str]:
    """The user's environment with this virtualenv first on PATH; RAY_ADDRESS=local: a new cluster per command."""
    e = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled"}
    e.setdefault("RAY_ADDRESS", "local")
    e.update(extra)
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_when(proc: subprocess.Popen, ready, what: str, timeout: float = 300) -> None:
    """SIGKILL the command and every process it started once `ready()` holds (a crash, not a clean stop)."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            pytest.fail(f"the command ended (rc {proc.returncode}) before {what}:\n{out[-3000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"no {what} within {timeout:.0f}s")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def mtimes(folder: Path, pattern: str) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob(pattern)}


def test_unreachable_cluster_is_named_at_once(tmp_path, make_spec, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump(make_spec(tmp_path / "run")))
    port = free_port()  # nothing listens there
    start = time.monotonic()
    assert main(["sweep", str(spec), "--address", f"127.0.0.1:{port}"]) == 2
    assert main(["cache", str(tmp_path / "c"), "--address", f"127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert err.count(f"error: ray: cannot reach the cluster at 127.0.0.1:{port} (Connection refused)") == 2
    assert time.monotonic() - start < 30
    assert not (tmp_path / "run").exists() and not (tmp_path / "c").exists()  # nothing started, nothing written


def test_sweep_whose_driver_is_killed_resumes_without_retraining_finished_trials(tmp_path, make_spec):
    run = tmp_path / "run"
    spec = tmp_path / "s.yaml"
    # One trial at a time, each long enough to be caught in the middle.
    spec.write_text(
        yaml.safe_dump(make_spec(run, search={"algorithm": "grid", "max_concurrent": 1}, training={"steps": 60}))
    )

    cmd = ["bae", "sweep", str(spec)]
    first = subprocess.Popen(
        cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    kill_when(first, lambda: a_trial_finished(run), "finished trial")
    before = pd.read_parquet(run / TRIALS_TABLE)
    done_before = before[before["status"] == "finished"]
    assert 1 <= len(done_before) < 4
    checkpoints = mtimes(run / "tune", "*.safetensors")

    again = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming the sweep in {run / 'tune'}" in again.stderr
    assert "4 trials finished, 0 failed" in again.stdout
    trials = pd.read_parquet(run / TRIALS_TABLE)
    assert len(trials) == 4 and (trials["status"] == "finished").all() and (trials["steps"] == 60).all()
    # The trials finished before the kill were not trained again: same rows, same checkpoint files.
    kept = trials.set_index("trial_id").loc[done_before["trial_id"]]
    for column in ("fvu", "train_seconds", "checkpoint"):
        assert kept[column].tolist() == done_before[column].tolist()
    for trial_dir in {(run / c).parent for c in done_before["checkpoint"]}:  # stored relative to the run
        files = {p: t for p, t in checkpoints.items() if p.startswith(f"{trial_dir}/")}
        assert files and files == mtimes(trial_dir, "*.safetensors")

    # `bae score`, killed once its first files are written, resumes and keeps them.
    score = ["bae", "score", str(run), "--min-examples", "5", "--fidelity-tokens", "64", "--ablation-bins", "2"]
    first = subprocess.Popen(
        score, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    kill_when(first, lambda: any((run / "scores").glob("*.parquet")), "score file")
    written = mtimes(run / "scores", "*.parquet")
    again = subprocess.run(score, env=env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "lexical explainability (token/bigram rules)" in again.stdout and "CE+" in again.stdout
    assert {p: t for p, t in mtimes(run / "scores", "*.parquet").items() if p in written} == written
    latents = pd.read_parquet(run / "latents.parquet")
    coders = pd.read_parquet(run / "coders.parquet")
    assert set(latents["coder_id"]) == set(coders["coder_id"]) and len(coders) == 4 + 1 + 2  # baseline, controls
    assert coders["ce_increase"].notna().sum() == 4 and (coders["fidelity_tokens"].dropna() == 2 * 31).all()


def test_cache_killed_part_way_resumes_and_keeps_the_shards_it_wrote(tmp_path):
    root = tmp_path / "cache"
    # Many small shards of a deep layer, so the kill lands in the middle.
    cmd = [
        "bae", "cache", str(root), "--hookpoints", "layers.20.mlp", "--seq-len", "32", "--train-tokens", str(32 * 48),
        "--heldout-tokens", str(32 * 8), "--sequences-per-shard", "2", "--batch-size", "2",
    ]  # fmt: skip
    first = subprocess.Popen(
        cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    kill_when(first, lambda: len(list(root.rglob("shard-*.parquet"))) >= 3, "three shards")
    written = mtimes(root, "shard-*.parquet")
    manifest = load_manifest(str(root))
    assert manifest is not None and not manifest.complete and len(written) < 28

    again = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    manifest = load_manifest(str(root))
    assert manifest.complete and len(manifest.shards) == 24 + 4
    assert verify_cache(str(root)) == 28
    # Every shard the killed run had finished was adopted after a check, not written again.
    now = mtimes(root, "shard-*.parquet")
    assert {p: now[p] for p in written} == written
    assert not list(root.rglob("*.tmp-*"))


@pytest.fixture
def ray_head(tmp_path):
    """A head node started the way a user starts one, with its job server; stopped afterwards."""
    port, dashboard = free_port(), free_port()
    e = env()
    e.pop("RAY_ADDRESS")
    subprocess.run(
        ["ray", "start", "--head", f"--port={port}", f"--dashboard-port={dashboard}", "--num-cpus=2",
         "--include-dashboard=true", "--disable-usage-stats"],
        env=e, check=True, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    try:
        yield f"http://127.0.0.1:{dashboard}", e
    finally:
        subprocess.run(["ray", "stop", "--force"], env=e, capture_output=True, timeout=120)


def test_sweep_submitted_with_ray_job_submit_runs_to_completion(ray_head, tmp_path, make_spec):
    address, e = ray_head
    run = tmp_path / "run"
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump(make_spec(run, space={"activation": ["topk", "binary_topk"]})))
    # The README's way: the repository as the job's working directory, the driver on the cluster.
    job = subprocess.run(
        ["ray", "job", "submit", "--address", address, "--working-dir", str(REPO), "--", "bae", "sweep", str(spec)],
        env=e, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "sweep tiny: 2 trials finished, 0 failed" in job.stdout
    assert "succeeded" in job.stdout
    trials = pd.read_parquet(run / TRIALS_TABLE)
    assert len(trials) == 2 and (trials["status"] == "finished").all()
    assert sorted(trials["activation"]) == ["binary_topk", "topk"] and trials["fvu"].between(0, 1).all()


def test_a_relative_output_inside_a_submitted_job_is_resolved_and_warned_about(tmp_path, monkeypatch, caplog):
    from ray_jobs.runtime import storage_path

    monkeypatch.chdir(tmp_path)
    assert storage_path("s3://bucket/run") == "s3://bucket/run"
    assert storage_path("runs/x") == str(tmp_path / "runs" / "x") and not caplog.records
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # what `ray job submit` sets for its driver
    assert storage_path("runs/x") == str(tmp_path / "runs" / "x")
    assert "runs inside `ray job submit`" in caplog.text and "Pass an absolute path" in caplog.text
    caplog.clear()
    assert storage_path(str(tmp_path / "abs")) == str(tmp_path / "abs") and not caplog.records
