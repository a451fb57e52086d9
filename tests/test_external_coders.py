"""Coders from elsewhere: checkpoints written by the real sparsify and SAELens packages are imported into a copy of
the quickstart run (`bae import`), give the package's own codes and outputs on the run's cached activations, and
are scored beside the run's coders (`bae score` scores only them); `bae export --format saelens` writes folders
that `sae_lens.SAE.load_from_disk` reads back to the same codes and outputs; what cannot be represented is
refused by name."""

import contextlib
import io
import json
import shutil

import pandas as pd
import pytest
import torch

from analysis.report import write_report
from bae_core.coders.coder import SparseCoder
from bae_core.coders.config import CoderConfig
from bae_core.data.reader import iter_activation_batches
from ray_jobs.cli import main

HOOK = "layers.9.mlp"
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
RTOL = 1e-4  # of the largest value the package computes (float32)


def trained(run, activation: str, kind: str, k: int) -> tuple[str, SparseCoder]:
    trials = pd.read_parquet(run / "trials.parquet")
    row = trials[(trials.activation == activation) & (trials.kind == kind) & (trials.k == k)].iloc[0]
    return row.trial_id, SparseCoder.load(run / row.checkpoint)


def heldout(run, transcoder: bool = False) -> torch.Tensor:
    batches = iter_activation_batches(
        str(run / "cache"), HOOK, split="heldout", transcoder=transcoder, shuffle_seed=None
    )
    return torch.cat([b[0] if transcoder else b for b in batches])


def compare(ours: SparseCoder, codes: torch.Tensor, outputs: torch.Tensor, x: torch.Tensor) -> dict:
    """Our coder against a package's dense codes and outputs on x: max differences and differing supports."""
    ours.eval()
    with torch.no_grad():
        code = ours.encode(x)
        mine, out = code.to_dense(ours.num_latents), ours.decode(code, x)
    codes, outputs = codes.detach(), outputs.detach()
    return {
        "code": float((mine - codes).abs().max()),
        "output": float((out - outputs).abs().max()),
        "code_scale": float(codes.abs().max()),
        "output_scale": float(outputs.abs().max()),
        "support": int(((mine != 0) != (codes != 0)).any(1).sum()),
    }


def assert_same(d: dict) -> None:
    assert d["support"] == 0, d
    assert d["code"] <= RTOL * d["code_scale"] and d["output"] <= RTOL * d["output_scale"], d


def copy_weights(sae, coder: SparseCoder, latents: int) -> None:
    with torch.no_grad():
        sae.W_enc.copy_(coder.encoder.weight[:latents].T)
        sae.b_enc.copy_(coder.encoder.bias[:latents])
        sae.W_dec.copy_(coder.W_dec[:latents])
        sae.b_dec.copy_(coder.b_dec)
        if coder.W_skip is not None:
            sae.W_skip.copy_(coder.W_skip)


