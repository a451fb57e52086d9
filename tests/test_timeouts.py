"""The test suite cannot hang: a test stuck in a Ray call fails within the per-test time limit of pyproject.toml
(pytest-timeout), naming the test, instead of running into CI's own limit."""

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

STUCK = textwrap.dedent(
    """
    import time

    import ray


    def test_a_stuck_ray_get():
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)

        @ray.remote
        def forever():
            time.sleep(10_000)

        ray.get(forever.remote())  # blocks in Ray's core worker, which swallows the exception of a SIGALRM handler
    """
)


def test_a_test_stuck_in_ray_get_fails_by_name_within_its_time_limit(tmp_path):
    (tmp_path / "test_stuck.py").write_text(STUCK)
    # The project's pytest settings, with a time limit of 20 s instead of the suite's.
    command = [sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(tmp_path)]
    command += ["-o", "timeout=20", "-p", "no:cacheprovider", str(tmp_path / "test_stuck.py")]
    started = time.monotonic()
    out = subprocess.run(
        command,
        cwd=tmp_path,
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    assert time.monotonic() - started < 200
    assert "Timeout" in out.stdout and ", in test_a_stuck_ray_get" in out.stdout, out.stdout[-3000:]
