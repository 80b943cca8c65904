PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup test test-fast lock

setup: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c requirements.lock -e '.[dev]'
	touch $@

test: setup
	$(BIN)/python -m pytest -v --timeout=1800

test-fast: setup
	$(BIN)/python -m pytest -v -m "not heavy"

lock:
	$(BIN)/pip freeze --exclude-editable | grep -v '^-e' > requirements.lock
