#!/usr/bin/env bash
# Set up the environment (if needed) and run the main job: the gRPC server on the embedded default
# model (SmolLM2-135M-Instruct) with the demo adapters in its store.
# Extra arguments go to `adapterserve serve`, e.g. `bash scripts/serve.sh --port 50052`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
VENV="${ADAPTERSERVE_VENV:-$ROOT/.venv}"
cd "$ROOT"
if [ -z "${ADAPTERSERVE_ADMIN_TOKEN:-}" ]; then
  # Admin calls (upload, delete, pin) need a bearer token; make one for this run and show it.
  ADAPTERSERVE_ADMIN_TOKEN="$("$VENV/bin/python" -c 'import secrets; print(secrets.token_urlsafe(24))')"
  export ADAPTERSERVE_ADMIN_TOKEN
  echo "[serve] admin token for this run: $ADAPTERSERVE_ADMIN_TOKEN"
  echo "[serve] (export ADAPTERSERVE_ADMIN_TOKEN=... in the client's shell to use upload/delete/pin)"
fi
exec "$VENV/bin/adapterserve" serve --demo-adapters --store "${ADAPTERSERVE_STORE:-$ROOT/adapters-store}" "$@"
