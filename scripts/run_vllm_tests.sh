#!/usr/bin/env bash
# Runs the vLLM adapter tests in their own environment, cached outside the clone (see setup_vllm_env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="$(bash scripts/setup_vllm_env.sh | tail -n 1)"
"$PY" -m pytest tests/integration/vllm --ignore=tests/integration/vllm/e2e -q -p no:cacheprovider
