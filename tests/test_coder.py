"""Configs, checkpoints (ours and sparsify's reader) and the trainer's guarantees."""

import json

import pytest
import torch

from bae_core import ACTIVATIONS, CoderConfig, SparseCoder, TrainConfig, Trainer, build_coder

# ---- bad configurations name the field and what is allowed ----------------------------------------


@pytest.mark.parametrize(
    "kwargs, d_in, pattern",
    [
        ({"k": 64, "num_latents": 64}, 8, r"k: must be smaller than the number of latents \(64\)"),
        ({"k": 32, "expansion_factor": 2}, 8, r"k: must be smaller than the number of latents \(16\)"),
        ({"activation": "groupmax", "k": 5, "num_latents": 64}, 8, r"num_latents: .*divisible by k"),
        ({"activation": "binary_groupmax", "k": 3, "num_latents": 64}, 8, r"num_latents: .*divisible by k"),
        ({"temperature": 0.0}, 8, r"temperature: must be a finite number > 0"),
        ({"temperature": -1.0}, 8, r"temperature"),
        ({"activation": "relu"}, 8, r"activation: 'relu' is not allowed; choose one of topk, groupmax"),
        ({"surrogate": "gauss"}, 8, r"surrogate: 'gauss' is not allowed; choose one of sigmoid, rectangle, identity"),
        ({"kind": "autoencoder"}, 8, r"kind: 'autoencoder' is not allowed; choose one of sae, transcoder"),
        ({"init_threshold": 0.0}, 8, r"init_threshold"),
        ({"k": 0}, 8, r"k: must be a finite number > 0"),
    ],
)
def test_bad_coder_config_raises_value_error_naming_field(kwargs, d_in, pattern):
    with pytest.raises(ValueError, match=pattern):
        SparseCoder(CoderConfig(**kwargs), d_in)


@pytest.mark.parametrize("kind", ["transcoder", "skip_transcoder"])
def test_transcoder_without_output_dimension_is_refused(kind):
    with pytest.raises(ValueError, match=r"d_out: a .*transcoder.* needs an output dimension"):
        SparseCoder(CoderConfig(kind=kind, k=4, num_latents=32), 8)


def test_bad_train_config_names_field():
    with pytest.raises(ValueError, match="optimizer: 'sgd' is not allowed; choose one of signum, adam"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="lr: must be a finite number > 0"):
        TrainConfig(lr=-1.0)
    with pytest.raises(ValueError, match="device: 'gpu0' is not a torch device"):
        TrainConfig(device="gpu0")
    with pytest.raises(ValueError, match="auxk_alpha: AuxK is defined for continuous"):
        Trainer(build_coder(CoderConfig(activation="binary_topk", k=2, num_latents=16), 4), TrainConfig(auxk_alpha=1))
    with pytest.raises(ValueError, match="entropy_coef: the entropy term is for binary codes"):
        Trainer(build_coder(CoderConfig(k=2, num_latents=16), 4), TrainConfig(entropy_coef=0.1))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_batch_stops_with_clear_error_and_leaves_weights_untouched(bad):
    coder = build_coder(CoderConfig(activation="binary_topk", k=4, num_latents=32), 8)
    trainer = Trainer(coder, TrainConfig(log_every=0))
    trainer.step(torch.randn(64, 8))
    before = {k: v.clone() for k, v in coder.state_dict().items()}
    x = torch.randn(64, 8)
    x[5, 3] = bad
    with pytest.raises(ValueError, match=r"x: training batch 1 contains 1 NaN or inf values; no update was made"):
        trainer.step(x)
    for key, value in coder.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert trainer.step_count == 1


def test_nan_target_is_refused_for_transcoders():
    coder = build_coder(CoderConfig(kind="skip_transcoder", k=4, num_latents=32), 8, 8)
    y = torch.randn(16, 8)
    y[0, 0] = float("nan")
    with pytest.raises(ValueError, match="y: training batch 0"):
        Trainer(coder).step(torch.randn(16, 8), y)


# ---- checkpoints ----------------------------------------------------------------------------------


