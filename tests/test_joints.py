"""Where the stages meet, checked on a real cache from `bae cache` (embedded model, tiny sizes): the numbers each
stage hands on are recomputed here from the model and the cache, independently of the code that produced them.

- A scored window position: the token the scorer shows and the code it counts there are the model's token and the
  coder's code of the model's activation at that position.
- The neuron baseline: the MLP neurons of the cached input, through the MLP's down projection, give the cached
  output; the baseline the scorer reads keeps each token's k largest of them.
- Ablation by score: the bins (members, firing mass, order by score) and their losses, by hand.
- Frequency-weighted scores: the per-hookpoint weighted means and their mean over hookpoints, by hand.
"""

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from bae_core import CoderConfig
from bae_core.data.cache import read_shard, unpack_activations
from bae_core.data.hooks import capture, mlp_neurons, splice
from bae_core.data.lm import load_model, resolve_hookpoints
from bae_core.evaluation.aggregate import score_summary
from bae_core.evaluation.examples import WINDOW, cut_windows, per_token_topk, window_rows
from bae_core.evaluation.fidelity import ablation_by_score
from bae_core.evaluation.interp import (
    ExampleOptions,
    coder_activations,
    coder_latent_scores,
    neuron_activations,
    split_tokens,
)
from bae_core.training import build_coder
from ray_jobs.cache_job import CacheRequest, run_cache

MLP, RESIDUAL = "layers.3.mlp", "layers.5"
SEQ_LEN = 80
"""Two windows of 32 per sequence and 16 tokens left out: a window's rows are not simply its sequence's rows."""


