PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= dev,quickstart,onnx

.PHONY: setup lint format test test-fast stack-up stack-down stack-status quickstart teardown bench lock

setup: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c requirements.lock -e '.[$(EXTRAS)]'
	touch $@

# ruff's lint rules and its formatter (check only) from pyproject.toml over every Python file of the repository;
# `make format` rewrites the files the check would reject.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .

# The whole suite, heavy tests included (they start their own private stack on free ports).
test: setup
	$(BIN)/python -m pytest -v --timeout=1800 --durations=25

test-fast: setup
	$(BIN)/python -m pytest -v -m "not heavy"

stack-up: setup
	infra/local/stack up

stack-down:
	infra/local/stack down

stack-status:
	infra/local/stack status

# The README's main command: install, bring up the stack, ingest ELPV, search, train, calibrate, promote, serve.
# `make quickstart QUICKSTART_ARGS="--seeds 3"` also trains the recipe over 3 seeds and promotes on their mean.
quickstart:
	@echo "[quickstart $$(date +%H:%M:%S)] 1/7 install: $(VENV) with the pinned set (requirements.lock)"
	@$(MAKE) --no-print-directory setup
	@echo "[quickstart $$(date +%H:%M:%S)] 2/7 stack: SeaweedFS (S3), MLflow server, Ray head on 127.0.0.1"
	infra/local/stack up
	$(BIN)/python jobs/quickstart.py $(QUICKSTART_ARGS)

# Stops the local stack and keeps its data; `make teardown PURGE=1` deletes the data too (S3, MLflow, credentials).
teardown:
	infra/local/stack $(if $(PURGE),purge,down)

bench: setup
	$(BIN)/python bench/bench_inference.py
	$(BIN)/python bench/bench_storage.py

lock:
	$(BIN)/pip freeze --exclude-editable | grep -v '^-e' > requirements.lock
