# The two commands of the README. `make setup` is idempotent and installs into .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0

.PHONY: setup run test lint

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

setup: $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH_PIN)
	$(BIN)/pip install --quiet -e '.[test]'

run: setup
	$(BIN)/gptoss info gpt-oss-20b

test: setup
	$(BIN)/ruff check .
	GPTOSS_REQUIRE_NATIVE=1 $(BIN)/pytest -q
