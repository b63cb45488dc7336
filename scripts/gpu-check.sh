#!/usr/bin/env bash
# The project's own GPU checks, beyond the `cuda`-marked tests. Run on a CUDA host from the project root,
# after `. .gpu/env.sh` (../shared/gpu/check.sh runs this script last, with what time is left):
#   1. nf4 parity: the engine vs PEFT on an nf4 base, per bitsandbytes kernel dispatch (scripts/gpu/nf4_parity.py);
#   2. QLoRA: a few training steps on a 1B-shaped model through `adapterserve train --method qlora`
#      (paged 8-bit AdamW, bf16): the loss must fall;
#   3. the benchmark's JSON (bf16 LoRA and nf4 mixed kinds) with decode-step time, TTFT, peak memory and
#      the fraction of the memory-bandwidth limit;
#   4. the main job over nf4 through the SDK (.gpu/served.py), unless check.sh already ran it.
# Results under $OUT (default ./gpu-out): gpu-check.log, nf4-parity.json, qlora.log, bench-*.json.
set -u
OUT=${OUT:-$(pwd)/gpu-out}; mkdir -p "$OUT"
T0=$(date +%s); BUDGET_S=${GPU_CHECK_BUDGET_S:-300}
left() { echo $(( BUDGET_S - ($(date +%s) - T0) )); }
say() { echo "=== [gpu-check $(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/gpu-check.log"; }
[ -f .gpu/env.sh ] && [ -z "${PYTHONPATH:-}" ] && . .gpu/env.sh
M=${GPU_CHECK_MODEL:-/tmp/m-1b}
if [ ! -f "$M/config.json" ]; then
  say "make 1b model"
  timeout 150 python3 .gpu/mkmodel.py "$M" 1b cuda .gpu/tok >> "$OUT/gpu-check.log" 2>&1 || { say "no model"; exit 1; }
fi

say "nf4 parity (engine vs PEFT, default and pinned dispatch)"
timeout $(( $(left) < 120 ? $(left) : 120 )) python3 scripts/gpu/nf4_parity.py "$M" 16 \
  > "$OUT/nf4-parity.json" 2>> "$OUT/gpu-check.log"; tail -c 1500 "$OUT/nf4-parity.json"

say "QLoRA: 6 steps on the 1B shape"
timeout $(( $(left) < 150 ? $(left) : 150 )) python3 -m adapterserve train --method qlora --base-model "$M" \
  --device cuda --data demo/data/sentiment/train.jsonl --max-steps 6 --logging-steps 1 --batch-size 4 \
  --learning-rate 1e-3 --out /tmp/qlora-1b --overwrite > "$OUT/qlora.log" 2>&1
echo "rc=$?" >> "$OUT/qlora.log"; grep -E "'loss'|rc=|Error|error" "$OUT/qlora.log" | tail -10

for spec in "bf16-lora:--quantize none --kinds lora" "nf4-mixed:--quantize nf4 --kinds mixed"; do
  name=${spec%%:*}; args=${spec#*:}
  [ "$(left)" -gt 40 ] || { say "skip bench $name (budget)"; continue; }
  say "bench $name"
  # shellcheck disable=SC2086
  timeout $(( $(left) < 150 ? $(left) : 150 )) python3 -m adapterserve bench --device cuda --base-model "$M" $args \
    --requests 64 --adapters 32 --max-new-tokens 64 --repeats 3 --baseline-seconds 15 --naive-requests 2 \
    --workdir /tmp/ab-gc --json "$OUT/bench-$name.json" 2>> "$OUT/gpu-check.log" | tail -8
done

if [ ! -s "$OUT/served.json" ] && [ -f .gpu/served.py ] && [ "$(left)" -gt 60 ]; then
  say "main job over nf4 through the SDK"
  timeout $(( $(left) - 5 )) python3 .gpu/served.py "$M" /tmp/ab-gc 64 > "$OUT/served-gpu-check.json"
  cut -c1-800 "$OUT/served-gpu-check.json"
fi
say done
