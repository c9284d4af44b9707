#!/usr/bin/env bash
# Create (or reuse) the Python environment the vLLM adapter tests run in, cached OUTSIDE the clone.
#
#   bash scripts/setup_vllm_env.sh            # prints the environment's python on the last line of stdout
#   PY=$(bash scripts/setup_vllm_env.sh | tail -n 1)
#   "$PY" -m pytest tests/integration/vllm -m engine_vllm
#
# Location: ${SEMBLEND_ENV_ROOT:-~/.cache/semblend}/venv-vllm-<hash>, where <hash> covers this script (and so the
# pinned requirements below), the vLLM version and the base interpreter. A venv whose stamp matches is reused as is
# (a second or so); a missing or half-built one is rebuilt (cold: ~3 minutes here, mostly downloads).
#
# Install order (vLLM's wheel pins packages this machine cannot or must not take):
#   1. torch==2.13.0, the CPU wheel on disk. vLLM 0.33 pins torch==2.14.0 (CUDA); the scheduler, the connector API
#      and our CPU tests only need torch's tensor API, and a plain `torch` would pull gigabytes of CUDA wheels.
#   2. vLLM's own Requires-Dist (read from the wheel's METADATA), pinned to versions known to resolve together, with
#      certifi==2026.10.18: vLLM 0.33 asks for certifi>=2026.10.19, which the package index does not have.
#      Left out, each CUDA/GPU-only and not imported by the scheduler or the connector API on CPU:
#        torch==2.14.0 (step 1), torchaudio, torchvision, torchcodec (no CPU builds; would pull CUDA torch),
#        PyNvVideoCodec, flashinfer-python, tilelang, nvidia-cudnn-frontend, nvtx, fastsafetensors,
#        instanttensor, nvidia-cutlass-dsl[cu13], quack-kernels, tokenspeed-mla, humming-kernels[cu13].
#   3. vllm==$VLLM_VERSION with --no-deps.
#   4. Test tools (pytest, hypothesis), the core's deps (numpy, rapidfuzz), and this repo editable (--no-deps);
#      re-pointed at the current clone on every run (CI clones into a fresh directory).
set -euo pipefail

VLLM_VERSION="${SEMBLEND_VLLM_VERSION:-0.33.0}"
BASE_PY="${PYTHON:-python3}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SCRIPT="$REPO/scripts/setup_vllm_env.sh"
ROOT="${SEMBLEND_ENV_ROOT:-$HOME/.cache/semblend}"

log() { echo "[setup_vllm_env] $*" >&2; }

read -r -d '' VLLM_REQUIREMENTS <<'EOF' || true
regex==2026.11.15
cachetools==8.0.1
psutil==7.2.2
sentencepiece==0.2.3
numpy==2.3.5
requests==2.34.2
certifi==2026.10.18
tqdm==4.70.1
blake3==1.0.11
py-cpuinfo==9.0.0
transformers==5.20.2
huggingface_hub==2.4.0
tokenizers==0.23.3
safetensors==0.8.0
protobuf==7.36.2
fastapi[standard]==0.136.3
starlette==1.10.0
aiohttp==3.14.5
multidict==7.2.1
openai==3.54.0
pydantic==2.14.3
orjson==3.13.0
prometheus_client==0.26.0
pillow==13.0.0
prometheus-fastapi-instrumentator==8.1.0
tiktoken==0.14.0
lm-format-enforcer==0.11.3
llguidance==1.7.6
outlines_core==0.2.14
lark==1.2.2
xgrammar==0.2.8
typing_extensions==4.16.0
filelock==4.2.11
partial-json-parser==0.2.1.1.post7
jsonschema==4.26.0
pyzmq==27.3.0
msgspec==0.22.0
mistral_common[image]==1.13.1
opencv-python-headless==5.0.0.93
pyyaml==6.0.3
einops==0.8.2
compressed-tensors==0.17.0
depyf==0.20.0
cloudpickle==3.1.2
watchfiles==1.3.0
python-json-logger==4.2.0
ninja==1.13.2
pybase64==1.5.1
cbor2==6.3.0
ijson==3.6.0
setproctitle==1.3.8
oss-harmony==0.0.11
anthropic==2.12.0
model-hosting-container-standards==0.1.16
mcp==2.3.0
opentelemetry-sdk==1.45.2
opentelemetry-api==1.45.2
opentelemetry-exporter-otlp==1.45.2
opentelemetry-semantic-conventions-ai==0.5.1
numba==0.65.0
EOF
TEST_REQUIREMENTS="pytest>=8 hypothesis>=6.100 rapidfuzz>=3.0"

py_id="$("$BASE_PY" -c 'import sys; print(sys.version.split()[0], sys.executable)')"
HASH="$( { cat "$SCRIPT"; echo "$VLLM_VERSION"; echo "$py_id"; } | sha256sum | cut -c1-12)"
VENV="$ROOT/venv-vllm-$HASH"
STAMP="$VENV/.semblend-stamp"
PY="$VENV/bin/python"

mkdir -p "$ROOT"
exec 9>"$ROOT/.venv-vllm.lock"
flock 9  # two CI jobs on one machine must not build the same venv at once

point_at_repo() {
  # The editable install must import this clone, not the one that built the venv.
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
log "building $VENV (vllm==$VLLM_VERSION)"
rm -rf "$VENV"
"$BASE_PY" -m venv "$VENV"
PIP=("$PY" -m pip install -q --disable-pip-version-check)
"${PIP[@]}" torch==2.13.0 >&2
log "torch done ($(( $(date +%s) - start ))s)"
reqfile="$(mktemp)"
trap 'rm -f "$reqfile"' EXIT
printf '%s\n' "$VLLM_REQUIREMENTS" > "$reqfile"
echo "torch==2.13.0" > "$reqfile.constraints"
"${PIP[@]}" -r "$reqfile" -c "$reqfile.constraints" >&2
rm -f "$reqfile.constraints"
log "vLLM requirements done ($(( $(date +%s) - start ))s)"
"${PIP[@]}" --no-deps "vllm==$VLLM_VERSION" >&2
# shellcheck disable=SC2086
"${PIP[@]}" $TEST_REQUIREMENTS -c <(echo "torch==2.13.0") >&2
"${PIP[@]}" --no-deps -e "$REPO" >&2
"$PY" - <<'PYEOF' >&2
import torch, vllm
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1  # noqa: F401
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: F401
assert torch.__version__.startswith("2.13.0"), torch.__version__
print(f"vllm {vllm.__version__}, torch {torch.__version__}")
PYEOF
echo "$HASH" > "$STAMP"
log "ready in $(( $(date +%s) - start ))s"
echo "$PY"