def write_sources(run, root):
    """Real checkpoints, from the run's own trained weights (so their codes are realistic on its cache)."""
    with contextlib.redirect_stdout(io.StringIO()):
        import sparsify
    from sae_lens import (
        GatedSAE,
        GatedSAEConfig,
        JumpReLUSAE,
        JumpReLUSAEConfig,
        JumpReLUSkipTranscoder,
        JumpReLUSkipTranscoderConfig,
        StandardSAE,
        StandardSAEConfig,
        TopKSAE,
        TopKSAEConfig,
    )
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    _, sae16 = trained(run, "topk", "sae", 16)
    _, tc16 = trained(run, "topk", "skip_transcoder", 16)
    x = heldout(run)
    # sparsify's load_many layout: one folder per hookpoint, one of them not in the run's cache.
    for hook in (HOOK, "layers.3.mlp"):
        coder = sparsify.SparseCoder(576, sparsify.SparseCoderConfig(k=16, num_latents=576))
        coder.load_state_dict(sae16.state_dict())
        coder.save_to_disk(root / "sparsify_many" / hook)
    skip = sparsify.SparseCoder(
        576, sparsify.SparseCoderConfig(k=16, num_latents=576, transcode=True, skip_connection=True)
    )
    skip.load_state_dict(tc16.state_dict())
    skip.save_to_disk(root / "sparsify_skip")

    meta = lambda hook="blocks.9.hook_mlp_out": SAEMetadata(hook_name=hook, model_name=MODEL)  # noqa: E731
    pre = ((x - sae16.b_dec) @ sae16.encoder.weight[:128].T + sae16.encoder.bias[:128]).detach()
    saes = {
        "standard": StandardSAE(StandardSAEConfig(d_in=576, d_sae=64, metadata=meta())),
        # folded at import: the decoder-norm rescaling and an encoder that does not subtract b_dec
        "topk": TopKSAE(
            TopKSAEConfig(
                d_in=576, d_sae=128, k=8, rescale_acts_by_decoder_norm=True, apply_b_dec_to_input=False, metadata=meta()
            )
        ),
        "jumprelu": JumpReLUSAE(JumpReLUSAEConfig(d_in=576, d_sae=128, metadata=meta())),
        "jumprelu_skip": JumpReLUSkipTranscoder(
            JumpReLUSkipTranscoderConfig(
                d_in=576,
                d_sae=128,
                d_out=576,
                apply_b_dec_to_input=False,
                metadata=meta("blocks.9.ln2.hook_normalized"),
            )
        ),
    }
    for name, sae in saes.items():
        copy_weights(sae, tc16 if name == "jumprelu_skip" else sae16, sae.cfg.d_sae)
    with torch.no_grad():
        saes["topk"].W_dec.mul_(torch.linspace(0.5, 2.0, 128)[:, None])  # decoder rows of other norms than 1
        threshold = pre.quantile(0.95, dim=0)  # each latent fires on about 5% of tokens
        threshold[:4] = -0.1  # at or below zero a JumpReLU is a ReLU
        saes["jumprelu"].threshold.copy_(threshold)
        saes["jumprelu_skip"].threshold.copy_(threshold.clamp_min(0))
    for name, sae in saes.items():
        sae.save_model(root / f"saelens_{name}")
    batchtopk = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=576, d_sae=128, k=8, metadata=meta()))
    copy_weights(batchtopk, sae16, 128)
    batchtopk.topk_threshold = torch.tensor(float(pre.relu().quantile(0.9)), dtype=torch.double)
    batchtopk.save_inference_model(root / "saelens_batchtopk")  # SAELens writes it as a jumprelu SAE
    # Refused by name: an architecture, a normalisation and a sparsify option no SparseCoder computes.
    GatedSAE(GatedSAEConfig(d_in=576, d_sae=64, metadata=meta())).save_model(root / "saelens_gated")
    StandardSAE(StandardSAEConfig(d_in=576, d_sae=64, normalize_activations="layer_norm", metadata=meta())).save_model(
        root / "saelens_layer_norm"
    )
    sparsify.SparseCoder(576, sparsify.SparseCoderConfig(k=8, num_latents=64, skip_connection=True)).save_to_disk(
        root / "sparsify_sae_skip"
    )
    StandardSAE(StandardSAEConfig(d_in=64, d_sae=32, metadata=meta())).save_model(root / "saelens_narrow")


