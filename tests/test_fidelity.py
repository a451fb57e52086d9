"""Spliced fidelity and ablation by interpretability on the real embedded model (evaluation.md §1, §5)."""

import math

import numpy as np
import pytest
import torch

from bae_core import CoderConfig, SparseCoder
from bae_core.data.hooks import capture, splice
from bae_core.data.lm import load_model, resolve_hookpoints
from bae_core.evaluation.fidelity import (
    ablation_by_score,
    equal_mass_bins,
    fidelity_and_ablation,
    next_token_stats,
    spliced_fidelity,
)
from bae_core.evaluation.metrics import evaluate_coder

TEXT = (
    "In the beginning God created the heaven and the earth. And the earth was without form, and void; and "
    "darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters."
)


@pytest.fixture(scope="module")
def loaded():
    return load_model()


@pytest.fixture(scope="module")
def token_ids(loaded):
    ids = loaded.tokenizer(TEXT, return_tensors="pt").input_ids[0]
    return ids[:40].reshape(2, 20)  # two sequences of real text


def identity_sae(d: int) -> SparseCoder:
    """relu(x) - relu(-x) = x: 2d latents, encoder and decoder [I; -I], top-k keeping every positive half."""
    coder = SparseCoder(CoderConfig(kind="sae", activation="topk", num_latents=2 * d, k=d), d)
    eye = torch.eye(d)
    with torch.no_grad():
        coder.encoder.weight.copy_(torch.cat([eye, -eye]))
        coder.encoder.bias.zero_()
        coder.W_dec.copy_(torch.cat([eye, -eye]))
        coder.b_dec.zero_()
    return coder


def zero_coder(d: int, kind: str) -> SparseCoder:
    coder = SparseCoder(CoderConfig(kind=kind, activation="binary_topk", expansion_factor=2, k=8), d, d)
    with torch.no_grad():
        coder.W_dec.zero_()
        coder.b_dec.zero_()
        if coder.W_skip is not None:
            coder.W_skip.zero_()
    return coder


def test_identity_coder_has_fvu_zero_and_no_loss_increase(loaded, token_ids):
    (hook,) = resolve_hookpoints(loaded, ["layers.3.mlp"])
    coder = identity_sae(loaded.d_model)
    acts = capture(loaded, token_ids, [hook])[hook.name]["output"].reshape(-1, loaded.d_model)
    assert evaluate_coder(coder, [acts]).fvu < 1e-10

    (fid,) = spliced_fidelity(loaded, hook, {"identity": coder}, token_ids).values()
    assert fid.tokens == 2 * 19
    assert abs(fid.ce_increase) < 1e-4 and abs(fid.kl) < 1e-6 and fid.top1_drop == 0
    assert fid.ce_zero_ablated > fid.ce_clean + 0.01  # removing the MLP hurts, so "recovered" is meaningful
    assert fid.loss_recovered == pytest.approx(1.0, abs=1e-3)
    assert 1.0 < fid.ce_clean < 8.0  # real text, a real model
    summary = fid.summary()
    assert {"ce_increase", "ce_increase_relative", "top1_drop", "kl", "loss_recovered", "fidelity_tokens"} <= set(
        summary
    )


def test_bfloat16_model_gives_nearly_the_same_losses(loaded, token_ids):
    (hook,) = resolve_hookpoints(loaded, ["layers.3.mlp"])
    half = load_model(dtype=torch.bfloat16)
    fp32 = spliced_fidelity(loaded, hook, {"identity": identity_sae(loaded.d_model)}, token_ids)["identity"]
    bf16 = spliced_fidelity(half, hook, {"identity": identity_sae(loaded.d_model)}, token_ids)["identity"]
    assert abs(bf16.ce_increase) < 1e-3 and bf16.ce_clean == pytest.approx(fp32.ce_clean, abs=0.05)
    assert bf16.ce_zero_ablated == pytest.approx(fp32.ce_zero_ablated, abs=0.05)


@pytest.mark.parametrize("kind", ["sae", "skip_transcoder"])
def test_a_coder_that_outputs_zero_recovers_no_loss(loaded, token_ids, kind):
    (hook,) = resolve_hookpoints(loaded, ["layers.3.mlp"])
    fid = spliced_fidelity(loaded, hook, {"zero": zero_coder(loaded.d_model, kind)}, token_ids)["zero"]
    assert fid.ce_spliced == pytest.approx(fid.ce_zero_ablated, abs=1e-5)
    assert fid.loss_recovered == pytest.approx(0.0, abs=1e-4)
    assert fid.ce_increase > 0 and fid.kl > 0