def trained(activation: str, kind: str, steps: int = 3) -> tuple[SparseCoder, torch.Tensor]:
    torch.manual_seed(0)
    k = 4
    coder = build_coder(CoderConfig(activation=activation, kind=kind, k=k, num_latents=32), 8, 8, seed=7)
    trainer = Trainer(coder, TrainConfig(log_every=0))
    x = torch.randn(64, 8)
    y = x @ torch.randn(8, 8) if coder.cfg.is_transcoder else None
    for _ in range(steps):
        trainer.step(x, y)
    trainer.eval_mode()
    return coder, x


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("kind", ["sae", "skip_transcoder"])
def test_save_load_round_trip_is_exact(tmp_path, activation, kind):
    coder, x = trained(activation, kind)
    coder.save(tmp_path / "hook")
    assert sorted(p.name for p in (tmp_path / "hook").iterdir()) == ["cfg.json", "sae.safetensors"]
    loaded = SparseCoder.load(tmp_path / "hook")
    assert loaded.cfg == coder.cfg
    for key, value in coder.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    loaded.eval()
    with torch.no_grad():
        a, b = coder.encode(x).to_dense(32), loaded.encode(x).to_dense(32)
        assert torch.equal(a, b)
        assert torch.equal(coder.decode(coder.encode(x), x), loaded.decode(loaded.encode(x), x))


def test_checkpoint_never_pickles(tmp_path):
    coder, _ = trained("binary_topk", "skip_transcoder")
    coder.save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["d_in"] == 8 and cfg["activation"] == "binary_topk" and cfg["transcode"] is True
    from safetensors import safe_open

    with safe_open(str(tmp_path / "sae.safetensors"), "pt") as f:
        assert set(f.keys()) == {"encoder.weight", "encoder.bias", "W_dec", "b_dec", "W_skip", "log_threshold"}


def test_load_names_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cfg.json: missing"):
        SparseCoder.load(tmp_path)


@pytest.mark.parametrize(
    "activation, kind",
    [("topk", "sae"), ("groupmax", "sae"), ("topk", "skip_transcoder"), ("topk", "transcoder")],
)
def test_continuous_checkpoint_loads_in_sparsify_with_same_outputs(tmp_path, activation, kind):
    from sparsify import SparseCoder as SparsifyCoder

    coder, x = trained(activation, kind)
    coder.save(tmp_path / "layers.0.mlp")
    theirs = SparsifyCoder.load_from_disk(tmp_path / "layers.0.mlp")
    assert theirs.cfg.transcode == coder.cfg.is_transcoder
    assert (theirs.W_skip is not None) == coder.cfg.has_skip
    with torch.no_grad():
        ours_out = coder(x, x if coder.cfg.is_transcoder else None)
        their_out = theirs(x, x if coder.cfg.is_transcoder else None)
        torch.testing.assert_close(their_out.sae_out, ours_out.output, rtol=1e-5, atol=1e-5)
        ours_dense = ours_out.code.to_dense(32)
        theirs_dense = torch.zeros(64, 32).scatter_(1, their_out.latent_indices, their_out.latent_acts)
        torch.testing.assert_close(theirs_dense, ours_dense)


def test_trainer_checkpoint_resumes_exactly(tmp_path):
    torch.manual_seed(0)
    xs = [torch.randn(64, 8) for _ in range(6)]

    def fresh():
        coder = build_coder(CoderConfig(activation="binary_topk", k=4, num_latents=32), 8, seed=3)
        return Trainer(coder, TrainConfig(log_every=0, dead_tokens=100))

    straight = fresh()
    for x in xs:
        straight.step(x)
    straight.eval_mode()

    first = fresh()
    for x in xs[:3]:
        first.step(x)
    first.save_checkpoint(tmp_path)
    resumed = Trainer.load_checkpoint(tmp_path)
    assert resumed.step_count == 3 and resumed.tokens_seen == 192
    for x in xs[3:]:
        resumed.step(x)
    resumed.eval_mode()
    for key, value in straight.coder.state_dict().items():
        torch.testing.assert_close(resumed.coder.state_dict()[key], value, rtol=1e-6, atol=1e-6)
    assert torch.equal(resumed.tokens_since_fired, straight.tokens_since_fired)
    assert torch.equal(resumed.firing_counts, straight.firing_counts)


