"""Language-model access on the real embedded model: loading and its cache, hookpoints, capture and splicing."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bae_core import CoderConfig, SparseCoder
from bae_core.data.hooks import capture, splice, zero_ablate
from bae_core.data.lm import EMBEDDED_MODEL, embedded_model_folder, load_model, resolve_hookpoints

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["The capital of France is", "One, two, three, four, five, six,"]


@pytest.fixture(scope="module")
def loaded():
    # The converted folder is cached across runs (default cache dir), so this takes ~1 s after the first run.
    return load_model()


@pytest.fixture(scope="module")
def batch(loaded):
    """Two prompts of different lengths, left-padded, with their attention mask."""
    tokenizer = loaded.tokenizer
    tokenizer.padding_side = "left"
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert (enc.attention_mask == 0).any(), "the prompts should need padding"
    return enc.input_ids, enc.attention_mask


def logits_of(loaded, input_ids, attention_mask=None):
    with torch.inference_mode():
        return loaded.model(input_ids=input_ids, attention_mask=attention_mask).logits


# ---- loading ------------------------------------------------------------------------------------------------------


def test_embedded_model_has_the_papers_shape_and_knows_paris(loaded):
    assert (loaded.name, loaded.num_layers, loaded.d_model, loaded.d_mlp) == (EMBEDDED_MODEL, 30, 576, 1536)
    assert loaded.revision.startswith("sha256:") and len(loaded.revision) == len("sha256:") + 16
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert len(loaded.hookpoints) == 60 and {"layers.0", "layers.29.mlp"} <= set(loaded.hookpoints)

    ids = loaded.tokenizer("The capital of France is", return_tensors="pt").input_ids
    logits = logits_of(loaded, ids)[0, -1]
    assert torch.isfinite(logits).all()
    top = logits.topk(5)
    # The GGUF's dequantised weights make " Paris" the clear favourite (17.4 against 14.9 for " the").
    assert loaded.tokenizer.decode(top.indices[0]) == " Paris"
    assert top.values[0] - top.values[1] > 1.0


def test_converted_folder_is_reused(loaded):
    folder = embedded_model_folder()
    weights = folder / "model.safetensors"
    before = weights.stat().st_mtime_ns
    again = load_model()
    assert weights.stat().st_mtime_ns == before
    assert again.revision == loaded.revision
    assert torch.equal(again.model.lm_head.weight, loaded.model.lm_head.weight)


def test_cache_dir_follows_bae_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("BAE_CACHE_DIR", str(tmp_path))
    assert embedded_model_folder().parent == tmp_path / "models"
    assert embedded_model_folder(tmp_path / "elsewhere").parent == tmp_path / "elsewhere"


def test_concurrent_conversions_with_a_crashed_leftover_give_one_complete_folder(loaded, tmp_path):
    folder = embedded_model_folder(tmp_path)
    # What a conversion killed mid-write leaves behind: a temporary sibling with part of the files.
    leftover = folder.with_name(f".{folder.name}.tmp-crashed-1-00000000")
    leftover.mkdir(parents=True)
    (leftover / "config.json").write_text("{")
    two_hours_ago = time.time() - 7200
    os.utime(leftover, (two_hours_ago, two_hours_ago))

    code = f"from bae_core.data.lm import load_model; print(load_model(cache_dir={str(tmp_path)!r}).revision)"
    procs = [
        subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    results = [proc.communicate(timeout=240) for proc in procs]
    for proc, (out, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err.decode()[-2000:]
        assert out.decode().strip() == loaded.revision

    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]  # leftover and temporaries gone
    converted = load_model(cache_dir=tmp_path)
    for (name, param), (_, reference) in zip(
        converted.model.named_parameters(), loaded.model.named_parameters(), strict=True
    ):
        assert torch.equal(param, reference), name


def test_unreachable_hub_model_names_it_and_suggests_the_embedded_default():
    # huggingface_hub reads HF_HUB_OFFLINE when imported, hence a fresh process.
    code = "from bae_core.data.lm import load_model; load_model('bae-frontier/no-such-model')"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    last_line = proc.stderr.strip().splitlines()[-1]
    assert last_line.startswith("OSError: model 'bae-frontier/no-such-model': could not be downloaded")
    assert EMBEDDED_MODEL in last_line


# ---- hookpoints ---------------------------------------------------------------------------------------------------


def test_hookpoints_resolve_to_modules_and_widths(loaded):
    mlp, residual = resolve_hookpoints(loaded, ["layers.3.mlp", "layers.29"])
    assert (mlp.layer, mlp.kind, mlp.module_path, mlp.has_input, mlp.d_in, mlp.d_out) == (
        3,
        "mlp",
        "model.layers.3.mlp",
        True,
        576,
        576,
    )
    assert (residual.layer, residual.kind, residual.module_path, residual.has_input, residual.d_in) == (
        29,
        "residual",
        "model.layers.29",
        False,
        None,
    )
    assert [h.name for h in resolve_hookpoints(loaded, loaded.hookpoints)] == loaded.hookpoints


@pytest.mark.parametrize(
    "names, pattern",
    [
        (["layers.40.mlp"], r"hookpoint 'layers.40.mlp': layer 40 is out of range \(the model has 30\)"),
        (["layers.30"], r"hookpoint 'layers.30': layer 30 is out of range"),
        (["layers.3.attn"], r"hookpoint 'layers.3.attn': unknown"),
        (["layer.3"], r"hookpoint 'layer.3': unknown"),
        (["layers.-1"], r"hookpoint 'layers.-1': unknown"),
        (["layers.03.mlp"], r"hookpoint 'layers.03.mlp': unknown"),
        (["layers.2", "layers.3.mlp", "layers.2"], r"hookpoint 'layers.2': named more than once"),
    ],
)
def test_bad_hookpoint_names_the_name_and_the_valid_forms(loaded, names, pattern):
    with pytest.raises(ValueError, match=pattern) as info:
        resolve_hookpoints(loaded, names)
    if "more than once" not in pattern:
        assert "valid: layers.0 ... layers.29 (residual stream after the layer)" in str(info.value)
        assert "layers.0.mlp ... layers.29.mlp (MLP input/output)" in str(info.value)


def test_a_single_string_is_not_a_list_of_hookpoints(loaded):
    with pytest.raises(ValueError, match=r"names: a list of hookpoint names, got the string 'layers.3'"):
        resolve_hookpoints(loaded, "layers.3")


# ---- capture ------------------------------------------------------------------------------------------------------


def test_capture_matches_a_full_forward(loaded, batch):
    input_ids, mask = batch
    hooks = resolve_hookpoints(loaded, ["layers.2", "layers.5.mlp"])
    acts = capture(loaded, input_ids, hooks, attention_mask=mask)

    b, t = input_ids.shape
    assert set(acts) == {"layers.2", "layers.5.mlp"}
    assert set(acts["layers.2"]) == {"output"} and set(acts["layers.5.mlp"]) == {"input", "output"}
    for columns in acts.values():
        for tensor in columns.values():
            assert tensor.shape == (b, t, 576) and tensor.dtype == torch.float32 and tensor.device.type == "cpu"
            assert not tensor.is_inference()  # usable as training data outside inference mode

    with torch.inference_mode():
        full = loaded.model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
        recomputed = loaded.layers[5].mlp(acts["layers.5.mlp"]["input"])
    assert torch.equal(acts["layers.2"]["output"], full.hidden_states[3])  # [0] is the embedding
    torch.testing.assert_close(acts["layers.5.mlp"]["output"], recomputed, rtol=0, atol=1e-6)


def test_capture_stops_after_the_deepest_layer_and_removes_its_hooks(loaded, batch):
    input_ids, _ = batch
    calls = [0] * loaded.num_layers
    hooks_before = [dict(layer._forward_hooks) for layer in loaded.layers]
    counters = [
        layer.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, layer in enumerate(loaded.layers)
    ]
    try:
        capture(loaded, input_ids, resolve_hookpoints(loaded, ["layers.4.mlp", "layers.1"]))
    finally:
        for handle in counters:
            handle.remove()
    assert calls == [1] * 5 + [0] * 25
    assert [dict(layer._forward_hooks) for layer in loaded.layers] == hooks_before
    assert all(not layer.mlp._forward_hooks for layer in loaded.layers)

    # An error mid-forward leaves no hook behind either: a full forward afterwards runs to the logits.
    with pytest.raises(IndexError):
        capture(loaded, torch.full_like(input_ids, 10**6), resolve_hookpoints(loaded, ["layers.4.mlp"]))
    assert logits_of(loaded, input_ids).shape == (*input_ids.shape, loaded.model.config.vocab_size)


# ---- splice and ablation ------------------------------------------------------------------------------------------


def random_coder(kind: str, dtype: torch.dtype) -> SparseCoder:
    """A real coder with random weights, so that its reconstruction visibly changes the model's output."""
    torch.manual_seed(0)
    d_out = 576 if kind != "sae" else None
    coder = SparseCoder(CoderConfig(kind=kind, k=16, num_latents=1024), 576, d_out, dtype=dtype)
    with torch.no_grad():
        coder.W_dec.normal_(std=0.05)  # transcoders start from a zero decoder
        coder.b_dec.normal_(std=0.05)
        if coder.W_skip is not None:
            coder.W_skip.normal_(std=0.02)
    return coder.train()  # splice must switch it to eval mode, and back