def test_clean_ce_matches_the_models_own_loss(loaded, token_ids):
    stats = next_token_stats(loaded, token_ids, {})["clean"]
    with torch.no_grad():
        expected = loaded.model(token_ids, labels=token_ids).loss  # transformers' shifted CE, mean over tokens
    assert stats.ce == pytest.approx(float(expected), rel=1e-5)
    assert stats.kl == 0 and 0 < stats.top1 < 1


def test_bad_token_ids_and_reserved_names_are_refused(loaded, token_ids):
    (hook,) = resolve_hookpoints(loaded, ["layers.3.mlp"])
    with pytest.raises(ValueError, match="token_ids"):
        next_token_stats(loaded, token_ids.reshape(-1), {})
    with pytest.raises(ValueError, match="zero_ablated"):
        spliced_fidelity(loaded, hook, {"zero_ablated": identity_sae(loaded.d_model)}, token_ids)


# ---- ablation by interpretability ------------------------------------------------------------------------------


def test_equal_mass_bins_on_a_hand_built_table():
    scores = np.array([0.9, 0.1, 0.5, np.nan, 0.7, 0.3])
    counts = np.array([10, 10, 10, 5, 10, 0])
    # Scored, firing latents by score: 1 (0.1), 2 (0.5), 4 (0.7), 0 (0.9); mass middles 5/40, 15/40, 25/40, 35/40.
    assert equal_mass_bins(scores, counts, 2).tolist() == [1, 0, 0, -1, 1, -1]
    assert equal_mass_bins(scores, counts, 4).tolist() == [3, 0, 1, -1, 2, -1]
    # One heavy latent takes a bin of its own: masses 1, 1, 98 -> middles .005, .015, .51
    assert equal_mass_bins(np.array([0.1, 0.2, 0.3]), np.array([1, 1, 98]), 2).tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match="bins"):
        equal_mass_bins(scores, counts, 0)


def test_ablating_latents_inside_the_spliced_coder(loaded, token_ids):
    (hook,) = resolve_hookpoints(loaded, ["layers.3.mlp"])
    d = loaded.d_model
    coder = identity_sae(d)
    nothing = torch.zeros(2 * d, dtype=torch.bool)
    everything = torch.ones(2 * d, dtype=torch.bool)
    stats = next_token_stats(
        loaded,
        token_ids,
        {
            "spliced": lambda: splice(loaded, hook, coder),
            "none": lambda: splice(loaded, hook, coder, ablate=nothing),
            "all": lambda: splice(loaded, hook, coder, ablate=everything),
            "zero": lambda: splice(loaded, hook, zero_coder(d, "sae")),
        },
    )
    assert stats["none"].ce == pytest.approx(stats["spliced"].ce, abs=1e-6)
    assert stats["all"].ce == pytest.approx(stats["zero"].ce, abs=1e-5)  # b_dec = 0: nothing left
    with pytest.raises(ValueError, match="ablate"), splice(loaded, hook, coder, ablate=torch.zeros(3, dtype=bool)):
        pass

    rng = np.random.default_rng(0)
    scores = rng.uniform(size=2 * d)
    scores[:10] = np.nan
    counts = rng.integers(0, 50, size=2 * d)
    rows = ablation_by_score(loaded, hook, coder, token_ids, scores, counts, bins=3)
    assert [r["bin"] for r in rows] == [0, 1, 2]
    assert sum(r["latents"] for r in rows) == int((np.isfinite(scores) & (counts > 0)).sum())
    assert rows[0]["max_score"] <= rows[1]["min_score"] <= rows[1]["max_score"] <= rows[2]["min_score"]
    masses = [r["firing_count"] for r in rows]
    assert max(masses) - min(masses) <= 2 * counts.max()  # about equal firing mass
    for r in rows:
        assert r["ce_increase"] > 0 and math.isfinite(r["relative_ce_increase"])
        assert r["relative_ce_increase"] == pytest.approx(r["ce_increase"] / r["ce_spliced"])


def test_one_pass_gives_the_fidelity_and_the_ablation_of_the_two_functions_apart(loaded, token_ids):
    (hook,) = resolve_hookpoints(loaded, ["layers.3.mlp"])
    coder = identity_sae(loaded.d_model)
    rng = np.random.default_rng(1)
    scores = rng.uniform(size=coder.num_latents)
    counts = rng.integers(1, 50, size=coder.num_latents)
    fidelity, rows = fidelity_and_ablation(loaded, hook, coder, token_ids, scores, counts, bins=3)
    assert fidelity == spliced_fidelity(loaded, hook, {"c": coder}, token_ids)["c"]
    assert rows == ablation_by_score(loaded, hook, coder, token_ids, scores, counts, bins=3)
    alone, none = fidelity_and_ablation(loaded, hook, coder, token_ids, None, None, bins=3)
    assert alone == fidelity and none == []
