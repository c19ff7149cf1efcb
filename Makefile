# The two commands of the README. `make setup` is idempotent and installs into .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0

.PHONY: setup run test lint gptoss-nano

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

setup: $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH_PIN)
	$(BIN)/pip install --quiet -e '.[test]'

run: setup
	$(BIN)/gptoss generate --temperature 0 "Write a Python function \`is_prime(n)\` to return True if n is prime."

# Rebuild the bundled demonstration model from its recipe (58 minutes measured on 2 CPU cores).
gptoss-nano: setup
	$(BIN)/python recipes/gptoss_nano.py --out runs/gptoss-nano
	cp runs/gptoss-nano/model/* src/gptoss/models/gptoss-nano/

test: setup
	$(BIN)/ruff check .
	GPTOSS_REQUIRE_NATIVE=1 $(BIN)/pytest -q
