# Two entry points for a fresh machine: `make serve` and `make test`. Both create .venv and
# install what they need. torch is pinned first so pip takes the local wheel where one exists
# (a CPU build here; on a GPU machine pip resolves the CUDA build).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
MODEL ?=
ARGS ?=

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.serve: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test,rtx,ray]"
	touch $@ $(VENV)/.serve

.PHONY: serve test install clean
install: $(VENV)/.serve

serve: $(VENV)/.serve
	$(BIN)/omni serve $(MODEL) $(ARGS)

test: $(VENV)/.test
	$(BIN)/python -m pytest -q -ra --durations=12 $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
