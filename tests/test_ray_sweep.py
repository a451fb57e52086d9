"""`bae sweep` in-process on a local Ray: grid and Optuna sweeps of real coders on the embedded model's cache."""

import contextlib
import json
import os
import threading
import time

import numpy as np
import pandas as pd
import psutil
import pytest
import torch
from judge_servers import FakeJudgeServer, Reply, Request, chat
from resume_checks import reported_steps, resumed_from

from analysis import training_curves
from bae_core.data.lm import load_model
from bae_core.data.reader import iter_activation_batches
from bae_core.evaluation.interp import CONTROL_LATENTS, ExampleOptions, coder_latent_scores, lexical_summary
from bae_core.evaluation.judge import JudgeConfig
from bae_core.training import TrainConfig, Trainer
from ray_jobs.cache_job import run_cache
from ray_jobs.cli import main
from ray_jobs.score_job import run_score, summarize
from ray_jobs.score_plan import ABLATION_TABLE, CODERS_TABLE, DENSITY_TABLE, LATENTS_TABLE, ScoreOptions
from ray_jobs.spec import SpecError, parse_spec
from ray_jobs.sweep_job import run_sweep
from ray_jobs.trials import TRIALS_TABLE

CONFIG_COLUMNS = ["trial_id", "status", "hookpoint", "activation", "kind", "k", "expansion_factor", "optimizer", "seed"]
METRIC_COLUMNS = ["fvu", "l0", "dead_fraction", "frequent_fraction", "dense_fraction", "train_fvu", "train_seconds"]
PROVENANCE_COLUMNS = [
    "num_latents",
    "d_in",
    "d_out",
    "steps",
    "tokens",
    "checkpoint",
    "failures",
    "error",
    "model",
    "cache",
]


@pytest.fixture(scope="module")
def cache_root(local_ray, tmp_path_factory):
    from conftest import sweep_spec

    root = tmp_path_factory.mktemp("cache")
    run_cache(parse_spec(sweep_spec("unused", root)).cache_request())
    return root


def checkpoint_mtimes(folder) -> dict[str, int]:
    return {
        os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
        for d, _, files in os.walk(folder)
        for f in files
        if "checkpoint_" in d
    }


def mtimes_of(folder) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


@pytest.fixture(scope="module")
def grid_run(local_ray, cache_root, tmp_path_factory):
    """The tiny grid of 4 coders (topk and binary_topk, SAE and skip transcoder), one per Tune trial: (spec, run
    folder, Tune's results)."""
    from conftest import sweep_spec

    run = tmp_path_factory.mktemp("grid") / "run"
    spec = parse_spec(sweep_spec(run, cache_root))
    return spec, run, run_sweep(spec, quiet=True)