@pytest.fixture(scope="module")
def sources(quickstart_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("external")
    write_sources(quickstart_run[0], root)
    return root


@pytest.fixture(scope="module")
def spare_run(quickstart_run, tmp_path_factory):
    """A copy of the quickstart run for the tests whose imports fail (they take its lock while they check)."""
    run = tmp_path_factory.mktemp("spare") / "run"
    shutil.copytree(quickstart_run[0], run, ignore=shutil.ignore_patterns("tune", "report"))
    return run


def reference(folder, x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The package's own dense codes and outputs on x."""
    with torch.no_grad():
        if fmt == "sparsify":
            with contextlib.redirect_stdout(io.StringIO()):
                import sparsify
            coder = sparsify.SparseCoder.load_from_disk(folder)
            out = coder(x)
            codes = torch.zeros(len(x), coder.num_latents).scatter_(1, out.latent_indices, out.latent_acts)
            return codes, out.sae_out
        from sae_lens import SAE

        sae = SAE.load_from_disk(folder)
        return sae.encode(x), sae(x)


def test_imported_coders_compute_what_their_package_computes(quickstart_run, sources, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(quickstart_run[0], run)
    imports = [
        ("sparsify_many", "sparsify", "topk", "sae", "sparsify_many-layers.9.mlp"),
        ("sparsify_skip", "sparsify", "topk", "skip_transcoder", "sparsify_skip"),
        ("saelens_standard", "saelens", "jumprelu", "sae", "saelens_standard"),
        ("saelens_topk", "saelens", "topk", "sae", "saelens_topk"),
        ("saelens_jumprelu", "saelens", "jumprelu", "sae", "saelens_jumprelu"),
        ("saelens_batchtopk", "saelens", "batchtopk", "sae", "saelens_batchtopk"),
        ("saelens_jumprelu_skip", "saelens", "jumprelu", "skip_transcoder", "saelens_jumprelu_skip"),
    ]
    for folder, *_ in imports:
        extra = ["--hookpoint", HOOK] if folder == "sparsify_skip" else []  # a lone folder that names no hookpoint
        assert main(["import", str(run), str(sources / folder), *extra]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert (
        "saelens_topk: saelens topk as a topk sae (k=8, 128 latents) at layers.9.mlp (from blocks.9.hook_mlp_out)"
        in out
    )
    assert "saelens_standard: saelens standard as a jumprelu sae" in out  # a ReLU: a jumprelu at threshold 0
    table = pd.read_parquet(run / "imported.parquet").set_index("name")
    assert len(table) == len(imports)  # the load_many folder's layers.3.mlp is not in the cache: not imported
    measured = {}
    for folder, fmt, activation, kind, name in imports:
        row = table.loc[name]
        assert (row.format, row.activation, row.kind, row.hookpoint) == (fmt, activation, kind, HOOK), name
        assert row.check_ok and row.check_support_mismatch == 0 and row.check_tokens == 2048, name
        coder = SparseCoder.load(run / row.checkpoint)
        x = heldout(run, coder.cfg.is_transcoder)
        source = sources / folder / (HOOK if folder == "sparsify_many" else "")
        measured[name] = compare(coder, *reference(source, x, fmt), x)
        assert_same(measured[name])
    with capsys.disabled():  # the measured differences, for the record (-s)
        print(json.dumps(measured, indent=1))
    assert "rescale_acts_by_decoder_norm" in table.loc["saelens_topk", "conversion"]
    assert table.loc["saelens_batchtopk", "k"] == 8  # SAELens' training k, kept in its metadata
    assert table.loc["saelens_jumprelu", "k"] == round(table.loc["saelens_jumprelu", "l0"])  # k of a jumprelu: its L0
    # The sparsify skip transcoder holds a trained one's weights: its held-out FVU and L0 are the trial's.
    trials = pd.read_parquet(run / "trials.parquet").set_index("trial_id")
    original = trials.loc[trained(run, "topk", "skip_transcoder", 16)[0]]
    assert table.loc["sparsify_skip", ["fvu", "l0"]].tolist() == pytest.approx([original.fvu, original.l0], rel=1e-5)

    # Importing the same source again replaces its row; another source under a name already taken is refused.
    assert main(["import", str(run), str(sources / "saelens_topk")]) == 0
    assert len(pd.read_parquet(run / "imported.parquet")) == len(imports)
    assert main(["import", str(run), str(sources / "saelens_standard"), "--name", "saelens_topk"]) == 2
    assert "imported-saelens_topk is already imported from saelens:" in capsys.readouterr().err


@pytest.mark.parametrize(
    "folder, expected",
    [
        ("saelens_gated", "SAELens architecture 'gated' is not supported"),
        ("saelens_layer_norm", "SAELens normalize_activations='layer_norm' is not supported"),
        ("sparsify_sae_skip", "sparsify skip_connection on an SAE (transcode false) is not supported"),
        ("saelens_narrow", "width mismatch at layers.9.mlp: the coder maps 64 -> 64, the cache holds 576 -> 576"),
    ],
)
def test_what_a_coder_cannot_compute_is_refused_by_name(spare_run, sources, folder, expected, capsys):
    assert main(["import", str(spare_run), str(sources / folder)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("bae import: error: ") and expected in line, line
    assert not (spare_run / "imported.parquet").exists()


def test_a_hub_repo_offline_is_one_clear_line(spare_run, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["import", str(spare_run), "EleutherAI/sae-SmolLM2-135M-64x"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "the hub repo EleutherAI/sae-SmolLM2-135M-64x could not be downloaded (HF_HUB_OFFLINE is set)" in line


def test_bae_score_scores_only_the_imported_coders_beside_the_trained_ones(
    local_ray, quickstart_run, sources, tmp_path, capsys
):
    run = tmp_path / "run"
    shutil.copytree(quickstart_run[0], run)
    assert main(["import", str(run), str(sources / "sparsify_many")]) == 0
    before = {p.name: p.stat().st_mtime_ns for p in (run / "scores").glob("*.parquet")}
    # `bae score --coder SOURCE` imports SOURCE first: the same as `bae import RUN SOURCE`, then `bae score RUN`.
    assert main(["score", str(run), "--coder", str(sources / "saelens_jumprelu")]) == 0
    err = capsys.readouterr().err
    assert "imported imported-saelens_jumprelu (saelens:" in err
    assert "[4/4]" in err and "redoing" not in err  # 2 lexical + 2 fidelity stages: only the imported coders
    assert {p.name: p.stat().st_mtime_ns for p in (run / "scores").glob("*.parquet") if p.name in before} == before

    coders = pd.read_parquet(run / "coders.parquet").set_index("coder_id")
    latents = pd.read_parquet(run / "latents.parquet")
    copy = coders.loc["imported-sparsify_many-layers.9.mlp"]
    assert copy.origin == f"sparsify:{sources.resolve()}/sparsify_many/layers.9.mlp"
    assert copy.dictionary == "topk sae (sparsify import)" and pd.isna(copy.trial_id)
    assert coders.loc["imported-saelens_jumprelu", "dictionary"] == "jumprelu sae (saelens import)"
    assert (coders.loc[[c for c in coders.index if not c.startswith("imported-")], "origin"] == "run").all()
    # The sparsify folder holds the trained topk SAE's own weights: a known answer, every number the same.
    trial_id, _ = trained(run, "topk", "sae", 16)
    original = coders.loc[f"trial-{trial_id}"]
    for column in ("token_auroc", "token_auroc_weighted", "l0_heldout", "eligible", "ce_spliced", "fvu", "l0"):
        assert copy[column] == pytest.approx(original[column], rel=1e-5), column
    mine, theirs = (latents[latents.coder_id == c].set_index("latent") for c in (copy.name, original.name))
    assert mine["token_auroc"].equals(theirs["token_auroc"]) and (mine["origin"] != "run").all()
    # The report names them by family and origin, with their k and FVU.
    report = write_report(str(run)).read_text()
    row = next(line for line in report.splitlines() if "continuous SAE (sparsify import)" in line)
    assert f"| {copy.k} |" in row and f"{copy.fvu:.3f}" in row
    assert "(saelens import)" in report


def test_export_to_saelens_round_trips(quickstart_run, tmp_path, capsys):
    from sae_lens import SAE

    from bae_core.coders.saelens import register_saelens

    run = quickstart_run[0]
    x = heldout(run)
    topk_id, topk = trained(run, "topk", "sae", 16)
    binary_id, binary = trained(run, "binary_topk", "sae", 16)
    assert main(["export", str(run), "--trial", topk_id, "--out", str(tmp_path / "topk")]) == 0
    assert json.loads((tmp_path / "topk" / "cfg.json").read_text())["architecture"] == "topk"
    loaded = SAE.load_from_disk(tmp_path / "topk")
    assert loaded.cfg.metadata.hook_name == HOOK
    measured = {"topk": compare(topk, loaded.encode(x).detach(), loaded(x).detach(), x)}

    # Binary latents: no SAELens architecture; refused by name, or written as the registered one.
    assert main(["export", str(run), "--trial", binary_id, "--out", str(tmp_path / "binary")]) == 2
    assert "binary_topk latents are exactly 0 or 1" in capsys.readouterr().err
    args = ["export", str(run), "--trial", binary_id, "--out", str(tmp_path / "binary"), "--custom-architecture"]
    assert main(args) == 0
    register_saelens()
    loaded = SAE.load_from_disk(tmp_path / "binary")
    codes = loaded.encode(x).detach()
    assert set(codes.unique().tolist()) == {0.0, 1.0}
    measured["binary_topk"] = compare(binary, codes, loaded(x).detach(), x)

    # jumprelu and batchtopk coders become SAELens jumprelu SAEs; bae import brings them back as they were.
    for activation in ("jumprelu", "batchtopk"):
        coder = SparseCoder(CoderConfig(activation=activation, k=8, num_latents=576), 576)
        coder.load_state_dict(topk.state_dict(), strict=False)
        coder.eval()
        with torch.no_grad():
            pre = coder.pre_activations(x)
            if activation == "jumprelu":
                coder.log_threshold.copy_(pre.quantile(0.97, dim=0).clamp_min(1e-3).log())
            else:
                coder.batch_threshold.fill_(float(pre.relu().quantile(0.97)))
        coder.save(tmp_path / f"{activation}-coder")
        out = tmp_path / f"{activation}-saelens"
        assert main(["export", str(tmp_path / f"{activation}-coder"), "--out", str(out)]) == 0
        loaded = SAE.load_from_disk(out)
        assert loaded.cfg.architecture() == "jumprelu"
        measured[activation] = compare(coder, loaded.encode(x).detach(), loaded(x).detach(), x)
        copy = tmp_path / f"run-{activation}"
        shutil.copytree(run, copy, ignore=shutil.ignore_patterns("tune", "scores", "evaluation", "report", "llm"))
        assert main(["import", str(copy), str(out), "--hookpoint", HOOK]) == 0
        row = pd.read_parquet(copy / "imported.parquet").iloc[0]
        assert row.activation == activation and row.k == 8  # the k it was trained with, in the metadata
        back = SparseCoder.load(copy / row.checkpoint)
        measured[f"{activation} back"] = compare(back, coder.encode(x).to_dense(576), coder.decode(coder.encode(x)), x)
    with capsys.disabled():  # the measured differences, for the record (-s)
        print(json.dumps(measured, indent=1))
    for d in measured.values():
        assert_same(d)
