#!/usr/bin/env bash
# The container's entrypoint, and the one command to run the worker on a plain Linux machine.
#   start.sh            make the Python environment (unless WORKER_PYTHON is set), provision config.yml
#                       (SHA-gated: ComfyUI, custom nodes, models), Jupyter if asked for, then the worker:
#                       the RunPod serverless loop when RUNPOD_WEBHOOK_GET_JOB is set, else the runpod local
#                       API on RP_API_HOST:RP_API_PORT (default 127.0.0.1:8000).
#   start.sh provision  provisioning only; non-zero exit when a required item failed (image builds use it).
# The logic lives in Python (comfy_worker.provision, comfy_worker.runtime.app); see the README for every env var.
# Sourcing this file defines the functions without running anything (test.sh reuses make_venv).
set -Eeuo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CHILD_PIDS=()

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

worker_python() {
  if [[ -n "${WORKER_PYTHON:-}" ]]; then
    printf '%s\n' "$WORKER_PYTHON"
    return
  fi
  make_venv "" >&2
  printf '%s\n' "$ROOT/.venv/bin/python"
}

# provision PYTHON: install what config.yml names; export the paths the worker needs (WORKSPACE,
# COMFYUI_DIR, ...). A failure does not stop the start: the worker reports it in every job's result.
provision() {
  local python="$1" paths line status=0
  paths="$("$python" -m comfy_worker.provision --print-env)" || status=$?
  while IFS= read -r line; do
    if [[ "$line" == *=* ]]; then
      export "${line?}"
    fi
  done <<<"$paths"
  return "$status"
}

# Jupyter on JUPYTER_PORT, only off serverless, only with a password, only where it is installed.
start_jupyter() {
  local python="$1"
  if [[ -n "${RUNPOD_WEBHOOK_GET_JOB:-}" || -z "${JUPYTER_PASSWORD:-}" ]]; then
    return
  fi
  if ! "$python" -m jupyter lab --version >/dev/null 2>&1; then
    log "JUPYTER_PASSWORD is set but Jupyter is not installed in $python's environment: not starting it"
    return
  fi
  log "Jupyter on port ${JUPYTER_PORT:-8888} (token: JUPYTER_PASSWORD)"
  "$python" -m jupyter lab --no-browser --allow-root --ip 0.0.0.0 --port "${JUPYTER_PORT:-8888}" \
    --ServerApp.token="$JUPYTER_PASSWORD" --ServerApp.root_dir="${WORKSPACE:-$ROOT}" &
  CHILD_PIDS+=("$!")
}

stop_children() {
  log "stopping (SIG$1)"
  kill "-$1" "${CHILD_PIDS[@]}" 2>/dev/null || true
}

# run_worker PYTHON: the worker in the background, so that SIGTERM/SIGINT reach it and every child.
run_worker() {
  local python="$1" worker status=0
  local args=("$ROOT/handler.py")
  if [[ -z "${RUNPOD_WEBHOOK_GET_JOB:-}" ]]; then
    log "local mode: the runpod local API on ${RP_API_HOST:-127.0.0.1}:${RP_API_PORT:-8000}"
    args+=(--rp_serve_api --rp_api_host "${RP_API_HOST:-127.0.0.1}" --rp_api_port "${RP_API_PORT:-8000}")
  fi
  "$python" "${args[@]}" &
  worker="$!"
  CHILD_PIDS+=("$worker")
  printf '%s\n' "$worker" >"${WORKER_PID_FILE:-/tmp/comfy-worker.pid}" # apply_config.sh signals it
  trap 'stop_children TERM' TERM
  trap 'stop_children INT' INT
  wait "$worker" || status=$?
  while kill -0 "$worker" 2>/dev/null; do # a trapped signal interrupted wait: wait for the real exit
    status=0
    wait "$worker" || status=$?
  done
  kill -TERM "${CHILD_PIDS[@]}" 2>/dev/null || true
  return "$status"
}

main() {
  local python
  python="$(worker_python)"
  if [[ "${1:-}" == "provision" ]]; then
    provision "$python"
    return
  fi
  provision "$python" || log "provisioning failed: the worker starts anyway and reports why in every job"
  start_jupyter "$python"
  run_worker "$python"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  main "$@"
fi
