"""The `bae` command with bad input of every kind: one line that names the input and the fix, exit code 2, and
nothing heavy loaded first; --debug for the traceback; Ctrl+C exits 130 with the command that resumes; a clean
console; every default in --help."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import a_trial_finished

import bae_core.data.lm
from ray_jobs.cli import build_parser, main
from ray_jobs.trials import TRIALS_TABLE

BIN = Path(sys.executable).parent


def env(**extra) -> dict[str, str]:
    e = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled"}
    e.setdefault("RAY_ADDRESS", "local")
    e.update(extra)
    return e


def error_line(capsys, command: str) -> str:
    """The command's one error line (and that it is the only thing on stderr), without its prefix."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, "\n".join(err)
    assert err[0].startswith(f"bae {command}: error: "), err[0]
    return err[0].removeprefix(f"bae {command}: error: ")


@pytest.fixture
def nothing_heavy(monkeypatch):
    """Bad input is found before the language model or Ray is started."""

    def refuse(*args, **kwargs):
        raise AssertionError("the language model was loaded before the inputs were checked")

    monkeypatch.setattr(bae_core.data.lm, "load_model", refuse)
    import ray

    yield
    assert not ray.is_initialized(), "Ray was started before the inputs were checked"


def test_bad_cache_inputs_give_one_line_and_exit_2(tmp_path, capsys, nothing_heavy):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    no_text = tmp_path / "rows.jsonl"
    no_text.write_text(json.dumps({"body": "some words"}) + "\n")
    cases = [
        (["cache", str(a_file)], f"root: {a_file} is a file, not a folder"),
        (["cache", str(a_file / "sub")], f"root: {a_file / 'sub'} cannot be created ({a_file} is not a folder)"),
        (["cache", str(tmp_path / "c"), "--dataset", str(tmp_path / "missing.jsonl")], "dataset: no such file"),
        (["cache", str(tmp_path / "c"), "--dataset", str(empty)], f"dataset: {str(empty)!r} is empty"),
        (["cache", str(tmp_path / "c"), "--dataset", str(no_text)], "text_column: 'text' is not a column"),
        (["cache", str(tmp_path / "c"), "--model", str(tmp_path)], "a local model folder needs a config.json"),
        (["cache", str(tmp_path / "c"), "--train-tokens", "100"], "train_tokens: 100 tokens is less than one sequence"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        assert expected in error_line(capsys, "cache"), argv


def test_a_hub_model_without_a_network_is_named_at_once(tmp_path):
    # HF_HUB_OFFLINE stands for a machine without a network: the check must not wait for download retries.
    start = time.monotonic()
    done = subprocess.run(
        ["bae", "cache", str(tmp_path / "c"), "--model", "someone/not-a-cached-model"],
        env=env(HF_HUB_OFFLINE="1"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines == [
        "bae cache: error: model 'someone/not-a-cached-model': not in the local Hugging Face cache, and "
        "HF_HUB_OFFLINE is set. Without a network, use the embedded default 'embedded:SmolLM2-135M-Instruct', "
        "or a local folder"
    ], done.stderr
    assert time.monotonic() - start < 60


def test_bad_sweep_score_and_report_inputs(tmp_path, make_spec, capsys, nothing_heavy):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    small = tmp_path / "small.yaml"
    small.write_text(yaml.safe_dump(make_spec(tmp_path / "run", cache={"train_tokens": 16})))
    # Spec values are checked by the dry run too.
    assert main(["sweep", str(small), "--dry-run"]) == 2
    assert "train_tokens: 16 tokens is less than one sequence (seq_len=32)" in error_line(capsys, "sweep")
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(make_spec(tmp_path / "run")))
    assert main(["sweep", str(good), "--output", str(a_file / "run")]) == 2
    assert error_line(capsys, "sweep") == f"output: {a_file / 'run'} cannot be created ({a_file} is not a folder)"
    assert main(["sweep", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in error_line(capsys, "sweep")
    assert main(["score", str(tmp_path / "nowhere")]) == 2
    assert error_line(capsys, "score") == (
        f"run: no such folder {str(tmp_path / 'nowhere')!r}; give a run folder written by `bae sweep`"
    )
    (tmp_path / "empty_run").mkdir()
    assert main(["report", str(tmp_path / "empty_run")]) == 2
    assert "has no trials.parquet; run `bae sweep` into this folder first" in error_line(capsys, "report")


def test_debug_shows_the_traceback(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    plain = subprocess.run(["bae", "cache", str(a_file)], env=env(), capture_output=True, text=True, timeout=120)
    debug = subprocess.run(
        ["bae", "cache", str(a_file), "--debug"], env=env(), capture_output=True, text=True, timeout=120
    )
    assert plain.returncode == 2 and "Traceback" not in plain.stderr and len(plain.stderr.strip().splitlines()) == 1
    assert debug.returncode != 0 and "Traceback (most recent call last)" in debug.stderr
    assert "is a file, not a folder" in debug.stderr.strip().splitlines()[-1]


def test_every_option_has_help_and_shows_its_default():
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name, command in commands.items():
        text = command.format_help()
        for action in command._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert action.help, f"bae {name} {action.option_strings[0]}: no help"
            shown = " ".join(text.split())
            if action.default is not None and action.default is not False and action.default != "==SUPPRESS==":
                assert "default" in " ".join(command._get_formatter()._get_help_string(action).split()), (
                    f"bae {name} {action.option_strings[0]}: its default {action.default!r} is not shown"
                )
            assert action.option_strings[0] in shown


def test_score_help_after_a_run_shows_the_values_that_run_will_use(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "spec.json").write_text(json.dumps({"scoring": {"fidelity_tokens": 1234, "ablation_bins": 3}}))
    generic = subprocess.run(["bae", "score", "--help"], env=env(), capture_output=True, text=True, timeout=60)
    specific = subprocess.run(
        ["bae", "score", "run", "--help"], env=env(), capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert generic.returncode == 0 and specific.returncode == 0
    flat = " ".join(generic.stdout.split())
    assert "(default: the run's spec, scoring.fidelity_tokens; if it has none, 16384)" in flat
    flat = " ".join(specific.stdout.split())
    assert "(for run: 1234)" in flat and "(for run: 3)" in flat and "(for run: 50)" in flat


def test_ctrl_c_exits_130_with_the_resume_command_and_the_console_is_clean(tmp_path, make_spec):
    run = tmp_path / "run"
    spec = tmp_path / "s.yaml"
    spec.write_text(
        yaml.safe_dump(make_spec(run, search={"algorithm": "grid", "max_concurrent": 1}, training={"steps": 60}))
    )

    cmd = ["bae", "sweep", str(spec)]
    first = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not a_trial_finished(run):
        assert first.poll() is None, first.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no trial finished within 300 s"
        time.sleep(0.05)
    first.send_signal(signal.SIGINT)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 130, err[-3000:]
    finished = int((pd.read_parquet(run / TRIALS_TABLE)["status"] == "finished").sum())
    assert 1 <= finished < 4
    assert f"sweep tiny: {finished} trials finished, 0 failed, {4 - finished} left of 4 when it stopped" in err
    assert err.strip().splitlines()[-1] == (
        f"bae sweep: interrupted; finished work is kept. Resume with: bae sweep {spec}"
    )
    assert "Tuner.restore" not in out + err

    again = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "sweep tiny: 4 trials finished, 0 failed, 0 left of 4" in again.stdout
    console = again.stdout + again.stderr + out + err
    for noise in (
        "Configuration for experiment",
        "tensorboard",
        "TensorBoard",
        "Loading weights",
        "constructor arguments",
    ):
        assert noise not in console, f"{noise!r} in the console:\n{console[-3000:]}"
    assert "\r" not in console  # not a terminal: whole lines only


def test_errors_raised_inside_ray_are_shown_as_raised():
    from ray.data.exceptions import UserCodeException

    from ray_jobs.cli.errors import EXIT_BAD_INPUT, exit_code, one_line, remote_cause

    try:
        try:
            raise ValueError("dataset: row 3 has no text")
        except ValueError as inner:
            raise UserCodeException("UDF failed to process a data block.") from inner
    except UserCodeException as wrapped:
        err = remote_cause(wrapped)
    assert one_line(err) == "dataset: row 3 has no text" and exit_code(err) == EXIT_BAD_INPUT
    plain = RuntimeError("disk full")
    assert remote_cause(plain) is plain and one_line(plain) == "disk full (RuntimeError)"
