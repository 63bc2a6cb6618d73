# Two commands do all set-up on a fresh machine (Python 3.11+, a C compiler):
#   make chat   installs into .venv and opens the chat on the embedded default model
#   make test   installs into .venv, lints, and runs the whole test suite
# and, while working: make test-fast (lint, and every test that neither loads a real model nor
# starts a process: marks tests/conftest.py applies) and make typecheck (mypy on engine/, app/).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ccm-chat-installed
PYTHON ?= python3

# llama-cpp-python builds from source: with CUDA when nvcc and an NVIDIA GPU are both present,
# for the CPU otherwise (a CUDA build on a machine without the driver cannot load).
CUDA := $(shell command -v nvcc >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo on)
LLAMA_CMAKE_ARGS := $(if $(CUDA),-DGGML_CUDA=on,)

.PHONY: chat test test-fast lint typecheck install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch pinned first: on the dev machine this takes the CPU build from local disk, where a
	# bare `torch` would pull a multi-GB CUDA build (a CUDA host gets its CUDA build either way)
	$(PY) -m pip install --quiet torch==2.13.0
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

chat: $(STAMP)
	$(VENV)/bin/ccm-chat $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q --durations=25  # the slowest named in the log: what keeps the suite long

test-fast: lint
	$(PY) -m pytest -q -m "not real_model and not subprocess"

# mypy on engine/ and app/ by their installed names (ccm_chat.engine, ccm_chat.app): the
# editable install's import hook is invisible to mypy, so the folders are linked under
# $(VENV)/mypy-src/ccm_chat/ ([tool.mypy] in pyproject.toml). Not yet part of lint or test:
# engine/ and app/ still have errors to fix.
MYPY_SRC := $(VENV)/mypy-src
typecheck: $(STAMP)
	mkdir -p $(MYPY_SRC)/ccm_chat
	for p in app engine ui storage assets training; do ln -sfn $(CURDIR)/$$p $(MYPY_SRC)/ccm_chat/$$p; done
	MYPYPATH=$(MYPY_SRC) $(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