@pytest.mark.parametrize(
    "kind, name, dtype",
    [
        ("sae", "layers.6.mlp", torch.float32),
        ("skip_transcoder", "layers.6.mlp", torch.bfloat16),
        ("sae", "layers.6", torch.float32),
    ],
)
def test_splice_replaces_the_output_with_the_coders_reconstruction(loaded, batch, kind, name, dtype):
    input_ids, mask = batch
    (hook,) = resolve_hookpoints(loaded, [name])
    coder = random_coder(kind, dtype)
    clean = logits_of(loaded, input_ids, mask)

    # The same computation by hand: capture the module's activations, reconstruct them with the coder, and
    # run the model with a plain forward hook that returns that reconstruction.
    acts = capture(loaded, input_ids, [hook], attention_mask=mask)[name]
    flat = {column: t.reshape(-1, 576).to(dtype) for column, t in acts.items()}
    with torch.no_grad():
        coder.eval()
        y_hat = coder(flat["input"], flat["output"]) if kind != "sae" else coder(flat["output"])
        coder.train()
    expected_output = y_hat.output.float().reshape(acts["output"].shape)
    handle = loaded.model.get_submodule(hook.module_path).register_forward_hook(lambda *_: expected_output)
    try:
        expected = logits_of(loaded, input_ids, mask)
    finally:
        handle.remove()

    with splice(loaded, hook, coder):
        spliced = logits_of(loaded, input_ids, mask)
        assert not coder.training
    assert coder.training
    torch.testing.assert_close(spliced, expected, rtol=0, atol=1e-5)
    assert (spliced - clean).abs().max() > 1.0  # a random coder visibly breaks the model
    assert torch.equal(logits_of(loaded, input_ids, mask), clean)  # untouched once the context exits


