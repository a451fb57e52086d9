"""Run folders on shared storage, and run folders that move.

A real S3-compatible server (moto's, on loopback) holds the cache and the run folder while the `bae` commands run
on them as a user runs them: `bae cache`, `bae sweep` and its resumption, `bae score`, `bae report`, and
`analysis.load_run`. The credentials come from the environment and appear nowhere: not in the bucket, the output
or Ray's logs. A local run folder that is moved is then scored and reported where it now is."""

import io
import logging
import os
import secrets
from pathlib import Path

import pandas as pd
import pytest
import ray
import yaml
from conftest import sweep_spec

pytest.importorskip("moto.server", reason="moto[server] (a dev dependency) runs the S3 server")
from moto.server import ThreadedMotoServer  # noqa: E402

from analysis import load_run, training_curves  # noqa: E402
from bae_core.data.paths import relative_to, resolve  # noqa: E402
from bae_core.evaluation.judge.client import ResponseCache  # noqa: E402
from ray_jobs.cli import main  # noqa: E402
from ray_jobs.score_plan import plan  # noqa: E402
from ray_jobs.trials import TRIALS_TABLE  # noqa: E402

BUCKET = "bae-test"
TABLES = ("latents", "coders", "ablation", "density", "frontier")
SCORE = ["--min-examples", "5", "--fidelity-tokens", "64", "--ablation-bins", "2"]
# Two coders, binary and continuous: enough for every command and the claims; a few seconds each.
SPACE = {"activation": ["topk", "binary_topk"], "kind": ["sae"]}
CACHE_FLAGS = [
    "--hookpoints", "layers.3.mlp", "--seq-len", "32", "--train-tokens", "2048", "--heldout-tokens", "2048",
    "--sequences-per-shard", "16", "--batch-size", "16",
]  # fmt: skip
"""`bae cache` flags for the cache `sweep_spec` describes, so that the sweep reuses it."""


