#!/usr/bin/env bash
# Runs the SGLang adapter tests in their own environment, cached outside the clone (see setup_sglang_env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="$(bash scripts/setup_sglang_env.sh | tail -n 1)"
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  "$PY" -m pytest tests/integration/sglang -q -p no:cacheprovider "$@"