@pytest.fixture(scope="module")
def cache(local_ray, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cache"))
    manifest = run_cache(
        CacheRequest(
            root=root,
            hookpoints=[MLP, RESIDUAL],
            seq_len=SEQ_LEN,
            train_tokens=SEQ_LEN * 6,
            heldout_tokens=SEQ_LEN * 24,
            sequences_per_unit=6,
            batch_size=6,
        )
    )
    assert manifest.splits["heldout"]["units"] == 4 and manifest.dtype == "float16"
    return root, manifest


@pytest.fixture(scope="module")
def loaded():
    return load_model()


def small_coder(kind: str = "sae", activation: str = "topk", seed: int = 0):
    """An untrained coder of 64 latents at k = 8: every latent fires often enough on the tiny cache to be scored."""
    cfg = CoderConfig(kind=kind, activation=activation, num_latents=64, k=8)
    return build_coder(cfg, 576, 576 if cfg.is_transcoder else None, seed=seed).eval()


def stored(root, record, column: str, manifest) -> np.ndarray:
    return unpack_activations(read_shard(root, record, [column]).column(column), manifest.dtype, 576)


# ---- the token and the code at a window position ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sae", "skip_transcoder"])
def test_a_windows_token_and_code_are_the_models_at_that_position(cache, loaded, kind):
    root, manifest = cache
    tokens, docs = split_tokens(root, MLP, "heldout", manifest)
    n, seq_len = tokens.shape
    assert (n, seq_len) == (24, SEQ_LEN)
    coder = small_coder(kind)
    windows = cut_windows(tokens, docs)
    scored = coder_activations(coder, root, MLP, "heldout", manifest)[window_rows(n, seq_len)].toarray()
    per_seq = seq_len // WINDOW

    # Sequences from the first, a middle and the last shard, read back from the shards themselves.
    picks = [0, 11, 23]
    shards = manifest.shards_of("heldout", MLP)
    for s in picks:
        record = shards[s // manifest.sequences_per_unit]
        table = read_shard(root, record, ["seq_index", "position", "token_id"]).slice(
            (s % manifest.sequences_per_unit) * seq_len, seq_len
        )
        assert set(table.column("seq_index").to_pylist()) == {s}
        assert table.column("position").to_pylist() == list(range(seq_len))
        np.testing.assert_array_equal(table.column("token_id").to_numpy(), tokens[s])

    # The model run directly on those sequences' tokens, and the coder on what it computes at the hookpoint.
    (hook,) = resolve_hookpoints(loaded, [MLP])
    direct = capture(loaded, torch.from_numpy(tokens[picks]).long(), [hook])[MLP]
    x = direct["input" if coder.cfg.is_transcoder else "output"].reshape(len(picks), seq_len, 576)
    for i, s in enumerate(picks):
        for w in range(per_seq):
            index, span = s * per_seq + w, slice(w * WINDOW, (w + 1) * WINDOW)
            np.testing.assert_array_equal(windows.tokens[index], tokens[s, span])
            assert windows.doc_id[index] == docs[s, w * WINDOW]
            expected_prev = np.r_[tokens[s, span.start - 1] if w else -1, tokens[s, span][:-1]]
            np.testing.assert_array_equal(windows.prev[index], expected_prev)
            assert_codes_match(coder, x[i, span], scored[index * WINDOW : (index + 1) * WINDOW])


def assert_codes_match(coder, x: torch.Tensor, scored: np.ndarray) -> None:
    """`scored` (tokens x latents, read from the float16 cache) is the coder's code of `x` (the model's float32
    activations) up to float16 rounding: the same values where both fire, and a different choice of latents only
    where a latent's pre-activation lies within that rounding of the top-k boundary (or of 0)."""
    with torch.no_grad():
        code = coder.encode(x).to_dense(coder.num_latents).numpy()
        pre = coder.pre_activations(x).numpy()
        # What float16 rounding of the input alone moves the pre-activations by, with a margin.
        tol = 4 * float(np.abs(coder.pre_activations(x.half().float()).numpy() - pre).max()) + 1e-5
    kth = np.sort(pre, axis=1)[:, -coder.cfg.k]
    same_support = 0
    for t in range(len(x)):
        both = (code[t] != 0) & (scored[t] != 0)
        np.testing.assert_allclose(scored[t, both], code[t, both], rtol=0, atol=tol)
        moved = np.flatnonzero((code[t] != 0) != (scored[t] != 0))
        near = np.minimum(np.abs(pre[t, moved] - kth[t]), np.abs(pre[t, moved]))
        assert (near <= tol).all(), f"token {t}: latents {moved} fire on one side only, far from a tie"
        same_support += len(moved) == 0
    assert same_support >= 0.9 * len(x)
    assert (code != 0).sum(1).mean() > coder.cfg.k / 2  # the codes compared are not empty


# ---- the neuron baseline -----------------------------------------------------------------------------------------


def test_mlp_neurons_through_the_down_projection_give_the_cached_output(cache, loaded):
    root, manifest = cache
    (hook,) = resolve_hookpoints(loaded, [MLP])
    shards = manifest.shards_of("heldout", MLP)
    x = torch.from_numpy(stored(root, shards[1], "input", manifest))
    y = torch.from_numpy(stored(root, shards[1], "output", manifest))

    mlp = loaded.layers[3].mlp
    assert loaded.model.config.hidden_act == "silu"
    assert all(m.bias is None for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    by_hand = F.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)
    neurons = mlp_neurons(loaded, hook, x)
    assert neurons.shape == (len(x), loaded.d_mlp)
    torch.testing.assert_close(neurons, by_hand, rtol=1e-4, atol=1e-4)

    # Float16 rounding of the cached input and output is all that separates the two (measured: 3e-4 of the output's
    # scale); the next token's output is 1.3 scales away.
    out = neurons @ mlp.down_proj.weight.T
    scale = float(y.abs().max())
    error = float((out - y).abs().max()) / scale
    shifted = float((out[:-1] - y[1:]).abs().max()) / scale
    assert error < 2e-3 and shifted > 100 * error

    # The baseline the scorer reads: these neurons, each token keeping its k largest, in stored order.
    baseline = neuron_activations(loaded, root, MLP, 8, "heldout", manifest)
    rows = slice(shards[0].rows, shards[0].rows + shards[1].rows)
    np.testing.assert_array_equal(baseline[rows].toarray(), per_token_topk(neurons.numpy(), 8).toarray())
    assert (baseline[rows].getnnz(axis=1) == 8).all()


# ---- ablation by score -------------------------------------------------------------------------------------------


def test_ablation_bins_and_their_losses_by_hand(cache, loaded):
    root, manifest = cache
    (hook,) = resolve_hookpoints(loaded, [MLP])
    coder = small_coder()
    counts = coder_activations(coder, root, MLP, "heldout", manifest).getnnz(axis=0)
    rng = np.random.default_rng(0)
    scores = rng.uniform(0.4, 1.0, coder.num_latents)
    scores[:4] = np.nan  # unscored latents take no part
    counts[4] = 0  # nor do dead ones
    tokens, _ = split_tokens(root, MLP, "heldout", manifest)
    ids = torch.from_numpy(tokens[:1, :32]).long()
    bins = 3
    rows = ablation_by_score(loaded, hook, coder, ids, scores, counts, bins=bins)

    # By hand: walk the scored, firing latents from the lowest score up; each joins the bin holding the middle of
    # its own firing mass.
    ranked = sorted((scores[i], i) for i in range(coder.num_latents) if math.isfinite(scores[i]) and counts[i] > 0)
    total = sum(int(counts[i]) for _, i in ranked)
    members: dict[int, list[int]] = {}
    before = 0
    for _, i in ranked:
        b = min(int((before + counts[i] / 2) / total * bins), bins - 1)
        members.setdefault(b, []).append(i)
        before += int(counts[i])
    assert [r["bin"] for r in rows] == sorted(members)
    assert sorted(i for m in members.values() for i in m) == list(range(5, coder.num_latents))
    for r in rows:
        m = members[r["bin"]]
        assert r["latents"] == len(m) and r["firing_count"] == int(counts[m].sum())
        assert r["mean_score"] == pytest.approx(scores[m].mean())
        assert (r["min_score"], r["max_score"]) == (scores[m].min(), scores[m].max())
        # Equal firing mass: a bin misses its share by less than its heaviest latent.
        assert abs(r["firing_count"] - total / bins) <= counts[m].max()
    for low, high in zip(rows, rows[1:], strict=False):
        assert low["max_score"] < high["min_score"]

    def ce(ablate=None) -> float:
        with torch.no_grad(), splice(loaded, hook, coder, ablate=ablate):
            logits = loaded.model(ids).logits[:, :-1]
        return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1)))

    spliced = ce()
    for r in rows:
        mask = torch.zeros(coder.num_latents, dtype=torch.bool)
        mask[members[r["bin"]]] = True
        ablated = ce(mask)
        assert r["ce_spliced"] == pytest.approx(spliced, rel=1e-5)
        assert r["ce_ablated"] == pytest.approx(ablated, rel=1e-5)
        assert r["relative_ce_increase"] == pytest.approx((ablated - spliced) / spliced, rel=1e-4, abs=1e-6)
        assert r["tokens"] == ids[:, 1:].numel()


