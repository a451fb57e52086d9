"""`bae score` on an existing run redoes exactly what other settings change, and never keeps a failure as a
result: a judge that answered nothing fails the command and writes nothing, and a judge file with failed prompts
is redone on the next run, asking only those prompts again (real local Ray, a real tiny sweep, the `bae`
command in-process, OpenAI-compatible servers on loopback)."""

import json
import re

import pandas as pd
import pytest
from judge_servers import FakeJudgeServer, Reply, Request, chat, free_port, perfect_judge

from ray_jobs.cli import main
from ray_jobs.spec import parse_spec
from ray_jobs.sweep_job import run_sweep

BASE = ["--min-examples", "5", "--test-windows", "10", "--fidelity-tokens", "64", "--ablation-bins", "2"]


def mtimes(folder) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.*")}


def score(run, *extra: str) -> int:
    return main(["score", str(run), *BASE, *extra])


@pytest.fixture(scope="module")
def run(local_ray, tmp_path_factory):
    """A finished one-coder sweep, scored once with the lexical judge."""
    from conftest import sweep_spec

    folder = tmp_path_factory.mktemp("rerun")
    spec = sweep_spec(
        folder / "run",
        space={"activation": ["topk"], "kind": ["sae"]},
        training={"steps": 20, "checkpoint_every": 10},
        scoring={"trial_latents": 0},
    )
    results = run_sweep(parse_spec(spec), quiet=True)
    assert all(r.error is None for r in results)
    assert score(folder / "run") == 0
    return folder / "run"


def test_other_scoring_settings_redo_what_they_change(run, capsys):
    scores, evaluation = mtimes(run / "scores"), mtimes(run / "evaluation")
    capsys.readouterr()
    assert score(run) == 0  # the same settings: nothing is redone
    assert (mtimes(run / "scores"), mtimes(run / "evaluation")) == (scores, evaluation)
    assert "redoing" not in capsys.readouterr().err

    # --fidelity-tokens changes the fidelity and ablation files, not the lexical scores.
    assert main(["score", str(run), *BASE[:4], "--fidelity-tokens", "128", *BASE[6:]]) == 0
    assert mtimes(run / "scores") == scores
    redone = mtimes(run / "evaluation")
    assert all(redone[name] != evaluation[name] for name in evaluation)
    assert "fidelity_tokens=64 (now 128)" in capsys.readouterr().err
    for path in (run / "evaluation").glob("*.json"):
        assert json.loads(path.read_text())["settings"]["fidelity_tokens"] == 128
    assert (pd.read_parquet(run / "coders.parquet")["fidelity_tokens"].dropna() == 4 * 31).all()  # 4 sequences

    # --min-examples changes which latents are scored: the lexical files, and the evaluations that read them.
    assert main(["score", str(run), "--min-examples", "6", *BASE[2:4], "--fidelity-tokens", "128", *BASE[6:]]) == 0
    assert all(mtimes(run / "scores")[name] != scores[name] for name in scores)
    assert all(mtimes(run / "evaluation")[name] != redone[name] for name in redone)
    assert "min_examples=5 (now 6)" in capsys.readouterr().err
    assert pd.read_parquet(run / "latents.parquet")["scoring_settings"].str.contains('"min_examples": 6').all()
    assert score(run) == 0  # back to the fixture's settings for the tests that follow


def test_gpus_from_a_cluster_without_any_are_refused_before_any_work(run, capsys):
    files = mtimes(run / "scores"), mtimes(run / "evaluation")
    capsys.readouterr()
    # Other fidelity tokens: work for the language model, which asks for half a GPU of a cluster that has none.
    assert main(["score", str(run), *BASE[:4], "--fidelity-tokens", "96", *BASE[6:], "--gpus-per-task", "0.5"]) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert line == (
        "bae score: error: scoring.gpus_per_task (--gpus-per-task) is 0.5 for the spliced fidelity and ablation, but "
        "the Ray cluster has no GPU (1 node, 2 CPUs, 0 GPUs), so Ray would wait for them forever; give "
        "--gpus-per-task 0 to run the language model on CPUs, or join a cluster with GPUs (--address)"
    )
    assert (mtimes(run / "scores"), mtimes(run / "evaluation")) == files
    assert score(run, "--gpus-per-task", "0.5") == 0  # nothing for the language model to do: nothing is refused
    assert (mtimes(run / "scores"), mtimes(run / "evaluation")) == files


