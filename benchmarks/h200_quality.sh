#!/usr/bin/env bash
# The H200 run behind benchmarks/results/quality_frontier_lee_h200.json (offline GPU machine, at most 64 MiB per
# call: SmolLM2's real weights travel in two parts, see _smollm2_parts.py; Qwen2.5-Coder-0.5B's 491 MB GGUF does
# not fit in the calls this run may use and is measured on CPU only).
#
# Here (.carry/ is git-ignored in the checkout the device tool sends):
#   C=.carry/quality; B=.carry/quality_b; mkdir -p $C/{model,tok,whl,lee} $B/model
#   cp -r semblend semblend_core benchmarks $C/                       # the code under test (+ COMMIT.json)
#   python benchmarks/_smollm2_parts.py pack /tmp/parts               # part-00 + smollm2.json -> $C/model,
#                                                                     # part-01 -> $B/model
#   cp <smollm2 converted folder>/{tokenizer.json,tokenizer_config.json,chat_template.jinja,generation_config.json} $C/tok/
#   cp lee_background.cor lee.cor $C/lee/                             # see _heldout.py
#   pip download rapidfuzz (cp312, manylinux) -d $C/whl               # the one SemBlend dependency missing there
# Device calls:
#   1. carry .carry/quality_b:   mkdir -p /tmp/qstage && cp .carry/quality_b/model/* /tmp/qstage/
#   2. carry .carry/quality:     bash .carry/quality/benchmarks/h200_quality.sh
# Call 2 runs one process per dtype x layout in parallel (the blended prefill of a 135M model is launch-bound,
# the GPU has room for six); each flushes its JSON after every document, so a timeout keeps what finished.
set -uo pipefail
C=.carry/quality
ITEMS=${ITEMS:-30}
LIMIT=${LIMIT:-330}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $C/whl/*.whl || exit 3
export PYTHONPATH=/tmp/site
mkdir -p /tmp/qstage "$OUT/work"
cp $C/model/* /tmp/qstage/
python3 $C/benchmarks/_smollm2_parts.py unpack /tmp/qstage --out /tmp/smollm2 || exit 5
cp $C/tok/* /tmp/smollm2/
nvidia-smi --query-gpu=name,driver_version,clocks.sm,memory.used --format=csv > "$OUT/work/gpu.txt"
python3 -c 'import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)' \
  | tee "$OUT/work/versions.txt"
for dtype in fp32 bf16; do
  for layout in instruction_first instruction_last rag; do
    timeout "$LIMIT" python3 $C/benchmarks/quality_frontier.py --model smollm2 --device cuda --model-dir /tmp/smollm2 \
      --lee-dir $C/lee --dtype $dtype --layouts $layout --items "$ITEMS" --threads 2 --strategies "${STRATEGIES:-core}" \
      --out "$OUT/work/$dtype-$layout" --tag lee_h200 --no-plot > "$OUT/work/log_$dtype-$layout.txt" 2>&1 &
  done
done
wait
tail -n 12 "$OUT"/work/log_*.txt
tar czf "$OUT/quality_h200.tgz" -C "$OUT" work && rm -rf "$OUT/work"
ls -la "$OUT"
