"""Sweep specs: the shipped specs validate, bad specs fail naming the field, and `--dry-run` prints the plan."""

from pathlib import Path

import pytest
import yaml

from ray_jobs.cli import main
from ray_jobs.plan import describe_plan
from ray_jobs.spec import SpecError, load_spec, parse_spec

SWEEPS = Path(__file__).resolve().parent.parent / "sweeps"


def small(**sections) -> dict:
    spec = {
        "name": "t",
        "cache": {"hookpoints": ["layers.3.mlp"], "seq_len": 32, "train_tokens": 1024, "heldout_tokens": 256},
        "coder": {"expansion_factor": 2},
        "space": {"activation": ["topk", "binary_topk"], "k": [4, 8]},
        "training": {"steps": 20, "batch_size": 64, "checkpoint_every": 10},
    }
    for key, value in sections.items():
        if value is None:
            spec.pop(key, None)
        elif isinstance(value, dict) and isinstance(spec.get(key), dict):
            # A key given as None is removed from the section.
            merged = {**spec[key], **value}
            spec[key] = {k: v for k, v in merged.items() if v is not None}
        else:
            spec[key] = value
    return spec


def test_shipped_specs_validate_and_the_papers_grid_has_192_trials():
    quick = load_spec(SWEEPS / "quickstart.yaml")
    assert quick.num_trials() == 8 and quick.hookpoints == ["layers.9.mlp"]
    assert {p["activation"] for p in quick.grid()} == {"topk", "binary_topk"}
    assert {p["kind"] for p in quick.grid()} == {"sae", "skip_transcoder"}
    paper = load_spec(SWEEPS / "paper_smollm2_135m.yaml")
    assert paper.num_trials() == 4 * 2 * 2 * 4 * 3
    assert paper.cache["model"] == "HuggingFaceTB/SmolLM2-135M"
    assert {p["k"] for p in paper.grid()} == {16, 32, 64, 128}
    assert paper.coder["expansion_factor"] == 64


def test_trial_settings_combine_fixed_and_searched_values():
    spec = parse_spec(small(train={"optimizer": "adam"}, space={"lr": [1e-3], "k": [4]}))
    hookpoint, coder, train = spec.trial_settings(
        {"hookpoint": "layers.3.mlp", "activation": "topk", "k": 4, "lr": 1e-3}
    )
    assert hookpoint == "layers.3.mlp"
    assert coder == {"expansion_factor": 2, "activation": "topk", "k": 4}
    assert train == {"optimizer": "adam", "lr": 1e-3}
    assert spec.run_dir == "runs/t" and spec.cache_root == "runs/t/cache"


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"bogus": 1}, r"bogus: unknown setting; allowed: name, description, output, cache"),
        ({"name": None}, r"name: required"),
        ({"name": "has space"}, r"name: String should match pattern"),
        (
            {"search": {"algorithm": "random"}},
            r"search\.algorithm: Input should be 'grid' or 'optuna' \(got 'random'\)",
        ),
        ({"search": {"objectives": {"auroc": "max"}}}, r"search\.objectives\.auroc: Input should be 'fvu', 'l0'"),
        ({"search": {"objectives": {"fvu": "lowest"}}}, r"search\.objectives\.fvu: Input should be 'min' or 'max'"),
        ({"training": {"steps": 0}}, r"training\.steps: Input should be greater than 0 \(got 0\)"),
        ({"training": {"stepz": 10}}, r"training\.stepz: unknown setting; allowed: steps, batch_size"),
        ({"resources": {"cpus_per_worker": 0}}, r"resources\.cpus_per_worker: Input should be greater than 0"),
        ({"resources": {"gpus_per_worker": -1}}, r"resources\.gpus_per_worker: Input should be greater than or equal"),
        (
            {"cache": {"hookpoints": ["layers.3.mlp"], "sq_len": 3}},
            r"cache\.sq_len: unknown setting; allowed: .*seq_len",
        ),
        ({"cache": {"hookpoints": None}}, r"cache\.hookpoints: required"),
        ({"cache": {"dtype": "int8"}}, r"cache\.dtype: 'int8' is not allowed; choose one of float16"),
        ({"coder": {"widht": 3}}, r"coder\.widht: unknown setting; allowed: activation, kind, k"),
        ({"train": {"optimizer": "sgd"}}, r"train\.optimizer: 'sgd' is not allowed; choose one of signum, adam"),
        ({"coder": {"kind": "crosscoder"}}, r"coder\.kind: 'crosscoder' is not allowed; choose one of sae"),
        ({"train": {"device": "cuda"}}, r"train\.device: unknown setting"),
        ({"space": {"actvation": ["topk"]}}, r"space\.actvation: not a searchable setting; choose from hookpoint"),
        ({"space": {"activation": ["topk", "binary_topkk"]}}, r"space\.activation: 'binary_topkk' is invalid: .*"),
        ({"space": {"k": []}}, r"space\.k: give a non-empty list of values"),
        ({"space": {"k": 8}}, r"space\.k: give a non-empty list of values, or one of \{uniform: \[low, high\]\}"),
        (
            {"space": {"k": {"int": [4, 8]}}},
            r"space\.k: grid search needs a list of values; .*search\.algorithm: optuna",
        ),
        ({"space": {"expansion_factor": [2]}}, r"space\.expansion_factor: also fixed in coder; keep it in one"),
        ({"space": {"hookpoint": ["layers.4.mlp"]}}, r"space\.hookpoint: layers\.4\.mlp not in cache\.hookpoints"),
        ({"training": {"checkpoint_every": 50}}, r"training\.checkpoint_every: 50 is more than training\.steps \(20\)"),
        ({"resources": {"workers": 3}}, r"training\.batch_size: 64 does not split evenly over resources\.workers=3"),
        (
            {"search": {"objectives": {"fvu": "min", "lexical_auroc": "max"}}, "scoring": {"trial_latents": 0}},
            r"scoring\.trial_latents: search\.objectives names lexical_auroc, .*give it a positive number",
        ),
        ({"scoring": {"lm_dtype": "int8"}}, r"scoring\.lm_dtype: Input should be 'float32', 'bfloat16' or 'float16'"),
        ({"scoring": {"ablation_bin": 3}}, r"scoring\.ablation_bin: unknown setting; allowed: trial_latents"),
    ],
)
def test_bad_spec_names_the_field(change, pattern):
    with pytest.raises(SpecError, match=rf"^spec x\.yaml: {pattern}"):
        parse_spec(small(**change), "x.yaml")


