#!/usr/bin/env bash
# Set up the environment (if needed) and run the main job on the embedded default model.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
VENV="${ADAPTERSERVE_VENV:-$ROOT/.venv}"
cd "$ROOT"
# Until the gRPC server lands, the main job answers one chat prompt on the default model.
exec "$VENV/bin/python" - "$@" <<'PY'
import sys, torch
from adapterserve.server.model.loading import load_base_model
prompt = " ".join(sys.argv[1:]) or "What is the capital of France?"
base = load_base_model(None)
ids = base.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_dict=False)
out = base.model.generate(input_ids=torch.tensor([ids], device=base.device), max_new_tokens=48, do_sample=False)
print(base.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True))
PY
