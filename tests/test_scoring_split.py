"""The explain/test split and the control dictionaries on a real cache made by `bae cache` (the embedded model and
corpus): the joint between the cache's held-out documents and the scorer's sides, which hand-made ids never test."""

import numpy as np
import pandas as pd
import pytest

from bae_core.coders.config import CoderConfig
from bae_core.data.cache import open_cache
from bae_core.evaluation.examples import WINDOW, cut_windows, window_rows
from bae_core.evaluation.interp import (
    CONTROL_LATENTS,
    ExampleOptions,
    coder_activations,
    coder_latent_scores,
    control_scores,
    split_tokens,
)
from bae_core.training import build_coder
from ray_jobs.cache_job import run_cache
from ray_jobs.spec import parse_spec

HOOK = "layers.3.mlp"


@pytest.fixture(scope="module")
def cache(local_ray, tmp_path_factory):
    from conftest import sweep_spec

    root = tmp_path_factory.mktemp("cache")
    spec = sweep_spec("unused", root, cache={"seq_len": 64, "train_tokens": 1024, "heldout_tokens": 16384})
    run_cache(parse_spec(spec).cache_request())
    return str(root)


def test_held_out_documents_split_about_evenly_between_explain_and_test(cache):
    tokens, docs = split_tokens(cache, HOOK, "heldout", open_cache(cache))
    held_out = set(docs.reshape(-1))
    w = cut_windows(tokens, docs)
    explain, test = set(w.doc_id[w.explain]), set(w.doc_id[w.test])
    print(
        f"held-out documents {len(held_out)}: explain {len(explain)}, test {len(test)}; windows {len(w)}: "
        f"explain {w.explain.sum()}, test {w.test.sum()}, dropped {(~w.explain & ~w.test).sum()}"
    )
    assert len(held_out) >= 8 and not explain & test
    assert len(explain) >= 0.25 * len(held_out) and len(test) >= 0.25 * len(held_out)
    assert w.test.sum() >= 0.25 * len(w) and w.explain.sum() >= 0.25 * len(w)
    # Dropped windows are exactly those whose tokens come from documents of both sides.
    rows = window_rows(*tokens.shape, WINDOW)
    window_docs = docs.reshape(-1)[rows].reshape(-1, WINDOW)
    sides = {d: d in explain for d in explain | test}
    mixed = np.array(
        [len({sides.get(d) for d in row}) > 1 or None in {sides.get(d) for d in row} for row in window_docs]
    )
    np.testing.assert_array_equal(mixed, ~w.explain & ~w.test)


def test_eligible_latents_get_the_test_windows_they_are_owed(cache):
    manifest = open_cache(cache)
    coder = build_coder(CoderConfig(activation="topk", k=8, expansion_factor=2), 576, seed=0)
    options = ExampleOptions(min_examples=5, test_windows=50)
    rows = pd.DataFrame(coder_latent_scores(coder, cache, HOOK, options))
    tokens, docs = split_tokens(cache, HOOK, "heldout", manifest)
    w = cut_windows(tokens, docs)
    acts = coder_activations(coder, cache, HOOK, "heldout", manifest)[window_rows(*tokens.shape, WINDOW)]
    active = (acts.tocsc() != 0).T.toarray().reshape(coder.num_latents, len(w), WINDOW).any(axis=2)
    on, off = (active & w.test).sum(1), (~active & w.test).sum(1)
    eligible = rows[rows["eligible"]]
    assert len(eligible) > 100
    owed = np.minimum(50, np.minimum(on, off))[eligible["latent"]]
    np.testing.assert_array_equal(eligible["test_activating_windows"], owed)
    np.testing.assert_array_equal(eligible["test_nonactivating_windows"], owed)
    assert eligible["test_activating_windows"].median() >= 20


def test_the_controls_score_their_known_answers(cache):
    options = ExampleOptions(min_examples=5)
    token = pd.DataFrame(control_scores(cache, HOOK, "token_control", options))
    random = pd.DataFrame(control_scores(cache, HOOK, "random_control", options))
    assert len(token) == len(random) == CONTROL_LATENTS
    # The same firing counts, latent by latent; the positions differ.
    np.testing.assert_array_equal(token["firing_count"], random["firing_count"])
    assert token["eligible"].all() and random["eligible"].mean() > 0.9
    assert token["token_auroc"].mean() > 0.95 and token["token_auroc"].min() > 0.9
    assert abs(random["token_auroc"].mean() - 0.5) < 0.05
    assert token["test_activating_windows"].median() >= 20
