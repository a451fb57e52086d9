"""Ray Train trains coders from a cache, data-parallel, and resumes from its checkpoints (real Ray)."""

import json

import numpy as np
import pytest

from bae_core import SparseCoder
from bae_core.data.cache import CacheManifest, HookpointInfo, build_table, open_filesystem, write_shard
from bae_core.synthetic import SyntheticConfig, SyntheticData
from ray_jobs.train_job import TrainJob, export_coder, run_train


@pytest.fixture(scope="module")
def synthetic_cache(tmp_path_factory):
    """A cache of synthetic sparse activations with a known answer (input -> output pairs)."""
    root = str(tmp_path_factory.mktemp("cache"))
    fs, base = open_filesystem(root)
    data = SyntheticData(SyntheticConfig(num_features=64, dim=16, mean_active=2.0))
    m = CacheManifest(
        model="synthetic",
        revision=None,
        dataset="synthetic",
        hookpoints={"layers.0.mlp": HookpointInfo({"input": 16, "output": 16})},
        dtype="float16",
        seq_len=32,
        sequences_per_unit=16,
        heldout_fraction=0.1,
        seed=0,
        max_tokens={"train": None, "heldout": None},
    )
    for unit in range(4):
        x, y, _ = data.sample(512)
        seq_index, token_ids = np.arange(16) + 16 * unit, np.zeros((16, 32), np.int32)
        doc_position = np.arange(512).reshape(16, 32)
        table = build_table(
            seq_index, token_ids, np.full((16, 32), "synthetic"), doc_position, {"input": x, "output": y}, "float16"
        )
        m.add(write_shard(fs, base, "train", "layers.0.mlp", unit, table))
    m.complete = True
    m.save(fs, base)
    return root


def job(cache, out, **kw):
    base = dict(
        cache=cache,
        hookpoint="layers.0.mlp",
        out=str(out),
        coder={"activation": "binary_topk", "kind": "skip_transcoder", "k": 4, "num_latents": 128},
        train={"optimizer": "adam", "lr": 3e-3, "lr_warmup_steps": 5, "log_every": 0},
        steps=30,
        batch_size=256,
        checkpoint_every=10,
        workers=2,
        cpus_per_worker=0.5,
    )
    return TrainJob(**{**base, **kw})


def test_two_workers_train_data_parallel_and_resume(local_ray, synthetic_cache, tmp_path):
    result = run_train(job(synthetic_cache, tmp_path))
    assert result.error is None
    assert result.metrics["step"] == 30 and result.metrics["fvu"] < 0.9
    coder = SparseCoder.load(export_coder(result, tmp_path / "coder"))
    assert coder.cfg.activation == "binary_topk" and coder.num_latents == 128

    # The same run asked for more steps continues from its last checkpoint instead of starting over.
    more = run_train(job(synthetic_cache, tmp_path, steps=40))
    meta = json.loads((export_coder(more, tmp_path / "more") / "trainer.json").read_text())
    assert meta["step"] == 40
    history = more.metrics_dataframe
    # The restored checkpoint's row, then the new steps: steps 10 and 20 were not redone.
    assert history["step"].tolist() == [30, 40]


def test_bad_job_names_the_field(synthetic_cache, tmp_path, capsys):
    from ray_jobs.cli import main

    assert main(["train", synthetic_cache, "--hookpoint", "layers.7.mlp", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "bae train: error: --hookpoint: 'layers.7.mlp' is not in the cache" in err and "layers.0.mlp" in err

    with pytest.raises(ValueError, match="k: must be smaller than the number of latents"):
        job(synthetic_cache, tmp_path, coder={"k": 64, "num_latents": 64})
    with pytest.raises(ValueError, match="checkpoint_every"):
        job(synthetic_cache, tmp_path, checkpoint_every=0)