@pytest.mark.parametrize("name", ["layers.0.mlp", "layers.3"])
def test_zero_ablation_raises_the_loss_and_is_undone(loaded, name):
    text = "The capital of France is Paris. The capital of Germany is Berlin."
    ids = loaded.tokenizer(text, return_tensors="pt").input_ids
    (hook,) = resolve_hookpoints(loaded, [name])

    def loss() -> float:
        logits = logits_of(loaded, ids)
        return F.cross_entropy(logits[0, :-1], ids[0, 1:]).item()

    clean = loss()
    with zero_ablate(loaded, hook):
        ablated = loss()
    assert ablated > clean + 2.0  # measured: 1.7 -> 11.2 (first MLP), 10.8 (residual stream)
    assert loss() == clean


def test_splice_refuses_a_coder_that_does_not_fit(loaded):
    mlp, residual = resolve_hookpoints(loaded, ["layers.6.mlp", "layers.6"])
    narrow = SparseCoder(CoderConfig(k=4, num_latents=64), 32)
    with (
        pytest.raises(ValueError, match=r"d_in=32, d_out=32 does not fit hookpoint 'layers.6.mlp'.*d_in=576"),
        splice(loaded, mlp, narrow),
    ):
        pass
    transcoder = SparseCoder(CoderConfig(kind="transcoder", k=4, num_latents=64), 576, 576)
    with (
        pytest.raises(ValueError, match=r"a transcoder predicts .* hookpoint 'layers.6' \(the residual stream\)"),
        splice(loaded, residual, transcoder),
    ):
        pass
