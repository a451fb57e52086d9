"""Each coder learns known features: synthetic ground truth (evaluation.md section 4)."""

import json
import subprocess
import sys

import pytest
import torch

from bae_core import ACTIVATIONS, CoderConfig, TrainConfig
from bae_core.synthetic import (
    SyntheticConfig,
    SyntheticData,
    recovery_metrics,
    synthetic_recipe,
    train_on_synthetic,
)
from bae_core.training import build_coder

CASES = [(activation, kind) for activation in ACTIVATIONS for kind in ["sae", "skip_transcoder"]]


@pytest.mark.parametrize("activation, kind", CASES)
def test_coder_recovers_features_of_its_matching_regime(activation, kind):
    # The easy setting: 256 true features in 64 dimensions, ~4 active per sample, 512 latents.
    recipe = synthetic_recipe(activation)
    cfg = CoderConfig(activation=activation, kind=kind, **recipe.coder)
    data = SyntheticData(SyntheticConfig(regime="binary" if cfg.is_binary else "continuous"))
    train = TrainConfig(**recipe.train)
    _, rec = train_on_synthetic(cfg, data, steps=recipe.steps, batch_size=1024, train_cfg=train)
    assert rec.mmcs >= 0.9, rec
    assert rec.hungarian_cos >= 0.85, rec
    assert rec.fvu < 0.35, rec


def test_untrained_coder_does_not_recover_features():
    data = SyntheticData(SyntheticConfig(regime="binary"))
    cfg = CoderConfig(activation="binary_topk", **synthetic_recipe("binary_topk").coder)
    rec = recovery_metrics(build_coder(cfg, 64), data)
    assert rec.mmcs < 0.6


def test_synthetic_data_is_seeded_and_follows_zipf():
    a = SyntheticData(SyntheticConfig(seed=3))
    b = SyntheticData(SyntheticConfig(seed=3))
    assert torch.equal(a.in_features, b.in_features)
    x, y, active = a.sample(20000, torch.Generator().manual_seed(0))
    assert x.shape == (20000, 64) and y.shape == (20000, 64)
    rates = active.float().mean(0)
    assert rates[0] > rates[-1] * 5
    assert abs(active.sum(1).float().mean().item() - 4.0) < 0.1
    binary_x = active.float() @ a.in_features
    torch.testing.assert_close(x, binary_x)  # binary regime: unit magnitudes
    cont = SyntheticData(SyntheticConfig(seed=3, regime="continuous"))
    xc, _, active_c = cont.sample(1000, torch.Generator().manual_seed(0))
    assert not torch.allclose(xc, active_c.float() @ cont.in_features)


def test_bad_synthetic_config_names_field():
    with pytest.raises(ValueError, match="regime: 'ternary' is not allowed"):
        SyntheticConfig(regime="ternary")
    with pytest.raises(ValueError, match="mean_active: .*firing probability above 1"):
        SyntheticData(SyntheticConfig(mean_active=200.0, zipf_exponent=2.0))


def test_bae_synth_json_lines():
    cmd = [sys.executable, "-m", "ray_jobs.cli", "synth", "--json", "--steps", "60", "--batch-size", "256"]
    cmd += ["--activations", "topk,binary_topk", "--kinds", "sae,skip_transcoder"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True)
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(r["activation"], r["kind"]) for r in rows] == [
        ("topk", "sae"),
        ("topk", "skip_transcoder"),
        ("binary_topk", "sae"),
        ("binary_topk", "skip_transcoder"),
    ]
    for row in rows:
        assert {"activation", "kind", "fvu", "mmcs", "firing_f1", "hungarian_cos", "dead_fraction"} <= row.keys()
        assert 0 <= row["mmcs"] <= 1 and 0 <= row["firing_f1"] <= 1 and row["fvu"] >= 0


def test_bae_synth_rejects_unknown_activation():
    cmd = [sys.executable, "-m", "ray_jobs.cli", "synth", "--activations", "relu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "relu not allowed; choose from topk" in proc.stderr
