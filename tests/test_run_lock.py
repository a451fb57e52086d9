"""A run folder (or cache root) is locked while a command writes to it: a second writer is refused at once with
the holder named, and the lock of a killed command is taken over. Real processes: holders started with
`python -c`, and two `bae sweep` of one spec into one folder at once, each with its own local Ray."""

import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from resume_checks import reported_steps, resumed_from

from ray_jobs.lock import LOCK_FILE, FolderLocked, folder_lock, read_holder
from ray_jobs.trials import TRIALS_TABLE

BIN = Path(sys.executable).parent


def hold(folder: str, command: str) -> subprocess.Popen:
    """Another process that takes the folder's lock and keeps it until it is killed."""
    code = textwrap.dedent(
        f"""
        import time
        from ray_jobs.lock import folder_lock
        with folder_lock({folder!r}, {command!r}):
            print("held", flush=True)
            time.sleep(600)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def kill(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait(timeout=30)


@pytest.mark.parametrize("uri", [False, True], ids=["local", "uri"])
def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_holders_lock_is_taken_over(tmp_path, uri, caplog):
    folder = f"file://{tmp_path}/run" if uri else str(tmp_path / "run")
    holder = hold(folder, "bae sweep")
    try:
        started = time.monotonic()
        with pytest.raises(FolderLocked) as refused, folder_lock(folder, "bae score"):
            pytest.fail("a second writer got the lock")
        assert time.monotonic() - started < 5  # refused at once, not after a wait
        message = str(refused.value)
        assert message.startswith(
            f"{folder} is in use by `bae sweep` (pid {holder.pid} on {socket.gethostname()}, since 20"
        ), message
        assert "UTC); wait for it to end, or write to another folder" in message and "\n" not in message
        assert read_holder(folder)["pid"] == holder.pid
    finally:
        kill(holder)

    # The holder was killed: its lock file is still there, naming it, and is taken over with a warning.
    assert (tmp_path / "run" / LOCK_FILE).exists() and read_holder(folder)["pid"] == holder.pid
    caplog.set_level(logging.WARNING, logger="ray_jobs.lock")
    with folder_lock(folder, "bae score") as me:
        assert read_holder(folder) == me and me["pid"] == os.getpid() and me["command"] == "bae score"
        # The same process may take it again (bae study: bae sweep, then bae score); it stays held until the
        # outermost holder lets go.
        with folder_lock(folder, "bae sweep"):
            pass
        assert read_holder(folder) == me
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    assert f"taking over the lock of `bae sweep` (pid {holder.pid} on {socket.gethostname()}" in caplog.text
    assert "which is no longer running" in caplog.text


def test_a_uri_lock_of_another_host_is_refused_with_how_to_remove_it(tmp_path):
    folder = f"file://{tmp_path}/run"
    (tmp_path / "run").mkdir()
    lock = '{"host": "elsewhere", "pid": 1, "command": "bae score", "started": "2026-01-01 00:00:00 UTC"}'
    (tmp_path / "run" / LOCK_FILE).write_text(lock)
    with pytest.raises(FolderLocked) as refused, folder_lock(folder, "bae sweep"):
        pass
    assert str(refused.value) == (
        f"{folder} is in use by `bae score` (pid 1 on elsewhere, since 2026-01-01 00:00:00 UTC); wait for it to end, "
        f"or write to another folder (if that command is no longer running, delete {tmp_path}/run/{LOCK_FILE})"
    )


def test_score_and_cache_take_the_lock_of_what_they_write(tmp_path):
    from ray_jobs.cache_job import CacheRequest, run_cache
    from ray_jobs.score_job import run_score

    run = str(tmp_path / "run")
    holder = hold(run, "bae sweep")
    try:
        with pytest.raises(FolderLocked, match=rf"in use by `bae sweep` \(pid {holder.pid} "):
            run_score(run)
    finally:
        kill(holder)
    cache = str(tmp_path / "cache")
    holder = hold(cache, "bae cache")
    try:
        with pytest.raises(FolderLocked, match=rf"{cache} is in use by `bae cache` \(pid {holder.pid} "):
            run_cache(CacheRequest(root=cache, hookpoints=["layers.3.mlp"], seq_len=32, train_tokens=64))
    finally:
        kill(holder)
    assert not (tmp_path / "cache" / "manifest.json").exists()


def env() -> dict[str, str]:
    """The user's environment with this virtualenv first on PATH; each command starts its own local Ray."""
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "RAY_AUTH_MODE": "disabled",
        "RAY_ADDRESS": "local",
    }


