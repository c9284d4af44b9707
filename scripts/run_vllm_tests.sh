#!/usr/bin/env bash
# Runs the vLLM adapter tests in their own environment, cached outside the clone (see setup_vllm_env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="$(bash scripts/setup_vllm_env.sh | tail -n 1)"
# The environment's hash covers its setup script, not pyproject.toml: an editable install made before an entry point
# was added lacks it (blend mode needs vllm.general_plugins: semblend). Reinstall the metadata when it is missing.
"$PY" -c 'import importlib.metadata as m, sys; sys.exit(not any(e.name == "semblend" for e in m.entry_points(group="vllm.general_plugins")))' \
  || "$PY" -m pip install -q --no-deps -e . >&2
"$PY" -m pytest tests/integration/vllm --ignore=tests/integration/vllm/e2e -q -p no:cacheprovider
