#!/usr/bin/env bash
# The H200 runs behind benchmarks/results/vllm_ttft_h200.json and vllm_quality_h200.json (offline GPU machine,
# at most 64 MiB per call, warm ~30 s between calls: three calls back to back).
#
# Here (copy the code and the inputs into the checkout the device tool sends; .carry/ is git-ignored):
#   C=.carry/vllmgpu; mkdir -p $C/whl $C/model .carry/vllmgpu_b/model
#   cp -r semblend semblend_core benchmarks $C/            # + COMMIT.json naming the commit
#   pip download rapidfuzz (cp312, manylinux) -d $C/whl     # the only SemBlend dependency missing there
#   python benchmarks/_smollm2_parts.py pack /tmp/parts     # SmolLM2 real weights, in two parts:
#     part-00 + smollm2.json -> $C/model, part-01 -> .carry/vllmgpu_b/model
#   python benchmarks/vllm_quality.py prompts --out $C/quality_prompts.json
# Device calls:
#   1. carry .gpu-vllm/c1:                   mkdir -p /tmp/stage && cp .gpu-vllm/c1/* /tmp/stage/
#   2. carry .gpu-vllm/c2 .carry/vllmgpu:    bash .carry/vllmgpu/benchmarks/h200_vllm.sh ttft
#   3. carry .carry/vllmgpu_b:               bash /tmp/vg/benchmarks/h200_vllm.sh quality
# (`quality` runs vllm_quality.py all: cold, then one connector engine per layout. The committed
# vllm_quality_h200.json came from three such cycles on 2026-12-01: cold at 10:30 UTC, doc_moved at 10:35 with
# QUALITY_COLD=<the 10:30 cold file>, doc_first at 10:45 with `vllm_quality.py engine --role hit --layouts doc_first`;
# cold was rerun at 10:37 on another machine and matched token for token.)
set -uo pipefail
STAGE=${1:?ttft or quality}
export VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export PYTHONUNBUFFERED=1 VLLM_ENABLE_V1_MULTIPROCESSING=0
export PYTHONPATH=/tmp/site:/tmp/vg
mkdir -p "$OUT/work"
if [ "$STAGE" = ttft ]; then
  bash .gpu-vllm/c2/install.sh || exit 3
  mkdir -p /tmp/vg && cp -r .carry/vllmgpu/. /tmp/vg/           # kept for call 3
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site /tmp/vg/whl/*.whl
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,memory.used --format=csv \
    > "$OUT/work/gpu.txt"
  python3 -c 'import vllm, torch, rapidfuzz, semblend_core; print(vllm.__version__, torch.__version__)' || exit 4
  timeout "${TTFT_TIMEOUT:-540}" python3 /tmp/vg/benchmarks/vllm_ttft.py all --out "$OUT/work" \
    --total-budget-s "${TTFT_BUDGET:-520}" ${TTFT_ARGS:-}
  cp "$OUT/work/vllm_ttft_h200.json" "$OUT/" 2>/dev/null
else
  cp -r .carry/vllmgpu_b/model/. /tmp/vg/model/
  [ -d .carry/vllmgpu_b/code ] && cp -r .carry/vllmgpu_b/code/. /tmp/vg/   # late code fixes
  python3 /tmp/vg/benchmarks/_smollm2_parts.py unpack /tmp/vg/model --out /tmp/smollm2 || exit 5
  Q="python3 /tmp/vg/benchmarks/vllm_quality.py"
  P="--prompts /tmp/vg/quality_prompts.json --model-dir /tmp/smollm2"
  if [ -n "${QUALITY_COLD:-}" ]; then  # cold outputs of an earlier call on this machine type: run the hits first
    timeout 300 $Q engine --role hit $P --out "$OUT/work/quality_hit.json" --cold "$QUALITY_COLD" \
      > "$OUT/work/log_quality_hit.txt" 2>&1; echo "hit rc=$?"
    $Q summarize --prompts /tmp/vg/quality_prompts.json --cold "$QUALITY_COLD" --hit "$OUT/work/quality_hit.json" \
      --out "$OUT/vllm_quality_h200.json" && python3 -c "import json,sys; d=json.load(open(sys.argv[1]));
[print(k, {a: b for a, b in v.items() if a != 'per_paper'}) for k, v in d['layouts'].items()]" "$OUT/vllm_quality_h200.json"
    timeout "${RERUN_COLD_TIMEOUT:-150}" $Q engine --role cold $P --out "$OUT/work/quality_cold_rerun.json" \
      > "$OUT/work/log_quality_cold_rerun.txt" 2>&1; echo "cold rerun rc=$?"
  else
    timeout "${QUALITY_TIMEOUT:-400}" $Q all $P --out "$OUT/work" ${QUALITY_ARGS:-}
    cp "$OUT/work/vllm_quality_h200.json" "$OUT/" 2>/dev/null
  fi
  if [ -n "${THEN_TTFT_ARGS:-}" ]; then  # leftover TTFT engines, if call 2 ran out of time
    timeout "${TTFT_TIMEOUT:-300}" python3 /tmp/vg/benchmarks/vllm_ttft.py all --out "$OUT/work/ttft" \
      --name vllm_ttft_h200_rest.json $THEN_TTFT_ARGS
    cp "$OUT/work/ttft/vllm_ttft_h200_rest.json" "$OUT/" 2>/dev/null
  fi
fi
tar czf "$OUT/work_$STAGE.tgz" -C "$OUT" work && rm -rf "$OUT/work"
ls -la "$OUT"
