#!/usr/bin/env bash
# The container's entrypoint, and the one command to run the worker on a plain Linux machine.
#   start.sh            make the Python environment (unless WORKER_PYTHON is set), provision config.yml
#                       (SHA-gated: ComfyUI, custom nodes, models), Jupyter if asked for, then the worker:
#                       the RunPod serverless loop when RUNPOD_WEBHOOK_GET_JOB is set, else the runpod local
#                       API on RP_API_HOST:RP_API_PORT (default 127.0.0.1:8000).
#   start.sh provision  provisioning only; non-zero exit when a required item failed (image builds use it).
# SIGTERM/SIGINT stop it at any stage, provisioning included. The logic lives in Python (comfy_worker.provision,
# comfy_worker.runtime.app); see the README for every env var. Sourcing this file defines the functions without
# running anything (test.sh reuses make_venv).
set -Eeuo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CHILD_PIDS=()
STOPPING=""
jupyter_pid=""

log() {
  printf 'start.sh: %s\n' "$*" >&2
}

# make_venv [EXTRAS]: .venv with the pinned requirements and this package, made with uv. Skipped (no uv call)
# while requirements.txt, pyproject.toml and EXTRAS are what the stamp in .venv says they were.
make_venv() {
  local extras="${1:-}" stamp="$ROOT/.venv/.comfy-worker-stamp" wanted
  wanted="$(cat "$ROOT/requirements.txt" "$ROOT/pyproject.toml" - <<<"$extras" | sha256sum)"
  if [[ -x "$ROOT/.venv/bin/python" && -f "$stamp" && "$(<"$stamp")" == "$wanted" ]]; then
    return
  fi
  if ! command -v uv >/dev/null 2>&1; then
    log "installing uv"
    python3 -m pip install --quiet uv
  fi
  if [[ ! -x "$ROOT/.venv/bin/python" ]]; then
    log "creating $ROOT/.venv"
    uv venv --quiet --python "$(command -v python3)" "$ROOT/.venv"
  fi
  uv pip install --quiet --python "$ROOT/.venv/bin/python" -r "$ROOT/requirements.txt" -e "$ROOT$extras"
  printf '%s\n' "$wanted" >"$stamp"
}

# trust_ca_bundle: CA_BUNDLE names a PEM file of CA certificates (a TLS-inspecting proxy's) that git, pip, uv,
# requests and the downloads trust instead of the default store. Give a full bundle, e.g. the host's
# /etc/ssl/certs/ca-certificates.crt mounted read-only.
trust_ca_bundle() {
  local bundle="${CA_BUNDLE:-}"
  if [[ -z "$bundle" ]]; then
    return
  fi
  if [[ ! -r "$bundle" ]]; then
    log "CA_BUNDLE=$bundle is not a readable file: using the default CA certificates"
    return
  fi
  export SSL_CERT_FILE="$bundle" REQUESTS_CA_BUNDLE="$bundle" GIT_SSL_CAINFO="$bundle" PIP_CERT="$bundle" \
    CURL_CA_BUNDLE="$bundle"
}

worker_python() {
  if [[ -n "${WORKER_PYTHON:-}" ]]; then
    printf '%s\n' "$WORKER_PYTHON"
    return
  fi
  make_venv "" >&2
  printf '%s\n' "$ROOT/.venv/bin/python"
}

