"""Shared test helpers: a local Ray per test module, and a small sweep spec on the embedded model that trains
in seconds."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

# One auth mode for the whole session, in this process and every process it starts: Ray reads RAY_AUTH_MODE when
# it starts a cluster and when it connects, and once a token file exists (~/.ray/auth_token, written by the first
# cluster) a process that starts a cluster without the variable and one that connects with it disagree, and every
# actor then dies at its first call with "InvalidAuthToken".
os.environ["RAY_AUTH_MODE"] = "disabled"


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray cluster of 2 CPUs for the test module that asks for it, shut down after the module."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def sweep_spec(output, cache_root=None, **sections) -> dict:
    """A sweep of tiny coders on layers.3.mlp of the embedded model; `sections` replace or extend the defaults
    (a dict section is merged key by key)."""
    spec = {
        "name": "tiny",
        "output": str(output),
        "cache": {
            "hookpoints": ["layers.3.mlp"],
            "seq_len": 32,
            "train_tokens": 2048,
            "heldout_tokens": 2048,
            "sequences_per_unit": 16,
            "batch_size": 16,
        },
        "coder": {"expansion_factor": 2, "k": 8},
        "space": {"activation": ["topk", "binary_topk"], "kind": ["sae", "skip_transcoder"]},
        "search": {"algorithm": "grid", "max_concurrent": 2},
        "training": {"steps": 20, "batch_size": 128, "checkpoint_every": 10, "eval_tokens": 512},
        "resources": {"cpus_per_worker": 1},
    }
    if cache_root is not None:
        spec["cache"]["root"] = str(cache_root)
    for key, value in sections.items():
        spec[key] = {**spec[key], **value} if isinstance(value, dict) and key in ("cache", "training") else value
    return spec


@pytest.fixture
def make_spec():
    return sweep_spec


def a_trial_finished(run: Path) -> bool:
    """Whether the sweep writing into `run` has a finished trial in its trials table yet (a table being
    rewritten, or not there yet, counts as no)."""
    from ray_jobs.trials import TRIALS_TABLE

    try:
        return bool((pd.read_parquet(run / TRIALS_TABLE)["status"] == "finished").any())
    except (OSError, ValueError):
        return False


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory):
    """The README's main command at a small scale, run once per session: `bae study` (what `make quickstart` runs)
    on the quickstart spec (same grid of 8 coders on layers.9.mlp of the embedded model) with a few thousand
    tokens, in its own process. Returns (run folder, the finished `subprocess.CompletedProcess`).

    Tests that read the run share it as it is; a test that writes into it works on a copy
    (`shutil.copytree(run, tmp_path / "run")`)."""
    tmp_path = tmp_path_factory.mktemp("quickstart")
    spec = yaml.safe_load((REPO / "sweeps" / "quickstart.yaml").read_text())
    spec["output"] = str(tmp_path / "run")
    spec["cache"].update(seq_len=64, train_tokens=4096, heldout_tokens=2048)
    spec["coder"]["expansion_factor"] = 1
    spec["training"].update(steps=20, batch_size=256, checkpoint_every=10, eval_tokens=2048)
    spec["scoring"].update(trial_latents=64, fidelity_tokens=128, ablation_bins=2, min_examples=3)
    path = tmp_path / "quickstart-small.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_ADDRESS": "local"}
    done = subprocess.run(
        ["bae", "study", str(path)], env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return tmp_path / "run", done
