#!/usr/bin/env bash
# Runs the vLLM adapter tests in their own environment, cached outside the clone (see setup_vllm_env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d tests/integration/vllm ] || [ ! -f scripts/setup_vllm_env.sh ]; then
  echo "vLLM adapter tests not present; nothing to run"
  exit 0
fi
VENV="$(bash scripts/setup_vllm_env.sh --print-venv)"
bash scripts/setup_vllm_env.sh
"$VENV/bin/python" -m pip install -q --no-deps -e .
"$VENV/bin/python" -m pytest tests/integration/vllm -q
