# rlhf_fast: every set-up step lives here.
#
#   make casestudy    the main job: reproduce the reward-hacking incident and its fix
#   make test         the whole test suite
#
# Each creates the virtual environment it needs (.venv) on first use, with torch, this package and
# its C++ extension, the extras and, for the tests, the peer trainers at their pinned versions, and
# reuses it afterwards (it reinstalls only when pyproject.toml, setup.py, csrc/ or the lock change).
# `make help` lists the other targets and the variables that change the set-up.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
# The lock: exact versions of everything, the lowest each declared range allows (make lock). It is
# made for CPython 3.11 on Linux x86-64; elsewhere, or with CONSTRAINTS= (empty), pip resolves the
# newest releases the ranges in pyproject.toml allow.
CONSTRAINTS ?= constraints.txt
# Where torch comes from, e.g. https://download.pytorch.org/whl/cpu for the CPU build on a machine
# whose PyPI torch is the CUDA one. Empty: the configured index.
TORCH_INDEX_URL ?=
PYTEST_ARGS ?=
CASESTUDY_ARGS ?=

BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
# pip's output goes to $(VENV)/install.log; its tail is shown when a step fails.
LOGGED = >> $(VENV)/install.log 2>&1 || { echo "error: that step failed; the end of $(VENV)/install.log:" >&2; tail -n 30 $(VENV)/install.log >&2; exit 1; }
# The peers' tests import verl's loss code only; verl's own requirements would pull wandb, hydra and
# tensorboard and move transformers, so verl goes in with --no-deps plus the chain its loss imports.
VERL := verl==0.9.1
VERL_IMPORT_CHAIN := ray==2.60.0 tensordict==0.15.3 omegaconf==2.4.0 codetiming==1.4.0 orjson==3.13.0
TORCH_REQUIREMENT := $(shell grep -o '"torch[^"]*"' pyproject.toml | head -n 1 | tr -d '"')
LOCK_USABLE := $(shell $(PYTHON) -c 'import platform, sys; print(int(sys.version_info[:2] == (3, 11) and sys.platform == "linux" and platform.machine() == "x86_64"))' 2>/dev/null)
USE_LOCK := $(if $(CONSTRAINTS),$(filter 1,$(LOCK_USABLE)),)
CONSTRAINT_ARGS := $(if $(USE_LOCK),-c $(CONSTRAINTS),)
VERSIONS := $(if $(USE_LOCK),the lock $(CONSTRAINTS),newest within the ranges of pyproject.toml$(if $(CONSTRAINTS), (the lock is for CPython 3.11 on Linux x86-64)))
SOURCES := pyproject.toml setup.py $(wildcard csrc/*) $(if $(USE_LOCK),$(CONSTRAINTS),)

.PHONY: help casestudy test test-fast test-newest bench lint demo lock clean-venv

help:
	@echo "make casestudy   the main job (CASESTUDY_ARGS='--seeds 0-9' for the 10-seed validation, '--quick' for a smoke run)"
	@echo "make test        the whole test suite (PYTEST_ARGS='-x -k name' to narrow it)"
	@echo "make test-fast   the suite without the slow case-study test"
	@echo "make test-newest the fast suite in .venv-newest, against the newest releases the ranges allow"
	@echo "make bench       the benchmarks at CI size, each asserting its bars (python -m pytest benchmarks for timings)"
	@echo "make lint        ruff"
	@echo "make demo        the fused loss on random data, every backend on this machine vs the reference"
	@echo "make lock        rewrite constraints.txt: the lowest version of every declared range"
	@echo "make clean-venv  remove .venv and .venv-newest"
	@echo "Variables: PYTHON=$(PYTHON) VENV=$(VENV) CONSTRAINTS=$(CONSTRAINTS) TORCH_INDEX_URL=$(TORCH_INDEX_URL)"

# The package with the training extras: what the main job and the demo need.
$(VENV)/.ready-train: $(SOURCES)
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "error: Python 3.10 or newer is needed (PYTHON=$(PYTHON) is older); run e.g. make PYTHON=python3.11 ..." >&2; exit 1; }
	@test -x $(BIN)/python || { echo "== creating the virtual environment $(VENV) ($$($(PYTHON) --version))"; $(PYTHON) -m venv $(VENV); }
	@echo "== versions: $(VERSIONS)"
	@echo "== pip, setuptools, wheel"
	@$(PIP) install -q --upgrade $(CONSTRAINT_ARGS) pip setuptools wheel $(LOGGED)
	@echo "== torch $(TORCH_REQUIREMENT) $(if $(TORCH_INDEX_URL),from $(TORCH_INDEX_URL))"
	@$(PIP) install -q $(CONSTRAINT_ARGS) $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) '$(TORCH_REQUIREMENT)' $(LOGGED)
	@echo "== rlhf_fast, its C++ extension (built against that torch) and the [train] extras"
	@$(PIP) install -q $(CONSTRAINT_ARGS) --no-build-isolation -e ".[train]" '$(TORCH_REQUIREMENT)' $(LOGGED)
	@$(BIN)/python -c 'import torch, rlhf_fast; from rlhf_fast import backends; print("   torch", torch.__version__, "| cpp backend:", backends.load_ops("cpp")[1] or "built")'
	@touch $@

# Plus the test tools, Triton (its interpreter runs the kernels on the CPU) and the peer trainers.
$(VENV)/.ready-test: $(VENV)/.ready-train
	@echo "== the [test,triton,trl] extras and the verl loss chain"
	@$(PIP) install -q $(CONSTRAINT_ARGS) --no-build-isolation -e ".[train,test,triton,trl]" $(VERL_IMPORT_CHAIN) '$(TORCH_REQUIREMENT)' $(LOGGED)
	@$(PIP) install -q $(CONSTRAINT_ARGS) --no-deps $(VERL) $(LOGGED)
	@touch $@

casestudy: $(VENV)/.ready-train
	$(BIN)/python -m rlhf_fast casestudy $(CASESTUDY_ARGS)

# The C++ and Triton backends are expected here: one that fails to load fails the run (tests/conftest.py)
# instead of skipping its tests. RLHF_FAST_REQUIRE_BACKENDS= (empty) in the environment lets them skip.
test: $(VENV)/.ready-test
	RLHF_FAST_REQUIRE_BACKENDS=$${RLHF_FAST_REQUIRE_BACKENDS-cpp,triton} $(BIN)/python -m pytest tests -q $(PYTEST_ARGS)

test-fast: $(VENV)/.ready-test
	RLHF_FAST_REQUIRE_BACKENDS=$${RLHF_FAST_REQUIRE_BACKENDS-cpp,triton} $(BIN)/python -m pytest tests -q -m "not slow" $(PYTEST_ARGS)

# The benchmarks at CI size: each runs its rounds (interleaved with eager's) and asserts its bars.
# THP_MEM_ALLOC_ENABLE=1: torch backs large CPU buffers with 2 MiB pages, so the first touch of a
# fresh [N, V] gradient costs the same in every call instead of depending on whether the kernel
# hands back pages freed a moment ago (which flipped a variant-vs-plain ratio between 1.0 and 1.8).
bench: $(VENV)/.ready-test
	THP_MEM_ALLOC_ENABLE=$${THP_MEM_ALLOC_ENABLE-1} RLHF_FAST_REQUIRE_BACKENDS=$${RLHF_FAST_REQUIRE_BACKENDS-cpp} \
		$(BIN)/python -m pytest benchmarks -q --benchmark-disable $(PYTEST_ARGS)

demo: $(VENV)/.ready-train
	$(BIN)/python -m rlhf_fast demo

lint: $(VENV)/.ready-test
	$(BIN)/ruff check .

# The newest releases: a separate environment, no lock. On a failure it names every package whose
# version differs from the lock's, the candidates for what broke.
test-newest:
	@mkdir -p .venv-newest
	@$(MAKE) --no-print-directory test-fast VENV=.venv-newest CONSTRAINTS= 2>&1 | tee .venv-newest/test.log || { \
	  echo "== the fast suite failed against the newest releases; versions that differ from $(CONSTRAINTS):" >&2; \
	  .venv-newest/bin/python scripts/versions.py --against $(CONSTRAINTS) --log .venv-newest/test.log >&2; exit 1; }
	@.venv-newest/bin/python scripts/versions.py --against $(CONSTRAINTS)

# The lock: install the lowest version of every declared range (scripts/lowest.py) into a fresh
# environment and freeze it.
lock:
	rm -rf .venv-lock
	$(PYTHON) scripts/lowest.py > .lowest.txt
	$(MAKE) --no-print-directory .venv-lock/.ready-test VENV=.venv-lock CONSTRAINTS=.lowest.txt
	{ echo "# The lock: the lowest supported version of every dependency (make lock), for CPython 3.11 on"; \
	  echo "# Linux x86-64. Use: pip install -c constraints.txt ... (the Makefile does by default)."; \
	  .venv-lock/bin/python -m pip freeze --exclude-editable | grep -v '^rlhf.fast' | sed -E 's/^(torch==[^+]*)\+.*/\1/'; } > constraints.txt
	rm -rf .venv-lock .lowest.txt
	@echo "constraints.txt written"

clean-venv:
	rm -rf .venv .venv-newest .venv-lock
