#!/usr/bin/env bash
# The worker's entrypoint: make the Python environment (local runs), then run handler.py.
#   On RunPod (RUNPOD_WEBHOOK_GET_JOB is set): the serverless worker takes jobs.
#   Anywhere else: the runpod SDK's local API on RP_API_HOST:RP_API_PORT (default 127.0.0.1:8000).
# The worker starts ComfyUI from COMFYUI_DIR (or attaches to one at COMFY_API_URL): see the README.
# Sourcing this file defines the functions without running anything (test.sh reuses make_venv).
set -Eeuo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

log() {
  printf 'start.sh: %s\n' "$*" >&2
}

# make_venv [EXTRAS]: .venv with the pinned requirements and this package, made with uv (idempotent).
make_venv() {
  local extras="${1:-}"
  if ! command -v uv >/dev/null 2>&1; then
    log "installing uv"
    python3 -m pip install --quiet uv
  fi
  if [[ ! -x "$ROOT/.venv/bin/python" ]]; then
    log "creating $ROOT/.venv"
    uv venv --quiet --python "$(command -v python3)" "$ROOT/.venv"
  fi
  uv pip install --quiet --python "$ROOT/.venv/bin/python" -r "$ROOT/requirements.txt" -e "$ROOT$extras"
}

run_worker() {
  local python="$1"
  if [[ -n "${RUNPOD_WEBHOOK_GET_JOB:-}" ]]; then
    exec "$python" "$ROOT/handler.py"
  fi
  log "local mode: the runpod local API on ${RP_API_HOST:-127.0.0.1}:${RP_API_PORT:-8000}"
  exec "$python" "$ROOT/handler.py" --rp_serve_api \
    --rp_api_host "${RP_API_HOST:-127.0.0.1}" --rp_api_port "${RP_API_PORT:-8000}"
}

main() {
  local python="${WORKER_PYTHON:-}"
  if [[ -z "$python" ]]; then
    make_venv ""
    python="$ROOT/.venv/bin/python"
  fi
  run_worker "$python"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  main "$@"
fi
