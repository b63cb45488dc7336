#!/usr/bin/env bash
# Set up the environment (if needed), lint, and run the whole test suite on the CPU.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not smollm2"`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
VENV="${ADAPTERSERVE_VENV:-$ROOT/.venv}"
cd "$ROOT"
echo "[test] ruff"
"$VENV/bin/ruff" check .
echo "[test] pytest"
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
