#!/usr/bin/env bash
# Set up the environment (if needed) and run the main job: the gRPC server on the embedded default
# model (SmolLM2-135M-Instruct) with the demo adapters in its store.
# Extra arguments go to `adapterserve serve`, e.g. `bash scripts/serve.sh --port 50052`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
VENV="${ADAPTERSERVE_VENV:-$ROOT/.venv}"
cd "$ROOT"
STORE="${ADAPTERSERVE_STORE:-$ROOT/adapters-store}"
if [ -z "${ADAPTERSERVE_ADMIN_TOKEN:-}" ]; then
  # Admin calls (upload, delete, pin) need a bearer token. One is made on the first start and kept in
  # the store ($STORE/.admin-token, mode 0600), so it stays valid across restarts. To pin your own,
  # export ADAPTERSERVE_ADMIN_TOKEN before running this script.
  ADAPTERSERVE_ADMIN_TOKEN="$("$VENV/bin/python" -m adapterserve.server.api.token_file "$STORE")"
  export ADAPTERSERVE_ADMIN_TOKEN
  echo "[serve] admin token: $ADAPTERSERVE_ADMIN_TOKEN"
  echo "[serve] in the client's shell: export ADAPTERSERVE_ADMIN_TOKEN=\$(cat '$STORE/.admin-token')"
fi
exec "$VENV/bin/adapterserve" serve --demo-adapters --store "$STORE" "$@"
