# Two commands do all set-up on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
WORKERS ?= 2
MODEL ?=
DATA ?= ../shared/data/cifar10-jpeg
OUT ?= runs/cifar10
PRESET ?= fast

.PHONY: serve test train lint system-deps clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Core dependencies only: the server never needs TensorFlow.
$(VENV)/.core: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.full: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[train,dev,postgres]'
	touch $(VENV)/.core $@

# Debian packages the tests drive: Chromium for the browser test, nginx for the replica set-up,
# PostgreSQL for the shared feedback store (the tests start their own server, as user postgres).
system-deps:
	@if ! command -v chromium >/dev/null || ! command -v nginx >/dev/null \
			|| ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium nginx \
			postgresql; \
	fi

serve: $(VENV)/.core
	$(BIN)/convnet serve --host $(HOST) --port $(PORT) --workers $(WORKERS) $(if $(MODEL),--model $(MODEL))

test: $(VENV)/.full system-deps
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy
	$(BIN)/python -m pytest

train: $(VENV)/.full
	$(BIN)/convnet train --data $(DATA) --preset $(PRESET) --out $(OUT)

lint: $(VENV)/.full
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
