"""The training log a trial keeps (ray_jobs.train_job.TrainingLog) on tiny tensors, without Ray: its rows are the
exact interval means of the steps' metrics, it survives a checkpoint and resumes without repeating a step, and
`training.log_every` is validated in the spec."""

import pandas as pd
import pytest
import torch

from analysis.run import training_curves
from bae_core import CoderConfig, TrainConfig, Trainer, build_coder
from ray_jobs.spec import SpecError, parse_spec
from ray_jobs.train_job import TRAINING_LOG, TrainingLog


def fresh() -> Trainer:
    coder = build_coder(CoderConfig(activation="binary_topk", k=4, num_latents=32), 8, seed=3)
    return Trainer(coder, TrainConfig(log_every=0))


def test_rows_average_the_steps_since_the_row_before_and_the_last_step_has_one():
    torch.manual_seed(0)
    trainer, log = fresh(), TrainingLog(3)
    metrics = []
    for i in range(7):
        metrics.append(trainer.step(torch.randn(64, 8)))
        log.add(trainer, metrics[-1], last=i == 6)
    rows = pd.DataFrame(log.rows)
    assert rows["step"].tolist() == [3, 6, 7] and rows["interval_steps"].tolist() == [3, 3, 1]
    assert rows["tokens"].tolist() == [192, 384, 448]
    mean = lambda key, a, b: sum(getattr(m, key) for m in metrics[a:b]) / (b - a)  # noqa: E731
    assert rows["fvu"].tolist() == pytest.approx([mean("fvu", 0, 3), mean("fvu", 3, 6), mean("fvu", 6, 7)])
    assert rows["l0"].tolist() == pytest.approx([mean("l0", 0, 3), mean("l0", 3, 6), mean("l0", 6, 7)])
    assert rows["dead_fraction"].iloc[-1] == (trainer.firing_counts == 0).double().mean().item()
    assert (rows["lr"] == trainer.lr).all() and rows["seconds"].is_monotonic_increasing


def test_a_resumed_log_continues_from_its_checkpoint_without_repeating_a_step(tmp_path):
    torch.manual_seed(1)
    xs = [torch.randn(64, 8) for _ in range(12)]
    trainer, log = fresh(), TrainingLog(2)
    for x in xs[:4]:
        log.add(trainer, trainer.step(x))
    trainer.save_checkpoint(tmp_path)
    log.save(tmp_path)
    for x in xs[4:7]:  # an attempt that dies after logging step 6, past its checkpoint at step 4
        log.add(trainer, trainer.step(x))
    assert [r["step"] for r in log.rows] == [2, 4, 6]

    resumed = Trainer.load_checkpoint(tmp_path)
    again = TrainingLog.load(tmp_path, 2)
    assert [r["step"] for r in again.rows] == [2, 4]
    for x in xs[4:]:
        again.add(resumed, resumed.step(x), last=resumed.step_count == 12)
    assert [r["step"] for r in again.rows] == [2, 4, 6, 8, 10, 12]
    assert pd.DataFrame(again.rows)["seconds"].is_monotonic_increasing
    # A checkpoint from before the log existed resumes with an empty one.
    (tmp_path / TRAINING_LOG).unlink()
    assert TrainingLog.load(tmp_path, 2).rows == []


def test_training_curves_reads_the_log_from_each_trials_final_checkpoint(tmp_path):
    torch.manual_seed(2)
    for name in ("a", "b"):
        trainer, log = fresh(), TrainingLog(5)
        for i in range(20):
            log.add(trainer, trainer.step(torch.randn(64, 8)), last=i == 19)
        (tmp_path / name / "checkpoint_000002").mkdir(parents=True)
        log.save(tmp_path / name / "checkpoint_000002")
    trials = pd.DataFrame(
        {"trial_id": ["a", "b", "c"], "checkpoint": [str(tmp_path / n / "checkpoint_000002") for n in "ab"] + [None]}
    )
    curves = training_curves(trials)
    assert curves.groupby("trial_id")["step"].apply(list).to_dict() == {"a": [5, 10, 15, 20], "b": [5, 10, 15, 20]}
    assert list(curves.columns) == [
        "trial_id",
        "step",
        "tokens",
        "fvu",
        "l0",
        "dead_fraction",
        "lr",
        "seconds",
        "interval_steps",
    ]


def spec(**training) -> dict:
    return {
        "name": "t",
        "cache": {"hookpoints": ["layers.3.mlp"]},
        "space": {"activation": ["topk"]},
        "training": {"steps": 20, "checkpoint_every": 10, **training},
    }


def test_log_every_is_a_validated_training_setting():
    assert parse_spec(spec()).training.log_every == 10
    assert parse_spec(spec(log_every=1)).training.log_every == 1
    # More than the steps is allowed: the last step always has a row.
    assert parse_spec(spec(log_every=50)).training.log_every == 50
    for bad in (0, -5, 2.5, "often"):
        with pytest.raises(SpecError, match=r"training\.log_every"):
            parse_spec(spec(log_every=bad))
    with pytest.raises(ValueError, match="log_every"):
        TrainingLog(0)