def test_k_above_the_dictionary_names_the_trial_once_the_width_is_known():
    # The dictionary size (2 x d_in) is known only once the hookpoint's width is: the sweep checks every
    # grid point against the cache's widths before it starts any trial.
    spec = parse_spec(small(space={"k": [4, 2048]}))
    spec.check_trial({"k": 4}, d_in=576)
    with pytest.raises(
        SpecError, match=r"the trial with k=2048 is invalid: k: must be smaller than the number of latents \(1152\)"
    ):
        spec.check_trial({"k": 2048}, d_in=576)


@pytest.mark.parametrize(
    ("space", "pattern"),
    [
        ({"lr": {"loguniform": [0, 1e-2]}}, r"space\.lr\.loguniform: a log scale needs low > 0"),
        ({"lr": {"uniform": [1e-2, 1e-3]}}, r"space\.lr\.uniform: give \[low, high\] with low < high"),
        ({"k": {"int": [4.5, 8]}}, r"space\.k\.int: bounds must be integers"),
        ({"k": {"normal": [4, 8]}}, r"space\.k: a distribution is one of \{uniform: \[low, high\]\}"),
    ],
)
def test_bad_distribution_names_the_field(space, pattern):
    with pytest.raises(SpecError, match=pattern):
        parse_spec(small(space=space, search={"algorithm": "optuna", "num_samples": 4}))


def test_unreadable_and_malformed_files_name_the_file(tmp_path):
    with pytest.raises(SpecError, match=r"spec .*missing\.yaml: cannot read it"):
        load_spec(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match=r"spec .*bad\.yaml: not valid YAML"):
        load_spec(bad)
    bad.write_text("- a list\n")
    with pytest.raises(SpecError, match=r"spec .*bad\.yaml: expected a mapping of sections"):
        load_spec(bad)


def test_dry_run_of_the_quickstart_lists_every_trial_with_its_size(capsys):
    assert main(["sweep", str(SWEEPS / "quickstart.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "grid, 8 trials (1 x 8 combinations)" in out
    rows = [r for r in map(str.split, out.splitlines()) if r[:1] and r[0].isdigit() and r[1].startswith("layers.")]
    assert len(rows) == 8
    # hookpoint activation kind k latents parameters memory: 4x expansion of the 576-wide MLP input.
    assert {tuple(r[1:5]) for r in rows} == {
        ("layers.9.mlp", a, kind, k)
        for a in ("topk", "binary_topk")
        for kind in ("sae", "skip_transcoder")
        for k in ("16", "32")
    }
    assert {r[5] for r in rows} == {"2,304"}
    # SAE: 2 x 2304 x 576 + 2304 + 576 = 2.66M; the skip transcoder adds 576 x 576.
    assert {r[6] for r in rows if r[3] == "sae"} == {"2.7M"} and {r[6] for r in rows if r[3] == "skip_transcoder"} == {
        "3.0M"
    }


def test_dry_run_of_the_papers_spec_works_offline(capsys):
    assert main(["sweep", str(SWEEPS / "paper_smollm2_135m.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "192 trials" in out and "HuggingFaceTB/SmolLM2-135M" in out
    assert "1 worker(s) x (4 CPU, 1 GPU)" in out
    assert "(each of the 64 combinations runs 3 times)" not in out  # seeds are a searched axis, not num_samples
    rows = [r for r in map(str.split, out.splitlines()) if r[:1] and r[0].isdigit() and r[1].startswith("layers.")]
    assert len(rows) == 192
    # The cost (tests/test_plan_cost.py checks its figures): the cache's size, what the trials read, the hours.
    cost = " ".join(out[out.index("\ncost ") :].split())
    assert "in all 471 GB" in cost and "12 read output (226 GB each); 12 read input + output (453 GB each)" in cost
    assert "GPU-hours computing" in cost and "core-hours packing and writing 471 GB" in cost
    widths = " ".join(out.split())  # offline, the hub model's shape is the embedded model's (the same architecture)
    assert "widths the embedded SmolLM2-135M-Instruct's config" in widths or "widths the model's config" in widths


def test_cli_reports_a_bad_spec_and_exits_2(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(small(search={"algorithm": "random"})))
    assert main(["sweep", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "bae sweep: error: spec" in err and "search.algorithm" in err and "'grid' or 'optuna'" in err


def test_optuna_plan_lists_the_distributions():
    spec = parse_spec(
        small(
            space={"k": {"logint": [4, 16]}, "lr": {"loguniform": [1e-4, 1e-2]}},
            train={"optimizer": "adam"},
            search={"algorithm": "optuna", "num_samples": 6, "objectives": {"fvu": "min", "dead_fraction": "min"}},
        )
    )
    plan = describe_plan(spec, {"layers.3.mlp": {"input": 576, "output": 576}})
    assert "optuna (TPE, multi-objective), 6 trials, seed 0" in plan
    assert "k: {'logint': [4, 16]}" in plan and "objectives fvu (min), dead_fraction (min)" in plan