def test_grid_sweep_trains_every_combination_and_writes_the_trials_table(
    local_ray, cache_root, grid_run, tmp_path, make_spec, capsys
):
    spec, run_dir, results = grid_run
    assert len(results) == 4 and all(r.error is None for r in results)

    trials = pd.read_parquet(run_dir / TRIALS_TABLE)
    assert set(CONFIG_COLUMNS + METRIC_COLUMNS + PROVENANCE_COLUMNS) <= set(trials.columns)
    assert len(trials) == 4 and (trials["status"] == "finished").all()
    assert set(zip(trials["activation"], trials["kind"], strict=True)) == {
        (a, kind) for a in ("topk", "binary_topk") for kind in ("sae", "skip_transcoder")
    }
    assert (trials["num_latents"] == 2 * 576).all() and (trials["steps"] == 20).all()
    assert (trials["tokens"] == 20 * 128).all() and (trials["eval_tokens"] == 512).all()
    # Twenty steps already beat predicting the mean (FVU 1); binary codes never fire more than k latents.
    assert ((trials["fvu"] > 0) & (trials["fvu"] < 1)).all()
    assert (trials["l0"] <= 8 + 1e-6).all() and (trials.loc[trials["activation"] == "topk", "l0"] == 8).all()
    assert trials["dead_fraction"].between(0, 1).all() and trials["error"].isna().all()
    assert (trials["failures"] == 0).all()
    assert (trials["model"] == "embedded:SmolLM2-135M-Instruct").all()
    # Each trial's training log, every 10 steps, came with its final checkpoint.
    curves = training_curves(trials, str(run_dir))
    assert curves.groupby("trial_id")["step"].apply(list).to_dict() == {t: [10, 20] for t in trials["trial_id"]}
    assert (curves["tokens"] == curves["step"] * 128).all() and (curves["interval_steps"] == 10).all()
    assert curves["fvu"].between(0, 2).all() and curves["l0"].between(0, 8 + 1e-6).all()

    # Each row's checkpoint is the trained coder: it reproduces the held-out FVU the row reports.
    row = trials[(trials["activation"] == "binary_topk") & (trials["kind"] == "sae")].iloc[0]
    trainer = Trainer.load_checkpoint(run_dir / row["checkpoint"])
    assert trainer.step_count == 20 and trainer.coder.cfg.activation == "binary_topk"
    trainer.eval_mode()
    x = next(
        iter_activation_batches(str(cache_root), "layers.3.mlp", split="heldout", batch_size=512, shuffle_seed=None)
    )
    with torch.no_grad():
        code = trainer.coder.encode(x)
        y_hat = trainer.coder.decode(code, x).double()
    z = code.to_dense(trainer.coder.num_latents)
    x = x.double()
    fvu = float(((y_hat - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    assert set(z.unique().tolist()) <= {0.0, 1.0}
    assert fvu == pytest.approx(row["fvu"], rel=1e-3)

    # Running the finished sweep again trains nothing: the same table, the checkpoints untouched.
    before = checkpoint_mtimes(run_dir / "tune")
    again = run_sweep(spec, quiet=True)
    assert len(again) == 4 and all(r.error is None for r in again)
    assert checkpoint_mtimes(run_dir / "tune") == before
    pd.testing.assert_frame_equal(pd.read_parquet(run_dir / TRIALS_TABLE), trials)

    # `bae score` scores each trial's coder and the MLP-neuron baseline into latents.parquet; again, nothing new.
    # Slices of 500 latents: each coder's 1152 latents are scored by 3 Ray tasks.
    latents = run_score(str(run_dir), min_examples=5, fidelity_tokens=128, ablation_bins=2, latents_per_task=500)
    controls = {"token-control-layers.3.mlp", "random-control-layers.3.mlp"}
    assert len(latents) == 4 * 1152 + 1536 + 2 * CONTROL_LATENTS
    assert (
        set(latents["coder_id"]) == {f"trial-{t}" for t in trials["trial_id"]} | {"neurons-layers.3.mlp-k8"} | controls
    )
    assert {"latent", "firing_count", "firing_rate", "eligible", "explanation", "token_auroc", "window_auroc"} <= set(
        latents.columns
    )
    written = pd.read_parquet(run_dir / LATENTS_TABLE)
    columns = ["coder_id", "latent", "firing_count", "eligible", "token_auroc"]
    pd.testing.assert_frame_equal(written[columns], latents[columns], check_dtype=False)
    # The baseline keeps exactly k neurons per token; TopK codes fire exactly k latents per token.
    for coder_id in [
        "neurons-layers.3.mlp-k8",
        *(f"trial-{t}" for t in trials.loc[trials["activation"] == "topk", "trial_id"]),
    ]:
        assert latents.loc[latents["coder_id"] == coder_id, "firing_count"].sum() == 8 * 2048
    # Slicing changes nothing: one coder's rows equal those of the in-process scorer on all its latents at once.
    row = trials.iloc[0]
    whole = pd.DataFrame(
        coder_latent_scores(
            Trainer.load_checkpoint(run_dir / row["checkpoint"]).coder,
            str(cache_root),
            "layers.3.mlp",
            ExampleOptions(min_examples=5),
            decode=load_model().tokenizer.decode,
        )
    )
    sliced = latents[latents["coder_id"] == f"trial-{row['trial_id']}"].reset_index(drop=True)
    pd.testing.assert_frame_equal(sliced[whole.columns], whole, check_dtype=False)
    assert not (run_dir / "scores" / f"trial-{row['trial_id']}").exists()  # slice files merged
    coders = pd.read_parquet(run_dir / CODERS_TABLE)
    assert len(coders) == 7 and (coders["alive"] <= coders["latents"]).all() and (coders["eligible"] > 0).all()
    # Every score with its basis; the controls at their known answers.
    assert (coders["token_auroc_ci_low"] <= coders["token_auroc"]).all()
    assert (coders["token_auroc"] <= coders["token_auroc_ci_high"]).all()
    assert (coders["token_auroc_ci_high"] - coders["token_auroc_ci_low"] > 0.005).sum() >= 5  # all but the controls
    assert (coders["test_windows_median"] >= 1).all() and coders["underpowered"].dtype == bool
    by_dictionary = coders.set_index("dictionary")
    assert by_dictionary.loc["token_control", "token_auroc"] > 0.95
    assert abs(by_dictionary.loc["random_control", "token_auroc"] - 0.5) < 0.1
    pd.testing.assert_frame_equal(
        coders[["coder_id", "eligible", "token_auroc"]], summarize(latents)[["coder_id", "eligible", "token_auroc"]]
    )
    trained = coders[coders["trial_id"].notna()].set_index("trial_id").loc[trials["trial_id"]]
    assert (trained["activation"].to_numpy() == trials["activation"].to_numpy()).all()
    # Fidelity on 4 held-out sequences of 32 tokens: every spliced coder is worse than clean, better than nothing
    # only if it learned something; the numbers hang together.
    assert (trained["fidelity_tokens"] == 4 * 31).all()
    assert (trained["ce_zero_ablated"] > trained["ce_clean"]).all() and (trained["kl"] > 0).all()
    np.testing.assert_allclose(trained["ce_increase"], trained["ce_spliced"] - trained["ce_clean"])
    recovered = (trained["ce_zero_ablated"] - trained["ce_spliced"]) / (
        trained["ce_zero_ablated"] - trained["ce_clean"]
    )
    np.testing.assert_allclose(trained["loss_recovered"], recovered)
    baseline = coders[coders["trial_id"].isna()]
    assert baseline["ce_increase"].isna().all()  # no coder to splice
    topk = trained[trained["activation"] == "topk"]
    assert np.allclose(topk["l0_heldout"], 8)  # TopK fires exactly k latents per token
    ablation = pd.read_parquet(run_dir / ABLATION_TABLE)
    assert set(ablation["coder_id"]) == {f"trial-{t}" for t in trials["trial_id"]}
    assert ablation.groupby("coder_id")["bin"].max().max() <= 1
    density = pd.read_parquet(run_dir / DENSITY_TABLE)
    assert (density.groupby("coder_id")["latents"].sum().loc[coders["coder_id"]].to_numpy() == coders["latents"]).all()

    # The LLM judge path (--judge llm) against an OpenAI-compatible server on loopback that answers "yes" to
    # every window: on balanced test windows that is balanced accuracy 0.5 exactly, with no failed prompt.
    def always_yes(request: Request) -> Reply:
        return chat("[EXPLANATION]: a test") if request.kind == "explain" else chat(str([1] * len(request.examples)))

    run = str(run_dir)
    with FakeJudgeServer(always_yes) as server:
        config = JudgeConfig(base_url=server.base_url, model="fake", cache_dir=str(tmp_path / "llm-cache"))
        options = ScoreOptions.from_run(
            run, min_examples=5, fidelity_tokens=128, ablation_bins=2, judge="llm", llm=config, llm_latents=3
        )
        judged = run_score(run, options)
        assert server.kinds["explain"] == 7 * 3 and server.kinds["detection"] == server.kinds["fuzzing"] > 0
        requests = server.requests
        run_score(run, options)  # everything is on disk: no request
        assert server.requests == requests
    judged = judged[judged["llm_prompts"].notna()]
    assert judged.groupby("coder_id").size().tolist() == [3] * 7 and judged["eligible"].all()
    assert (judged["detection_balanced_accuracy"] == 0.5).all() and (judged["fuzzing_balanced_accuracy"] == 0.5).all()
    assert (judged["llm_failed_prompts"] == 0).all() and (judged["judge_model"] == "fake").all()
    assert (judged["llm_explanation"] == "a test").all() and judged["prompt_version"].notna().all()
    coders = pd.read_parquet(run_dir / CODERS_TABLE)
    assert (coders["detection_balanced_accuracy"] == 0.5).all() and (coders["llm_failed_fraction"] == 0).all()
    # Without a judge server configured, `bae score --judge llm` says what is missing before anything runs.
    os.environ.pop("BAE_JUDGE_BASE_URL", None)
    assert main(["score", run, "--judge", "llm", "--llm-model", "m"]) == 2
    assert "BAE_JUDGE_BASE_URL" in capsys.readouterr().err

    scored = {d: mtimes_of(run_dir / d) for d in ("scores", "evaluation")}
    run_score(str(run_dir), min_examples=5, fidelity_tokens=128, ablation_bins=2)
    assert {d: mtimes_of(run_dir / d) for d in ("scores", "evaluation")} == scored

    # Other scoring settings redo what they change, and say why; so does a file from before settings were recorded.
    old_file = run_dir / "scores" / "neurons-layers.3.mlp-k8.parquet"
    pd.read_parquet(old_file).drop(columns="scoring_settings").to_parquet(old_file)
    notices = []
    redone = run_score(
        run, min_examples=5, test_windows=20, fidelity_tokens=128, ablation_bins=2, notice=notices.append
    )
    after = {d: mtimes_of(run_dir / d) for d in ("scores", "evaluation")}
    for d in ("scores", "evaluation"):
        assert all(after[d][name] != scored[d][name] for name in scored[d] if name.endswith((".parquet", ".json")))
    assert any("test_windows=50 (now 20)" in n for n in notices)
    assert any("neurons-layers.3.mlp-k8.parquet: written before scoring settings" in n for n in notices)
    assert redone["scoring_settings"].str.contains('"test_windows": 20').all()

    # ... and the same folder refuses a sweep with other settings, naming the first difference.
    other = parse_spec(make_spec(run_dir, cache_root, coder={"expansion_factor": 2, "k": 4}))
    with pytest.raises(SpecError, match=r"holds a sweep with coder\.k=8, this spec has 4"):
        run_sweep(other, quiet=True)


def test_coders_that_share_a_stream_train_in_one_trial_exactly_as_they_would_alone(
    local_ray, cache_root, grid_run, tmp_path, make_spec
):
    # The same 4 points, three to a Tune trial: one group of 3 (two SAEs and a skip transcoder read input and
    # output once for all three) and one of 1.
    spec = parse_spec(make_spec(tmp_path / "run", cache_root, resources={"cpus_per_worker": 1, "coders_per_trial": 3}))
    assert [len(g) for g in spec.trial_groups()] == [3, 1] and spec.num_tune_trials() == 2
    results = run_sweep(spec, quiet=True)
    assert len(results) == 2 and all(r.error is None for r in results)
    grouped = pd.read_parquet(tmp_path / "run" / TRIALS_TABLE)
    assert len(grouped) == 4 and (grouped["status"] == "finished").all() and grouped["trial_id"].is_unique
    assert sorted(grouped["coders_in_trial"]) == [1, 3, 3, 3] and grouped["tune_trial"].nunique() == 2

    _, alone_run, _ = grid_run
    alone = pd.read_parquet(alone_run / TRIALS_TABLE)
    key = ["activation", "kind"]
    pairs = grouped.merge(alone, on=key, suffixes=("", "_alone"))
    assert len(pairs) == 4
    # Every coder saw the batches it saw alone: the same held-out and train metrics, the same weights.
    for metric in ("fvu", "l0", "dead_fraction", "dense_fraction", "train_fvu", "lexical_auroc", "tokens"):
        np.testing.assert_allclose(pairs[metric], pairs[f"{metric}_alone"], rtol=1e-5, err_msg=metric)
    curves = training_curves(grouped, str(tmp_path / "run")).merge(grouped[["trial_id", *key]], on="trial_id")
    curves_alone = training_curves(alone, str(alone_run)).merge(alone[["trial_id", *key]], on="trial_id")
    both = curves.merge(curves_alone, on=[*key, "step"], suffixes=("", "_alone"))
    assert len(both) == 8  # steps 10 and 20 of each coder
    np.testing.assert_allclose(both["fvu"], both["fvu_alone"], rtol=1e-5)
    for row in pairs.itertuples():
        assert row.checkpoint.endswith(f"/coder_{row.trial_id.rsplit('_c', 1)[1]}")
        mine = Trainer.load_checkpoint(tmp_path / "run" / row.checkpoint).coder.state_dict()
        theirs = Trainer.load_checkpoint(alone_run / row.checkpoint_alone).coder.state_dict()
        for name, value in mine.items():
            torch.testing.assert_close(value, theirs[name], rtol=1e-5, atol=1e-6, msg=f"{row.activation} {name}")

    # A finished grouped sweep run again trains nothing; a changed grouping is another sweep.
    before = checkpoint_mtimes(tmp_path / "run" / "tune")
    assert all(r.error is None for r in run_sweep(spec, quiet=True))
    assert checkpoint_mtimes(tmp_path / "run" / "tune") == before
    other = parse_spec(make_spec(tmp_path / "run", cache_root, resources={"coders_per_trial": 2}))
    with pytest.raises(SpecError, match=r"resources\.coders_per_trial=3, this spec has 2"):
        run_sweep(other, quiet=True)


def test_optuna_multi_objective_sweep_samples_the_space(local_ray, cache_root, tmp_path, make_spec):
    spec = parse_spec(
        make_spec(
            tmp_path / "run",
            cache_root,
            coder={"expansion_factor": 2},
            space={"activation": ["topk", "binary_topk"], "k": {"logint": [4, 16]}},
            search={
                "algorithm": "optuna",
                "num_samples": 3,
                "objectives": {"fvu": "min", "lexical_auroc": "max"},
                "max_concurrent": 2,
                "seed": 1,
            },
        )
    )
    results = run_sweep(spec, quiet=True)
    assert len(results) == 3 and all(r.error is None for r in results)
    trials = pd.read_parquet(tmp_path / "run" / TRIALS_TABLE)
    assert len(trials) == 3 and (trials["status"] == "finished").all()
    assert trials["k"].between(4, 16).all() and set(trials["activation"]) <= {"topk", "binary_topk"}
    assert trials[["fvu", "dead_fraction"]].notna().all().all()
    # Each trial trained with the k it was given: TopK codes have exactly k active latents.
    topk = trials[trials["activation"] == "topk"]
    assert (topk["l0"] == topk["k"]).all()
    # The interpretability objective is real: each trial's lexical score, on 256 latents drawn among those that
    # fire, is what the lexical scorer gives its checkpoint.
    assert trials["lexical_auroc"].between(0.5, 1).all() and (trials["lexical_latents"] <= 256).all()
    assert trials["lexical_coverage"].between(0, 1).all() and trials["lexical_auroc_weighted"].notna().all()
    row = trials.iloc[0]
    coder = Trainer.load_checkpoint(tmp_path / "run" / row["checkpoint"]).coder
    again = lexical_summary(coder, str(cache_root), "layers.3.mlp", ExampleOptions(), max_latents=256)
    assert again["lexical_auroc"] == pytest.approx(row["lexical_auroc"])
    assert again["lexical_latents"] == row["lexical_latents"]


def test_a_multi_worker_trial_trains_with_a_data_parallel_torch_trainer(local_ray, cache_root, tmp_path, make_spec):
    # Half a CPU per worker: two workers and the trial's own process fit on 2 CPUs, with room for Ray Data.
    spec = parse_spec(
        make_spec(
            tmp_path / "run",
            cache_root,
            space={"activation": ["binary_topk"], "kind": ["skip_transcoder"]},
            resources={"workers": 2, "cpus_per_worker": 0.5},
        )
    )
    results = run_sweep(spec, quiet=True)
    assert len(results) == 1 and results[0].error is None
    trials = pd.read_parquet(tmp_path / "run" / TRIALS_TABLE)
    row = trials.iloc[0]
    assert row["status"] == "finished" and row["steps"] == 20 and 0 < row["fvu"] < 1
    # Each of the two workers read its own half of every 128-token step.
    assert row["tokens"] == 20 * 128
    # The TorchTrainer's checkpoints live in the run folder, under the trial's name.
    assert list((tmp_path / "run" / "train").glob(f"trial-{row['trial_id']}/checkpoint_*"))
    trainer = Trainer.load_checkpoint(tmp_path / "run" / row["checkpoint"])
    assert trainer.coder.cfg.kind == "skip_transcoder" and trainer.step_count == 20
    # Rank 0 kept the training log, with the FVU and L0 averaged over both workers' batches.
    curves = training_curves(trials, str(tmp_path / "run"))
    assert curves["step"].tolist() == [10, 20] and curves["tokens"].tolist() == [1280, 2560]
    assert (curves["interval_steps"] == 10).all() and curves["fvu"].between(0, 2).all()


def trial_processes() -> list[psutil.Process]:
    """The Tune trial processes of this test's Ray (Ray's workers are descendants of the process that started it)."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "ImplicitFunc" in " ".join(p.cmdline()):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def test_a_trial_killed_mid_training_resumes_its_training_log_without_repeating_a_step(
    local_ray, cache_root, tmp_path, make_spec
):
    run = tmp_path / "run"
    # Both coders in one trial (they read the same stream), so the process killed is the one running the trial
    # that has checkpointed, and both resume from the group's checkpoint. A row every
    # 7 steps: no checkpoint (every 50 steps) falls on a row, so a trial resumed from one has a shorter interval.
    spec = parse_spec(
        make_spec(
            run,
            cache_root,
            space={"activation": ["topk", "binary_topk"]},
            search={"algorithm": "grid", "max_concurrent": 1},
            training={"steps": 300, "checkpoint_every": 50, "log_every": 7},
            scoring={"trial_latents": 0},
            resources={"cpus_per_worker": 1, "max_failures": 2, "coders_per_trial": 2},
        )
    )
    killed: list[int] = []

    def reported_step(result_json) -> int:
        steps = [0]
        for line in result_json.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # the line Tune is writing
                steps.append(json.loads(line).get("steps", 0))
        return max(steps)

    def kill_the_trial_after_its_second_checkpoint():
        # Tune resumes from the checkpoints it has registered: wait until the driver has logged the second one.
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if any(reported_step(path) >= 100 for path in (run / "tune").glob("*/result.json")):
                for p in trial_processes():
                    killed.append(p.pid)
                    p.kill()
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_the_trial_after_its_second_checkpoint, daemon=True)
    killer.start()
    results = run_sweep(spec, quiet=True)
    killer.join(timeout=5)

    assert killed, "no trial process was found to kill"
    trials = pd.read_parquet(run / TRIALS_TABLE).set_index("trial_id")
    assert len(results) == 1 and (trials["status"] == "finished").all() and (trials["steps"] == 300).all()
    assert trials["failures"].tolist() == [1, 1]  # the trial was killed, and retried from a checkpoint
    assert trials["tune_trial"].nunique() == 1 and (trials["coders_in_trial"] == 2).all()
    # ... from its checkpoint of step 100 or later: after the kill no report came at or before that step (one
    # restarted from step 0 would report step 50 again).
    (trial_dir,) = (run / "tune").glob(f"*{trials['tune_trial'].iloc[0]}*")
    steps = reported_steps(trial_dir)
    assert steps.count(50) == 1 and min(resumed_from(trial_dir, 50), default=100) >= 50, steps
    curves = training_curves(trials.reset_index(), str(run))
    assert set(curves["trial_id"]) == set(trials.index)
    for trial_id, g in curves.groupby("trial_id"):
        # Every logged step once, in order: the killed attempt's rows after its checkpoint are not there twice.
        assert g["step"].tolist() == [*range(7, 300, 7), 300], trial_id
        assert (g["tokens"] == g["step"] * 128).all() and g["seconds"].is_monotonic_increasing
        assert g["interval_steps"].between(1, 7).all()
        intervals = g["interval_steps"].sum()
        if trials.loc[trial_id, "failures"]:
            # Resumed from a checkpoint (at step 100, 150, 200 or 250), not from the start: the steps between its
            # last row and that checkpoint are in no row.
            assert 300 - 6 <= intervals < 300
        else:
            assert intervals == 300


def test_lexical_scores_of_a_coder_and_of_the_mlp_neurons_on_the_real_cache(local_ray, tmp_path, make_spec):
    from bae_core.coders.config import CoderConfig
    from bae_core.data.lm import load_model
    from bae_core.evaluation.interp import ExampleOptions, coder_latent_scores, neuron_baseline_scores
    from bae_core.evaluation.metrics import evaluate_coder
    from bae_core.training import build_coder

    root = tmp_path / "cache"
    run_cache(parse_spec(make_spec("unused", root, cache={"heldout_tokens": 4096})).cache_request())
    coder = build_coder(CoderConfig(activation="topk", k=8, expansion_factor=2), 576, seed=0)
    trainer = Trainer(coder, TrainConfig(log_every=0))
    trainer.step(next(iter_activation_batches(str(root), "layers.3.mlp", batch_size=512)))  # data-dependent init
    rows = coder_latent_scores(coder, str(root), "layers.3.mlp", ExampleOptions(min_examples=5))
    frame = pd.DataFrame(rows)
    assert len(frame) == 1152 and frame["latent"].tolist() == list(range(1152))
    # The same firing counts as the held-out evaluation, which reads the cache by another path.
    held_out = iter_activation_batches(str(root), "layers.3.mlp", split="heldout", shuffle_seed=None)
    evaluation = evaluate_coder(coder, held_out)
    assert evaluation.tokens == 4096 and frame["firing_count"].sum() == 8 * 4096
    np.testing.assert_allclose(frame["firing_rate"], evaluation.firing_rates, atol=1e-12)
    eligible = frame[frame["eligible"]]
    assert len(eligible) > 10 and eligible["token_auroc"].between(0, 1).all()
    assert frame.loc[~frame["eligible"], "token_auroc"].isna().all()

    loaded = load_model()
    neurons = pd.DataFrame(neuron_baseline_scores(loaded, str(root), "layers.3.mlp", 8, ExampleOptions(min_examples=5)))
    assert len(neurons) == loaded.d_mlp and neurons["firing_count"].sum() == 8 * 4096
    assert neurons["eligible"].any()