@pytest.fixture(scope="module")
def s3():
    """An S3 server on loopback with one bucket, its endpoint and (made-up, unique) credentials in the
    environment as a user sets them; then a local Ray that inherits them. Returns the credentials."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    creds = {"AWS_ACCESS_KEY_ID": f"AKIA{secrets.token_hex(8).upper()}", "AWS_SECRET_ACCESS_KEY": secrets.token_hex(20)}
    env = {
        **creds,
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",  # offline: never ask an instance-metadata service
        "RAY_AUTH_MODE": "disabled",
    }
    saved = {k: os.environ.get(k) for k in [*env, "AWS_PROFILE", "AWS_SESSION_TOKEN"]}
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(k, None)
    os.environ.update(env)
    import boto3

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield creds
    finally:
        ray.shutdown()
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def objects(prefix: str) -> dict[str, tuple[str, object]]:
    """Key -> (ETag, LastModified) of every object under `prefix` in the bucket."""
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"]: (o["ETag"], o["LastModified"]) for page in pages for o in page.get("Contents", [])}


def get(key: str) -> bytes:
    import boto3

    return boto3.client("s3").get_object(Bucket=BUCKET, Key=key)["Body"].read()


def download(prefix: str, dest: Path) -> None:
    """Copy every object under `prefix` to the local folder `dest` (another machine's copy of the run)."""
    for key in objects(prefix):
        path = dest / key[len(prefix) :].lstrip("/")
        if not key.endswith("/"):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(get(key))


def session_logs() -> list[Path]:
    """Ray's log files of this session (driver, workers, raylet, GCS)."""
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    return [p for p in (session / "logs").rglob("*") if p.is_file()]


def test_the_whole_chain_on_s3_keeps_the_credentials_secret(s3, tmp_path, capfd):
    run, cache = f"s3://{BUCKET}/run", f"s3://{BUCKET}/cache"
    printed: list[str] = []

    def output():
        """What the commands printed since the last call (kept, to be searched for the credentials at the end)."""
        out = capfd.readouterr()
        printed.extend([out.out, out.err])
        return out

    assert main(["cache", cache, *CACHE_FLAGS]) == 0
    shards = [k for k in objects("cache/") if k.endswith(".parquet")]
    assert "cache/manifest.json" in objects("cache/")
    assert len(shards) == 2 * 4  # train and held-out: 4 shards of 16 sequences of 32 tokens each
    assert main(["cache", cache, "--verify"]) == 0

    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(sweep_spec(run, cache, space=SPACE)))
    assert main(["sweep", str(spec)]) == 0
    assert "2 trials finished, 0 failed" in output().out
    stored = pd.read_parquet(io.BytesIO(get("run/trials.parquet")))
    assert len(stored) == 2 and (stored["status"] == "finished").all()
    # Checkpoints are stored relative to the run, the cache (not inside the run) as its URI.
    assert stored["checkpoint"].str.startswith("tune/").all() and (stored["cache"] == cache).all()
    checkpoints = {k: v for k, v in objects("run/tune/").items() if "/checkpoint_" in k}
    for c in stored["checkpoint"]:
        assert {f"run/{c}/{name}" for name in ("sae.safetensors", "cfg.json", "trainer.safetensors")} <= set(
            checkpoints
        )
    assert not list(tmp_path.glob("**/*.safetensors")), "nothing of the run is written locally"

    # The same command again resumes the finished sweep: it trains nothing and rewrites no checkpoint.
    assert main(["sweep", str(spec)]) == 0
    out = output()
    assert f"resuming the sweep in {run}/tune" in out.err and "2 trials finished, 0 failed" in out.out
    again = pd.read_parquet(io.BytesIO(get("run/trials.parquet")))
    pd.testing.assert_frame_equal(again, stored)  # same trial ids, train_seconds, checkpoints
    assert {k: v for k, v in objects("run/tune/").items() if "/checkpoint_" in k} == checkpoints

    assert main(["score", run, *SCORE]) == 0
    coders = pd.read_parquet(io.BytesIO(get("run/coders.parquet")))
    assert len(coders) == 2 + 1 + 2  # two coders, the neuron baseline, two controls
    assert coders["ce_increase"].notna().sum() == 2 and coders["token_auroc"].notna().all()
    assert {f"run/scores/{c}.parquet" for c in coders["coder_id"]} <= set(objects("run/scores/"))

    local_report = tmp_path / "report"
    assert main(["report", run, "--out", str(local_report)]) == 0
    assert "## Coders" in (local_report / "report.md").read_text() and (local_report / "frontier.png").is_file()
    # Without --out the report goes into the run folder, on S3 too.
    assert main(["report", run]) == 0
    assert {"run/report/report.md", "run/report/frontier.png", "run/frontier.parquet"} <= set(objects("run/"))
    assert get("run/report/report.md").decode() == (local_report / "report.md").read_text()

    # load_run on the bucket reads exactly the stored tables; checkpoints come back as URIs in the run.
    tables = load_run(run)
    for name in TABLES:
        stored_table = pd.read_parquet(io.BytesIO(get(f"run/{name}.parquet")))
        pd.testing.assert_frame_equal(getattr(tables, name), stored_table)
    assert tables.trials["checkpoint"].tolist() == [f"{run}/{c}" for c in stored["checkpoint"]]
    pd.testing.assert_frame_equal(tables.trials.drop(columns="checkpoint"), stored.drop(columns="checkpoint"))
    curves = training_curves(tables.trials)
    assert sorted(curves.groupby("trial_id")["step"].apply(list).to_dict().values()) == [[10, 20], [10, 20]]

    # A copy of the run folder on another machine is the same run: same tables, checkpoints in the copy.
    copy = tmp_path / "copy"
    download("run/", copy)
    local = load_run(str(copy))
    for name in TABLES:
        pd.testing.assert_frame_equal(getattr(local, name), getattr(tables, name))
    assert local.trials["checkpoint"].tolist() == [str(copy / c) for c in stored["checkpoint"]]
    pd.testing.assert_frame_equal(training_curves(local.trials), curves)

    # The credentials are nowhere: not in any object of the bucket (Tune's own files included), the output of
    # the commands, or Ray's logs.
    output()
    assert any("tune" in text for text in printed)
    for secret in s3.values():
        assert not any(secret in text for text in printed)
        leaked = [k for k in objects("") if secret.encode() in get(k)]
        assert not leaked, f"credentials in {leaked}"
        leaked = [str(p) for p in [*session_logs(), *tmp_path.rglob("*")] if p.is_file() and secret in _text(p)]
        assert not leaked, f"credentials in {leaked}"


