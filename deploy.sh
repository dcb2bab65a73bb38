#!/usr/bin/env bash
# Build and push the worker image, then print what to paste into RunPod (docs/deploy.md walks through it).
#
# Usage: IMAGE_REGISTRY=docker.io/you ./deploy.sh [build.sh options]
#   Takes build.sh's options (--tag, --bake, --no-cache, --build-arg...); it always pushes.
set -Eeuo pipefail

# shellcheck source=build.sh
source "$(dirname "${BASH_SOURCE[0]}")/build.sh"

deploy_usage() {
  sed -n '2,5s/^# \{0,1\}//p' "$ROOT/deploy.sh"
  printf '\nbuild.sh options:\n'
  usage
}

# require_registry: pushing needs somewhere to push to; a bare name would go to Docker Hub's library.
require_registry() {
  if [[ -z "${IMAGE_REGISTRY:-}" && "${IMAGE_NAME:-}" != */* ]]; then
    die "set IMAGE_REGISTRY (e.g. docker.io/your-user or ghcr.io/your-org) to say where to push the image"
  fi
}

next_steps() {
  local ref
  ref="$(image_ref)"
  cat <<EOF

Pushed ${ref}

Next, in the RunPod console (Serverless > New Endpoint > Import from Docker Registry):
  Container image:  ${ref}
  GPU:              16-24 GB for SD 1.5 / SDXL, 24-48 GB for Flux, 48-80 GB for WAN 2.2
  Container disk:   20 GB (more for a fat image: its size plus 10 GB)
  Network volume:   recommended: ComfyUI, custom nodes and models are installed there once
Environment variables (all optional):
  CONFIG_YML        your config.yml (YAML or base64); else config.yml on the volume, else the image's
  HF_TOKEN          for gated Hugging Face models;  CIVITAI_TOKEN for Civitai downloads
  BUCKET_ENDPOINT_URL, BUCKET_ACCESS_KEY_ID, BUCKET_SECRET_ACCESS_KEY   S3 delivery of outputs
  JOB_TIMEOUT       seconds a job may run (keep it below the endpoint's execution timeout)
Then send examples/requests/model_free.json to https://api.runpod.ai/v2/<endpoint-id>/runsync.
A new tag makes new workers pull the new image; a reused tag may keep cached workers on the old one.
EOF
}

deploy_main() {
  case "${1:-}" in
    -h | --help) deploy_usage; return 0 ;;
  esac
  parse_args "$@" --push
  require_registry
  require_docker
  build
  next_steps
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  deploy_main "$@"
fi
