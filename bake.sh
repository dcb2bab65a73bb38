#!/usr/bin/env bash
# Build-time provisioning for a fat image (the Dockerfile's BAKE build argument). It runs `start.sh provision`,
# the provisioning start.sh runs at every start, so the image's WORKSPACE is ready and the SHA gate matches.
#   bake.sh none     nothing: ComfyUI, nodes and models are provisioned at run time (on the volume)
#   bake.sh nodes    ComfyUI and the custom nodes (config.yml without its models; those come at run time)
#   bake.sh models   ComfyUI, the custom nodes and the models
# Tokens for gated downloads come from BuildKit secrets (files in /run/secrets), never from ARG or ENV, so
# they are in no layer. Sourcing this file defines the functions without running anything.
set -Eeuo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SECRETS_DIR="${BAKE_SECRETS_DIR:-/run/secrets}"

log() {
  printf 'bake.sh: %s\n' "$*" >&2
}

usage() {
  sed -n '2,8s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
}

# load_secrets: export HF_TOKEN / CIVITAI_TOKEN from the build secrets that were given (values never logged),
# and trust the ca_bundle secret's CA certificates (start.sh's CA_BUNDLE).
load_secrets() {
  local name value
  if [[ -s "$SECRETS_DIR/ca_bundle" ]]; then
    export CA_BUNDLE="$SECRETS_DIR/ca_bundle"
  fi
  for name in HF_TOKEN CIVITAI_TOKEN; do
    if [[ -z "${!name:-}" && -s "$SECRETS_DIR/$name" ]]; then
      value="$(<"$SECRETS_DIR/$name")"
      export "$name=$value"
      log "$name: from the build secret"
    fi
  done
}

# use_config_arg: a CONFIG_YML build argument replaces the image's config.yml (BAKED_CONFIG), so that the
# container finds at run time the config that was baked.
use_config_arg() {
  if [[ -n "${CONFIG_YML:-}" ]]; then
    printf '%s\n' "$CONFIG_YML" >"${BAKED_CONFIG:-$ROOT/config.yml}"
    log "baking the CONFIG_YML build argument (it replaces ${BAKED_CONFIG:-$ROOT/config.yml})"
    unset CONFIG_YML
  fi
}

# config_without_models: the config start.sh would use in the image, with `models: []`, as YAML on stdout;
# nothing when it has no models (it is then provisioned as it is: the same text, the same SHA at run time).
config_without_models() {
  local config="${BAKED_CONFIG:-$ROOT/config.yml}"
  "${WORKER_PYTHON:-python3}" - "$config" <<'PY'
import sys

import yaml

with open(sys.argv[1], encoding="utf-8") as file:
    config = yaml.safe_load(file) or {}
if config.get("models"):
    config["models"] = []
    sys.stdout.write(yaml.safe_dump(config, sort_keys=False))
PY
}

main() {
  local mode="${1:-}"
  case "$mode" in
    none)
      log "BAKE=none: nothing baked; start.sh provisions at run time"
      ;;
    models)
      log "BAKE=models: ComfyUI, custom nodes and models into ${WORKSPACE:-the default workspace}"
      load_secrets
      use_config_arg
      exec "$ROOT/start.sh" provision
      ;;
    nodes)
      log "BAKE=nodes: ComfyUI and custom nodes into ${WORKSPACE:-the default workspace} (models at run time)"
      load_secrets
      use_config_arg
      CONFIG_YML="$(config_without_models)"
      if [[ -n "$CONFIG_YML" ]]; then
        export CONFIG_YML
      else
        unset CONFIG_YML
      fi
      exec "$ROOT/start.sh" provision
      ;;
    -h | --help)
      usage
      ;;
    *)
      log "unknown bake mode '${mode}': use none, nodes or models"
      usage >&2
      return 2
      ;;
  esac
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  main "$@"
fi