def _text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


def test_llm_judge_response_cache_on_s3(s3):
    uri = f"s3://{BUCKET}/judge-cache"
    cache = ResponseCache(uri)
    assert cache.get("k1") is None
    cache.put("k1", "model", "answer one")
    assert ResponseCache(uri).get("k1") == "answer one"
    # No temporary object left behind (pyarrow marks the folder with an empty `judge-cache/` object).
    assert [k for k in objects("judge-cache/") if not k.endswith("/")] == ["judge-cache/k1.json"]


def test_a_moved_run_folder_is_scored_and_reported_where_it_is(s3, tmp_path):
    first, moved = tmp_path / "first", tmp_path / "moved"
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(sweep_spec(first, space=SPACE)))  # the cache in the run: first/cache
    assert main(["sweep", str(spec)]) == 0
    stored = pd.read_parquet(first / TRIALS_TABLE)
    assert stored["checkpoint"].str.startswith("tune/").all() and (stored["cache"] == "cache").all()

    first.rename(moved)
    assert main(["score", str(moved), *SCORE]) == 0
    assert main(["report", str(moved)]) == 0
    assert (moved / "report" / "report.md").is_file() and not first.exists()
    tables = load_run(str(moved))
    assert len(tables.coders) == 2 + 1 + 2 and tables.coders["ce_increase"].notna().sum() == 2
    assert all(Path(c).parent.parent == moved / "tune" for c in tables.trials["checkpoint"])
    assert all((Path(c) / "sae.safetensors").is_file() for c in tables.trials["checkpoint"])
    assert (tables.trials["cache"] == str(moved / "cache")).all()
    assert len(training_curves(tables.trials)) == 4
    tasks = plan(str(moved))
    assert {t.cache for t in tasks} == {str(moved / "cache")}

    # A run written before paths were relative (absolute ones) still loads and plans the same.
    old = stored.assign(
        checkpoint=[str(moved / c) for c in stored["checkpoint"]], cache=str(moved / "cache")
    )  # fmt: skip
    old.to_parquet(moved / TRIALS_TABLE, index=False)
    assert plan(str(moved)) == tasks
    pd.testing.assert_frame_equal(load_run(str(moved)).trials, tables.trials)


def test_paths_are_stored_relative_to_the_run_and_resolved_against_it(tmp_path):
    run = str(tmp_path / "run")
    assert relative_to(run, f"{run}/tune/t/checkpoint_000001") == "tune/t/checkpoint_000001"
    assert relative_to(run, f"{run}/cache") == "cache"
    assert relative_to(run, "/elsewhere/cache") == "/elsewhere/cache"
    assert relative_to("s3://b/run", "s3://b/run/cache") == "cache"
    assert relative_to("s3://b/run", "s3://b/shared/cache") == "s3://b/shared/cache"
    assert resolve(run, "tune/t") == f"{run}/tune/t" and resolve(run, "/old/abs/path") == "/old/abs/path"
    assert resolve("s3://b/run/", "tune/t") == "s3://b/run/tune/t"
    assert resolve(run, "s3://b/shared/cache") == "s3://b/shared/cache" and resolve(run, None) is None
