"""Sparse probing (evaluation.md §7): the probe finds a planted latent and its shuffled control stays at chance;
`bae probe` on the quickstart run writes its tables, resumes, redoes what other settings change, and refuses bad
input in one line (real local Ray, the real embedded model and the real sae-probes tasks)."""

import re
import shutil

import numpy as np
import pandas as pd
import pytest

from analysis.probing import probing_section
from bae_core.evaluation.probing import load_task, probe, select_latents
from ray_jobs.cli import main

TASKS = ["5_hist_fig_ismale", "athlete_sport_football"]  # short prompts; the second by its name without number


def test_a_planted_latent_is_found_and_the_shuffled_control_is_at_chance():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    x = np.abs(rng.normal(size=(400, 64))) * (rng.random((400, 64)) < 0.2)  # sparse, uninformative latents
    x[:, 17] = labels  # a binary latent that fires exactly on the positive class
    x[:, 40] += 0.3 * labels  # a weaker continuous one
    train = rng.random(400) < 2 / 3
    rows = {r["probe_k"]: r for r in probe(x, labels, train, [1, 2], seed=0)}
    assert rows[1]["latents"] == [17] and rows[1]["accuracy"] == 1.0 and rows[1]["auroc"] == 1.0
    assert rows[2]["latents"] == [17, 40]
    assert abs(rows[1]["shuffled_accuracy"] - 0.5) < 0.15
    assert rows[1]["n_train"] == train.sum() and rows[1]["n_test"] == (~train).sum()

    noise = probe(x, rng.permutation(labels), train, [1, 5], seed=0, full=True)  # labels nothing encodes
    assert all(abs(r["accuracy"] - 0.5) < 0.15 for r in noise)
    assert noise[-1]["probe"] == "full" and noise[-1]["probe_k"] == 64


def test_a_large_feature_that_separates_poorly_is_not_chosen_over_a_small_one_that_separates_well():
    # A massive-activation dimension of a residual stream: scale 50, a shift of 10 between the classes (d = 0.2).
    # The informative one: scale 1, a shift of 1 (d = 1). By raw mean difference the first would win.
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 2000)
    x = rng.normal(size=(2000, 8))
    x[:, 3] = rng.normal(size=2000) * 50 + 10 * labels
    x[:, 6] += labels
    raw = np.abs(x[labels == 1].mean(0) - x[labels == 0].mean(0))
    assert raw.argmax() == 3  # what ranking in the features' own units would choose
    assert select_latents(x, labels, 1)[0].tolist() == [6]
    # A binary latent (mean |value| 1 where it fires) keeps its difference of firing rates.
    binary = (rng.random((2000, 4)) < 0.1).astype(float)
    binary[:, 2] = labels
    chosen, differences = select_latents(binary, labels, 1)
    assert chosen.tolist() == [2] and differences[0] == pytest.approx(1.0, abs=1e-5)


def test_a_task_draws_each_distinct_prompt_once_so_none_is_both_trained_and_tested_on():
    task = load_task("154_athlete_sport_football", max_examples=600)  # the wheel repeats some of its prompts
    assert len(set(task.prompts)) == len(task.prompts)
    assert not set(np.array(task.prompts)[task.train]) & set(np.array(task.prompts)[~task.train])


def test_the_report_says_how_to_probe_when_nothing_was_probed():
    assert "`bae probe runs/x`" in "\n".join(probing_section(pd.DataFrame(), None, "runs/x"))


def probe_cmd(run, *extra):
    return main(["probe", str(run), "--tasks", *TASKS, "--max-examples", "60", "--k", "1", "2", *extra])


def test_bae_probe_on_the_quickstart_run(quickstart_run, local_ray, tmp_path, capsys):
    from analysis import load_run, write_report
    from ray_jobs.score_job import write_tables

    run = tmp_path / "run"
    shutil.copytree(quickstart_run[0], run)

    assert probe_cmd(run, "--tasks", "no_such_task") == 2  # a later --tasks replaces the first
    assert probe_cmd(run, "--k", "1", "100000") == 2
    err = capsys.readouterr().err
    assert "task 'no_such_task': unknown" in err and "--k: 100000 is more than the 576 latents" in err
    assert len(err.strip().splitlines()) == 2 and not (run / "probing").exists()
    assert probe_cmd(run, "--gpus-per-task", "0.5") == 2  # this cluster has no GPU: refused before any work
    assert "is 0.5 for the probing activations, but the Ray cluster has no GPU (1 node" in capsys.readouterr().err
    assert not (run / "probing").exists()

    assert probe_cmd(run) == 0
    table = pd.read_parquet(run / "probing.parquet")
    coders = [c for c in table["coder_id"].unique() if c.startswith("trial-")]
    assert len(coders) == 8 and table["task"].nunique() == 2
    assert {"raw-input-layers.9.mlp", "raw-output-layers.9.mlp", "neurons-layers.9.mlp-k16"} <= set(table["coder_id"])
    assert not table["coder_id"].str.contains("control").any()
    sparse = table[table["probe"] == "sparse"]
    assert (sparse["n_train"] == 40).all() and (sparse["n_test"] == 20).all()
    assert sorted(sparse["probe_k"].unique()) == [1, 2]
    assert sparse["latents"].map(len).eq(sparse["probe_k"]).all()
    assert table["accuracy"].between(0, 1).all()
    raw = table[(table["activation"] == "raw_input") & (table["probe"] == "full")]
    assert len(raw) == 2 and (raw["probe_k"] == 576).all()
    summary = pd.read_parquet(run / "coders.parquet").set_index("coder_id")
    assert summary.loc[coders, "probe_tasks"].eq(2).all() and summary.loc[coders, "probe_accuracy_k1"].notna().all()

    results = {p: p.stat().st_mtime_ns for p in (run / "probing").rglob("*.*")}
    capsys.readouterr()
    assert probe_cmd(run) == 0  # the same settings: nothing to do
    assert {p: p.stat().st_mtime_ns for p in (run / "probing").rglob("*.*")} == results
    assert not re.search(r"\[\d+/\d+\]", capsys.readouterr().err)

    assert probe_cmd(run, "--max-examples", "50") == 0  # new activations, so every result is redone
    err = capsys.readouterr().err
    assert "max_examples=60 (now 50)" in err and "[2/15]" in err
    assert (pd.read_parquet(run / "probing.parquet")["n_train"] < 40).all()

    write_tables(str(run))  # `bae score` rewriting coders.parquet keeps the probing columns
    assert pd.read_parquet(run / "coders.parquet")["probe_accuracy_k2"].notna().sum() >= 10
    assert not load_run(str(run)).probing.empty
    report = write_report(str(run)).read_text()
    section = report[report.index("## Sparse probing") :]
    assert "| binary SAE | 2 | 2 |" in section and "- accuracy, k = 1: binary - continuous" in section
    assert "- auroc, k = 2: binary - continuous" in section and "binary ahead on" in section
    assert (run / "report" / "probing.png").stat().st_size > 0
