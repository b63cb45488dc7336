#!/usr/bin/env bash
# Regenerates the demo data and trains the committed demo adapters on the embedded default model
# (SmolLM2-135M-Instruct) on a CPU. Each adapter is evaluated on its task's held-out examples through
# the server's engine, base vs adapter; the numbers land in demo/adapters/<name>.manifest.json.
set -euo pipefail
# One thread per process: on a shared 2-core machine, oversubscribed threads made steps ~5x slower.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
cd "$(dirname "$0")/.."

python -m adapterserve.training.demo_tasks --out demo/data

# LoRA (r=8 on q_proj, v_proj): a format task.
python -m adapterserve.training --method lora --rank 8 --alpha 16 --target-modules q_proj,v_proj \
  --max-steps 60 --batch-size 8 --learning-rate 1e-3 --logging-steps 10 \
  --data demo/data/json-extract/train.jsonl --eval demo/data/json-extract/eval.jsonl \
  --out demo/adapters/json-extract --overwrite

# Prompt tuning (16 soft tokens, initialised from text): a classification task.
python -m adapterserve.training --method prompt-tuning --num-virtual-tokens 16 \
  --init-text "Answer with one word, positive or negative:" \
  --max-steps 60 --batch-size 8 --learning-rate 3e-2 --logging-steps 10 \
  --data demo/data/sentiment/train.jsonl --eval demo/data/sentiment/eval.jsonl \
  --out demo/adapters/sentiment --overwrite

# Prefix tuning (16 virtual tokens of key/value prefix in every layer): a style task.
python -m adapterserve.training --method prefix-tuning --num-virtual-tokens 16 \
  --max-steps 60 --batch-size 8 --learning-rate 2e-2 --logging-steps 10 \
  --data demo/data/pirate/train.jsonl --eval demo/data/pirate/eval.jsonl \
  --out demo/adapters/pirate --overwrite