def judge_args(base_url: str, model: str) -> list[str]:
    return ["--judge", "llm", "--llm-base-url", base_url, "--llm-model", model, "--llm-latents", "2"]


def test_an_unreachable_judge_is_named_before_any_scoring(run, capsys):
    port = free_port()  # nothing listens there
    files = mtimes(run / "scores")
    capsys.readouterr()
    rc = score(run, *judge_args(f"http://judge-user:s3cret@127.0.0.1:{port}/v1", "m1"))
    err = capsys.readouterr().err
    assert rc == 2, err[-3000:]
    assert err.strip().splitlines() == [
        f"bae score: error: --llm-base-url: cannot reach the judge at http://127.0.0.1:{port}/v1 (Connection "
        "refused); check the server and the URL (or BAE_JUDGE_BASE_URL)"
    ]
    assert mtimes(run / "scores") == files and not list((run / "llm").glob("*.parquet"))


def test_a_judge_that_answers_nothing_fails_the_command_and_stores_nothing(run, capsys):
    def broken(request: Request) -> Reply:
        return Reply(status=500, body={"error": {"message": "the model is not loaded"}})

    with FakeJudgeServer(broken) as server:
        url = server.base_url.replace("http://", "http://judge-user:s3cret@")
        capsys.readouterr()
        rc = score(run, *judge_args(url, "m1"), "--llm-retries", "0")
    err = capsys.readouterr().err
    assert rc == 1, err[-3000:]
    (line,) = [line for line in err.splitlines() if line.startswith("bae score: error: ")]
    assert f"the LLM judge at {server.base_url} (model m1) could not be reached: none of " in line
    assert "s3cret" not in err and "judge-user" not in err
    assert not list((run / "llm").glob("*.parquet"))  # no result, so a rerun asks again


def test_failed_prompts_are_asked_again_and_another_model_redoes_the_judge(run, capsys):
    def fuzzing_fails_once(request: Request) -> Reply:
        if request.kind == "fuzzing" and request.repeat == 0:
            return chat("I cannot tell.")  # no list: a failed prompt, not cached
        return perfect_judge(request)

    with FakeJudgeServer(fuzzing_fails_once) as server:
        assert score(run, *judge_args(server.base_url, "m1")) == 0
        first = pd.concat(pd.read_parquet(p) for p in (run / "llm").glob("*.parquet"))
        failed = int(first["llm_failed_prompts"].sum())
        assert failed == server.kinds["fuzzing"] > 0 and first["detection_accuracy"].notna().all()
        assert first["fuzzing_windows"].eq(0).all()  # kept, with what succeeded, but incomplete
        files = mtimes(run / "llm")
        capsys.readouterr()

        # The rerun redoes each incomplete file and asks only the failed prompts: the others are in the cache.
        sent = server.requests
        assert score(run, *judge_args(server.base_url, "m1")) == 0
        assert server.requests - sent == failed
        assert re.search(
            r"redoing llm/\S+\.parquet: \d+ of \d+ judge prompts failed last time", capsys.readouterr().err
        )
        second = pd.concat(pd.read_parquet(p) for p in (run / "llm").glob("*.parquet"))
        assert (second["llm_failed_prompts"] == 0).all() and second["fuzzing_windows"].gt(0).all()
        assert all(mtimes(run / "llm")[name] != files[name] for name in files)

        # Complete now: another run asks nothing and rewrites nothing.
        files, sent = mtimes(run / "llm"), server.requests
        assert score(run, *judge_args(server.base_url, "m1")) == 0
        assert server.requests == sent and mtimes(run / "llm") == files

        # Another judge model is another result.
        assert score(run, *judge_args(server.base_url, "m2")) == 0
        assert server.requests > sent and all(mtimes(run / "llm")[name] != files[name] for name in files)
        assert "llm_model='m1' (now 'm2')" in capsys.readouterr().err
    latents = pd.read_parquet(run / "latents.parquet")
    assert set(latents.loc[latents["llm_prompts"].notna(), "judge_model"]) == {"m2"}
