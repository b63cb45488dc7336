#!/usr/bin/env bash
# The project's own GPU checks, beyond the `cuda`-marked tests. Run on a CUDA host from the project root,
# after `. .gpu/env.sh` (../shared/gpu/check.sh runs this script last, with what time is left; alone:
# `bash scripts/gpu-check.sh`). Stages, most important first, each time-boxed within GPU_CHECK_BUDGET_S:
#   1. bench, 1B shape, bf16, 64 requests over 32 LoRA (q,v r8): CUDA-graph decode step vs the eager step
#      in the same interleaved rounds, plus transformers/PEFT baselines (capped);
#   2. bench, 1B shape, bf16 and nf4, 32 adapters of mixed kinds (graphs; nf4 also eager);
#   3. the LoRA kernel backends (torch gather+bmm vs Triton) on 1B shapes, if scripts/gpu/lora_kernels.py
#      exists, and the engine bench with --lora-backend triton;
#   4. bench, 1B bf16, 1,000 LoRAs in the store and 64 slots (vs the 32-adapter run of stage 1); `bench
#      --served` (through a real server, beside the in-process engine); then the 8B shape, bf16, mixed
#      kinds: the decode step's fraction of the memory-bandwidth limit;
#   5. the main job (`serve`, nf4 by default on CUDA) through the SDK (.gpu/served.py), unless check.sh
#      already ran it;
#   6. nf4 parity (engine vs PEFT per bitsandbytes dispatch) and 6 QLoRA steps on the 1B shape.
# Every bench report includes decode-step time, TTFT, peak memory, the fraction of the bandwidth limit and
# the decode graphs' stats. Results under $OUT (default ./gpu-out): gpu-check.log, bench-*.json, ...
set -u
OUT=${OUT:-$(pwd)/gpu-out}; mkdir -p "$OUT"
T0=$(date +%s); BUDGET_S=${GPU_CHECK_BUDGET_S:-420}
left() { echo $(( BUDGET_S - ($(date +%s) - T0) )); }
cap() { local l; l=$(left); echo $(( l < $1 ? l : $1 )); }  # a stage's timeout: its own cap or what is left
say() { echo "=== [gpu-check $(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/gpu-check.log"; }
[ -f .gpu/env.sh ] && [ -z "${PYTHONPATH:-}" ] && . .gpu/env.sh
NEW=${NEW:-64}
M=${GPU_CHECK_MODEL:-/tmp/m-1b}
if [ ! -f "$M/config.json" ]; then
  say "make 1b model"
  timeout 120 python3 .gpu/mkmodel.py "$M" 1b cuda .gpu/tok >> "$OUT/gpu-check.log" 2>&1 || { say "no model"; exit 1; }
fi

bench() {  # name max_seconds model args...
  local name=$1 to=$2 model=$3; shift 3
  [ "$(left)" -gt 40 ] || { say "skip bench $name (budget)"; return; }
  say "bench $name"
  timeout "$(cap "$to")" python3 -m adapterserve bench --device cuda --base-model "$model" --requests 64 \
    --adapters 32 --max-new-tokens "$NEW" --workdir "/tmp/ab-$name" --json "$OUT/bench-$name.json" "$@" \
    2>> "$OUT/gpu-check.log" | tail -9
}

bench 1b-bf16-lora 110 "$M" --quantize none --kinds lora --eager-too --repeats 2 --baseline-seconds 8 --naive-requests 1
bench 1b-bf16-mixed 60 "$M" --quantize none --kinds mixed --repeats 2 --baseline-seconds 0
bench 1b-nf4-mixed 80 "$M" --quantize nf4 --kinds mixed --eager-too --repeats 2 --baseline-seconds 0

if [ -f scripts/gpu/lora_kernels.py ] && [ "$(left)" -gt 60 ]; then
  say "LoRA kernel backends (torch vs triton)"
  timeout "$(cap 60)" python3 scripts/gpu/lora_kernels.py --device cuda > "$OUT/lora-kernels.json" 2>> "$OUT/gpu-check.log"
  tail -c 1500 "$OUT/lora-kernels.json"
  if python3 -m adapterserve bench --help 2>/dev/null | grep -q -- --lora-backend; then
    bench 1b-bf16-lora-triton 60 "$M" --quantize none --kinds lora --lora-backend triton --repeats 2 --baseline-seconds 0
  fi
fi

# Store scale: 1,000 adapters in the store, 64 in flight (64 slots), vs the 32-adapter run above.
bench 1b-bf16-lora-1000 90 "$M" --quantize none --kinds lora --adapters 1000 --adapter-slots 64 --repeats 2 --baseline-seconds 0

# Through the server: `serve` in a child process, adapters uploaded and 64 requests sent through the SDK,
# beside the in-process engine in the same rounds (the serving path's cost with CUDA-graph steps).
if python3 -m adapterserve bench --help 2>/dev/null | grep -q -- --served; then
  bench 1b-bf16-served 100 "$M" --quantize none --kinds lora --served --repeats 2 --baseline-seconds 0
fi

if [ "$(left)" -gt 150 ]; then
  say "make 8b model"
  if timeout "$(cap 90)" python3 .gpu/mkmodel.py /tmp/m-8b 8b cuda .gpu/tok >> "$OUT/gpu-check.log" 2>&1; then
    bench 8b-bf16-mixed 150 /tmp/m-8b --quantize none --kinds mixed --eager-too --repeats 1 --baseline-seconds 0
  fi
  rm -rf /tmp/m-8b
fi

if [ ! -s "$OUT/served.json" ] && [ -f .gpu/served.py ] && [ "$(left)" -gt 70 ]; then
  say "main job over nf4 through the SDK"
  timeout "$(cap 120)" python3 .gpu/served.py "$M" /tmp/ab-1b-bf16-lora "$NEW" > "$OUT/served-gpu-check.json" 2>> "$OUT/gpu-check.log"
  cut -c1-1200 "$OUT/served-gpu-check.json"
fi

if [ "$(left)" -gt 60 ]; then
  say "nf4 parity (engine vs PEFT, default and pinned dispatch)"
  timeout "$(cap 60)" python3 scripts/gpu/nf4_parity.py "$M" 16 > "$OUT/nf4-parity.json" 2>> "$OUT/gpu-check.log"
  tail -c 800 "$OUT/nf4-parity.json"
fi
if [ "$(left)" -gt 60 ]; then
  say "QLoRA: 6 steps on the 1B shape"
  timeout "$(cap 90)" python3 -m adapterserve train --method qlora --base-model "$M" \
    --device cuda --data demo/data/sentiment/train.jsonl --max-steps 6 --logging-steps 1 --batch-size 4 \
    --learning-rate 1e-3 --out /tmp/qlora-1b --overwrite > "$OUT/qlora.log" 2>&1
  echo "rc=$?" >> "$OUT/qlora.log"; grep -E "'loss'|rc=|Error|error" "$OUT/qlora.log" | tail -8
fi
say done