# on_signal NAME: stop the children with SIGTERM whatever came: a script's background children ignore SIGINT.
on_signal() {
  STOPPING="$1"
  log "stopping (SIG$1)"
  if ((${#CHILD_PIDS[@]})); then
    kill -TERM "${CHILD_PIDS[@]}" 2>/dev/null || true
  fi
}

# wait_child PID: wait for PID to exit even when a trapped signal interrupts `wait`; return its exit status.
wait_child() {
  local pid="$1" status=0
  wait "$pid" || status=$?
  while kill -0 "$pid" 2>/dev/null; do
    status=0
    wait "$pid" || status=$?
  done
  return "$status"
}

# provision PYTHON [--lease]: install what config.yml names; export the paths the worker needs (WORKSPACE,
# COMFYUI_DIR, ...); --lease when a worker follows (its install tree is then kept for it).
# A failure does not stop the start: the worker reports it in every job's result.
# It runs in the background so that a SIGTERM stops it at once (a foreground child would delay the trap).
provision() {
  local python="$1" paths line status=0
  shift
  paths="$(mktemp)"
  "$python" -m comfy_worker.provision --print-env "$@" >"$paths" &
  CHILD_PIDS=("$!")
  wait_child "$!" || status=$?
  CHILD_PIDS=()
  while IFS= read -r line; do
    if [[ "$line" == *=* ]]; then
      export "${line?}"
    fi
  done <"$paths"
  rm -f "$paths"
  return "$status"
}

# Jupyter on JUPYTER_PORT, only off serverless, only with a password, only where it is installed (its own
# venv, JUPYTER_PYTHON, in images built with WITH_JUPYTER=true).
start_jupyter() {
  local jupyter="${JUPYTER_PYTHON:-python3}"
  if [[ -n "${RUNPOD_WEBHOOK_GET_JOB:-}" || -z "${JUPYTER_PASSWORD:-}" ]]; then
    return
  fi
  if ! "$jupyter" -m jupyter lab --version >/dev/null 2>&1; then
    log "JUPYTER_PASSWORD is set but Jupyter is not installed for $jupyter (JUPYTER_PYTHON): not starting it"
    return
  fi
  log "Jupyter on port ${JUPYTER_PORT:-8888} (token: JUPYTER_PASSWORD)"
  # The token goes by environment, not on the command line where `ps` would show it to everyone.
  JUPYTER_TOKEN="$JUPYTER_PASSWORD" "$jupyter" -m jupyter lab --no-browser --allow-root --ip "${JUPYTER_LISTEN:-0.0.0.0}" \
    --port "${JUPYTER_PORT:-8888}" --ServerApp.root_dir="${WORKSPACE:-$ROOT}" &
  jupyter_pid="$!"
}

# run_worker PYTHON: the worker replaces this shell (exec), so signals reach it directly; with Jupyter beside
# it, it runs as a child instead and both are stopped together.
run_worker() {
  local python="$1" worker status=0
  local args=("$ROOT/handler.py")
  if [[ -z "${RUNPOD_WEBHOOK_GET_JOB:-}" ]]; then
    log "local mode: the runpod local API on ${RP_API_HOST:-127.0.0.1}:${RP_API_PORT:-8000}"
    args+=(--rp_serve_api --rp_api_host "${RP_API_HOST:-127.0.0.1}" --rp_api_port "${RP_API_PORT:-8000}")
  fi
  if [[ -z "${jupyter_pid:-}" ]]; then
    printf '%s\n' "$$" >"${WORKER_PID_FILE:-/tmp/comfy-worker.pid}" # apply_config.sh signals it
    exec "$python" "${args[@]}"
  fi
  "$python" "${args[@]}" &
  worker="$!"
  CHILD_PIDS=("$worker" "$jupyter_pid")
  printf '%s\n' "$worker" >"${WORKER_PID_FILE:-/tmp/comfy-worker.pid}"
  wait_child "$worker" || status=$?
  kill -TERM "$jupyter_pid" 2>/dev/null || true
  return "$status"
}

main() {
  local python
  trap 'on_signal TERM' TERM
  trap 'on_signal INT' INT
  trust_ca_bundle
  python="$(worker_python)"
  if [[ "${1:-}" == "provision" ]]; then
    provision "$python"
    return
  fi
  provision "$python" --lease || log "provisioning failed: the worker starts anyway and reports why in every job"
  if [[ -n "$STOPPING" ]]; then
    return 143
  fi
  start_jupyter
  run_worker "$python"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  main "$@"
fi
