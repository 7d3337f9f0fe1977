# Two commands for a newcomer: `make test` and `make run`. Both create .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedpower-installed

.PHONY: test test-fast run bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch==2.13.0 first: an unpinned torch would pull a multi-GB CUDA build (see DEVELOPERS.md).
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

run: $(STAMP)
	$(BIN)/python run.py configs/quickstart.yaml

bench: $(STAMP)
	$(BIN)/python benchmarks/codecs.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
