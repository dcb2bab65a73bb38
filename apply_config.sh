#!/usr/bin/env bash
# Apply an edited config.yml to a running worker without restarting it or its container:
#   docker compose exec worker /opt/comfy-worker/apply_config.sh     (or ./apply_config.sh locally)
# Installs what changed (the same SHA-gated provisioning start.sh runs); when a custom node (or ComfyUI
# itself) changed, the worker restarts ComfyUI once its running job is done. New models need no restart.
# CONFIG_YML, when set in the worker's environment, still wins over an edited file.
set -Eeuo pipefail

# shellcheck source=start.sh
source "$(dirname "${BASH_SOURCE[0]}")/start.sh" # worker_python, log

main() {
  local python
  python="$(worker_python)"
  "$python" -m comfy_worker.provision --apply
}

main "$@"