def test_adam_checkpoint_resumes_exactly(tmp_path):
    torch.manual_seed(1)
    xs = [torch.randn(32, 8) for _ in range(4)]
    cfg = TrainConfig(optimizer="adam", lr_warmup_steps=3, log_every=0)
    straight = Trainer(build_coder(CoderConfig(k=4, num_latents=32), 8), cfg)
    for x in xs:
        straight.step(x)
    part = Trainer(build_coder(CoderConfig(k=4, num_latents=32), 8), cfg)
    for x in xs[:2]:
        part.step(x)
    part.save_checkpoint(tmp_path)
    resumed = Trainer.load_checkpoint(tmp_path)
    for x in xs[2:]:
        resumed.step(x)
    for key, value in straight.coder.state_dict().items():
        torch.testing.assert_close(resumed.coder.state_dict()[key], value)


def test_training_reduces_fvu_and_tracks_dead_latents():
    torch.manual_seed(0)
    coder = build_coder(CoderConfig(activation="topk", k=4, num_latents=64), 16)
    trainer = Trainer(coder, TrainConfig(optimizer="adam", lr=3e-3, lr_warmup_steps=5, dead_tokens=512, log_every=0))
    data = torch.randn(2048, 16)
    history = trainer.fit((data[i : i + 256] for i in range(0, 2048, 256)), max_steps=8)
    assert len(history) == 8
    assert history[-1].fvu < history[0].fvu
    assert history[-1].tokens == 2048
    assert trainer.firing_counts.sum() == 4 * 2048
    assert 0 <= history[-1].dead_fraction <= 1
    torch.testing.assert_close(coder.W_dec.norm(dim=1), torch.ones(64))  # continuous SAE: unit-norm rows


def test_auxk_and_entropy_terms_are_reported():
    torch.manual_seed(0)
    x = torch.randn(128, 8)
    topk = Trainer(build_coder(CoderConfig(k=2, num_latents=64), 8), TrainConfig(auxk_alpha=1 / 32, dead_tokens=1))
    topk.step(x)
    assert topk.step(x).auxk_loss > 0
    binary = Trainer(
        build_coder(CoderConfig(activation="binary_topk", k=2, num_latents=64), 8), TrainConfig(entropy_coef=0.01)
    )
    m = binary.step(x)
    assert m.entropy > 0 and m.loss > m.fvu


@pytest.mark.parametrize(
    "activation, kind, decoder",
    [
        ("topk", "sae", "tied"),
        ("binary_topk", "sae", "tied"),
        ("binary_threshold", "sae", "tied"),
        ("binary_groupmax", "sae", "zero"),  # one latent per group always fires: starts from nothing
        ("topk", "transcoder", "zero"),
        ("binary_topk", "skip_transcoder", "zero"),
    ],
)
def test_initialisation(activation, kind, decoder):
    cfg = CoderConfig(activation=activation, kind=kind, k=4, num_latents=64)
    coder = build_coder(cfg, 16, 16 if cfg.is_transcoder else None, seed=0)
    assert torch.count_nonzero(coder.encoder.bias) == 0
    assert torch.count_nonzero(coder.b_dec) == 0
    if decoder == "tied":
        torch.testing.assert_close(coder.W_dec, coder.encoder.weight / coder.encoder.weight.norm(dim=1, keepdim=True))
    else:
        assert torch.count_nonzero(coder.W_dec) == 0
    if coder.W_skip is not None:
        assert torch.count_nonzero(coder.W_skip) == 0
    if cfg.has_threshold:
        torch.testing.assert_close(coder.threshold, torch.full((64,), 0.004))


def test_l0_penalty_holds_dense_binary_code_near_k():
    # The optional penalty, without the controller. Through the threshold alone it lets encoder and threshold
    # grow together and L0 escapes (measured: L0 ~20 at step 300 and ~130 at step 700 for a target of 4).
    from bae_core.synthetic import SyntheticConfig, SyntheticData

    cfg = CoderConfig(activation="binary_threshold", k=4, num_latents=512, temperature=0.5, init_threshold=0.3)
    trainer = Trainer(
        build_coder(cfg, 64),
        TrainConfig(optimizer="adam", lr=3e-3, lr_warmup_steps=50, l0_coef=1.0, l0_control=0, log_every=0),
    )
    history = trainer.fit(SyntheticData(SyntheticConfig()).batches(1024, transcoder=False), max_steps=300)
    assert history[0].l0 > 8
    assert 2 <= sum(m.l0 for m in history[-20:]) / 20 <= 6
    assert trainer.coder.threshold.max() < 2