# ---- frequency-weighted scores -----------------------------------------------------------------------------------


def test_frequency_weighted_scores_by_hand(cache):
    root, _ = cache
    options = ExampleOptions(min_examples=3)
    frames = []
    for activation in ("topk", "binary_topk"):
        for hookpoint in (MLP, RESIDUAL):
            rows = coder_latent_scores(small_coder(activation=activation), root, hookpoint, options)
            frames.append(
                pd.DataFrame(rows).assign(coder_id=f"{activation}-{hookpoint}", hookpoint=hookpoint, family=activation)
            )
    latents = pd.concat(frames, ignore_index=True)
    per_hook, overall = score_summary(latents, by=["family"])

    for family in ("topk", "binary_topk"):
        weighted, eligible_scores, alive, eligible = [], [], 0, 0
        for hookpoint in (MLP, RESIDUAL):
            rows = [r for r in latents.to_dict("records") if r["family"] == family and r["hookpoint"] == hookpoint]
            scored = [r for r in rows if r["eligible"]]
            assert len(scored) >= 5, "too few eligible latents for the check to mean anything"
            mass = sum(r["firing_count"] for r in scored)
            weighted.append(sum(r["token_auroc"] * r["firing_count"] for r in scored) / mass)
            eligible_scores += [r["token_auroc"] for r in scored]
            alive += sum(r["firing_count"] > 0 for r in rows)
            eligible += len(scored)
            hook_row = per_hook[(per_hook.family == family) & (per_hook.hookpoint == hookpoint)].iloc[0]
            assert hook_row.token_auroc_weighted == pytest.approx(weighted[-1])
            assert hook_row.token_auroc == pytest.approx(np.mean([r["token_auroc"] for r in scored]))
            assert (hook_row.latents, hook_row.eligible) == (len(rows), len(scored))
        row = overall.set_index("family").loc[family]
        assert row.token_auroc_weighted == pytest.approx(np.mean(weighted))
        assert row.token_auroc == pytest.approx(np.mean(eligible_scores))
        assert row.coverage == pytest.approx(eligible / alive) and row.hookpoints == 2
        # The weighting matters here: it is not the unweighted mean by accident.
        assert row.token_auroc_weighted != pytest.approx(row.token_auroc, abs=1e-6)
