"""The layout the README describes: packages by concern, small modules, `bae_core` and `analysis` without Ray."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bae_core", "ray_jobs", "analysis")
MAX_LINES = 420


def modules():
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def test_no_module_is_long():
    long = {str(p.relative_to(ROOT)): n for p in modules() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


@pytest.mark.parametrize("package", ["bae_core", "analysis"])
def test_the_science_and_the_analysis_never_import_ray(package):
    code = (
        "import importlib, pkgutil, sys\n"
        f"import {package}\n"
        f"for m in pkgutil.walk_packages({package}.__path__, '{package}.'):\n"
        "    importlib.import_module(m.name)\n"
        "print(sorted(name for name in sys.modules if name == 'ray' or name.startswith('ray.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"{package} imports Ray: {out.stdout.strip()[:300]}"


def test_the_public_names_of_bae_core_keep_working():
    import bae_core

    for name in bae_core.__all__:
        assert getattr(bae_core, name) is not None
    from bae_core import CoderConfig, SparseCoder, TrainConfig, Trainer, build_coder

    coder = build_coder(CoderConfig(activation="binary_topk", k=2, num_latents=8), 4)
    assert isinstance(coder, SparseCoder) and Trainer(coder, TrainConfig()).coder is coder


def test_the_readme_table_names_every_package_and_module():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## What is where") :]
    for path in modules():
        rel = path.relative_to(ROOT)
        if path.name == "__init__.py" or path.name == "__main__.py":
            continue
        folder = f"`{rel.parent.as_posix()}/`"
        # A module is named in its folder's row (by file name) or by its own path.
        rows = [line for line in table.splitlines() if line.startswith(f"| {folder}") or f"`{rel.as_posix()}`" in line]
        assert rows, f"README 'What is where' has no row for {rel.parent.as_posix()}/ or {rel}"
        assert any(f"`{path.name}`" in row or f"`{rel.as_posix()}`" in row for row in rows), (
            f"README 'What is where' does not name {rel}"
        )
    for folder in re.findall(r"^\| `([a-z_/]+)/`", table, flags=re.M):
        assert (ROOT / folder).is_dir(), f"README 'What is where' names {folder}/, which does not exist"