def wait_for(what: str, ready, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the command ended (rc {proc.returncode}) before {what}:\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"no {what} within {timeout:.0f}s")
        time.sleep(0.05)


def test_two_sweeps_into_one_folder_the_second_is_refused_and_a_killed_ones_lock_is_taken_over(tmp_path, make_spec):
    run = tmp_path / "run"
    spec = tmp_path / "spec.yaml"
    # Two trials one after the other, long enough to be caught in the middle; checkpoints every 50 steps.
    spec.write_text(
        yaml.safe_dump(
            make_spec(
                run,
                space={"activation": ["topk", "binary_topk"]},
                search={"algorithm": "grid", "max_concurrent": 1},
                training={"steps": 300, "checkpoint_every": 50, "log_every": 7},
                scoring={"trial_latents": 0},
            )
        )
    )
    sweep = ["bae", "sweep", str(spec)]
    first = subprocess.Popen(
        sweep, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        wait_for("lock", lambda: (read_holder(str(run)) or {}).get("pid") == first.pid, first)
        holder = read_holder(str(run))
        second = subprocess.run(sweep, env=env(), capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        assert (
            f"bae sweep: error: {run} is in use by `bae sweep` (pid {first.pid} on {socket.gethostname()}, "
            f"since {holder['started']}); wait for it to end, or write to another folder"
        ) in second.stderr
        assert first.poll() is None  # the first goes on

        # The first is killed (driver, Ray and trial processes) once a trial has reported its second checkpoint and
        # not yet its last (the trials run one after the other, so the second passes there if the first is done).
        def in_the_middle() -> bool:
            reached = (max(reported_steps(p.parent), default=0) for p in (run / "tune").glob("*/result.json"))
            return any(100 <= steps < 300 for steps in reached)

        wait_for("a trial between its second checkpoint and its end", in_the_middle, first)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    assert read_holder(str(run))["pid"] == first.pid  # a stale lock
    before = {d.parent: reported_steps(d.parent) for d in (run / "tune").glob("*/result.json")}
    (interrupted,) = [d for d, steps in before.items() if 100 <= max(steps, default=0) < 300]

    third = subprocess.run(sweep, env=env(), capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"taking over the lock of `bae sweep` (pid {first.pid} on {socket.gethostname()}" in third.stderr
    assert "which is no longer running" in third.stderr and not (run / LOCK_FILE).exists()
    trials = pd.read_parquet(run / TRIALS_TABLE)
    assert len(trials) == 2 and (trials["status"] == "finished").all() and (trials["steps"] == 300).all()
    trial_dirs = sorted(p.parent for p in (run / "tune").glob("*/result.json"))
    assert len(trial_dirs) == 2  # each trial trained in one folder: nothing twice
    for d in trial_dirs:
        resumed_from(d, 50)
    # The trial the kill interrupted went on from a checkpoint of step 50 or later: after the kill, no report
    # came at or before it (a restart from step 0 would report step 50 again).
    steps = reported_steps(interrupted)
    assert steps[: len(before[interrupted])] == before[interrupted]
    after = steps[len(before[interrupted]) :]
    checkpoint = after[0] - 50
    assert checkpoint >= 50 and checkpoint in before[interrupted] and all(s > checkpoint for s in after), steps
