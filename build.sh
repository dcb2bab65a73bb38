#!/usr/bin/env bash
# Build the worker image with docker buildx, for linux/amd64 (what RunPod runs), and optionally push it.
#
# Usage: ./build.sh [--tag TAG] [--push] [--no-cache] [--platform PLATFORM] [--bake none|nodes|models]
#                   [--build-arg NAME=VALUE]...
#   --tag TAG            the image tag (default: $IMAGE_TAG, else latest)
#   --push               push to the registry instead of loading the image into the local Docker
#   --no-cache           rebuild every layer
#   --platform PLATFORM  linux/amd64 (the default and the only one: the Dockerfile pins it)
#   --bake MODE          none (default): provision at run time; nodes: ComfyUI + custom nodes in the image;
#                        models: nodes and models too (a fat image; see docs/deploy.md)
#   --build-arg N=V      passed to the build, e.g. ACCELERATORS=true, WITH_JUPYTER=true
# The image is [$IMAGE_REGISTRY/]$IMAGE_NAME:TAG ($IMAGE_NAME defaults to comfy-worker).
# HF_TOKEN and CIVITAI_TOKEN, when set, reach the build as BuildKit secrets (for gated downloads while
# baking), so they are in no layer; so does CA_BUNDLE_FILE (a CA bundle to trust behind a TLS-inspecting
# proxy, as the ca_bundle secret). Sourcing this file defines the functions without running anything.
set -Eeuo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PLATFORM_DEFAULT="linux/amd64"

log() {
  printf '%s: %s\n' "$(basename "$0")" "$*" >&2
}

die() {
  log "$*"
  exit 1
}

usage() {
  sed -n '2,17s/^# \{0,1\}//p' "$ROOT/build.sh"
}

# parse_args ARGS...: the options into OPT_* globals (deploy.sh reads them too).
parse_args() {
  OPT_TAG="${IMAGE_TAG:-latest}"
  OPT_PUSH=false
  OPT_NO_CACHE=false
  OPT_PLATFORM="$PLATFORM_DEFAULT"
  OPT_BAKE=none
  OPT_BUILD_ARGS=()
  while (($# > 0)); do
    case "$1" in
      --tag | --platform | --bake | --build-arg)
        (($# >= 2)) || { log "$1 needs a value"; exit 2; }
        case "$1" in
          --tag) OPT_TAG="$2" ;;
          --platform) OPT_PLATFORM="$2" ;;
          --bake) OPT_BAKE="$2" ;;
          --build-arg) OPT_BUILD_ARGS+=("$2") ;;
        esac
        shift 2
        ;;
      --push) OPT_PUSH=true; shift ;;
      --no-cache) OPT_NO_CACHE=true; shift ;;
      -h | --help) usage; exit 0 ;;
      *) log "unknown option '$1' (see --help)"; exit 2 ;;
    esac
  done
  case "$OPT_BAKE" in
    none | nodes | models) ;;
    *) log "--bake '$OPT_BAKE': use none, nodes or models"; exit 2 ;;
  esac
  if [[ "$OPT_PLATFORM" != "$PLATFORM_DEFAULT" ]]; then
    log "--platform '$OPT_PLATFORM': the image is $PLATFORM_DEFAULT only (RunPod runs it; the Dockerfile pins it)"
    exit 2
  fi
  if [[ -z "$OPT_TAG" || "$OPT_TAG" == *[:/@]* ]]; then
    log "--tag '$OPT_TAG': give the tag only (set IMAGE_REGISTRY and IMAGE_NAME for the rest)"
    exit 2
  fi
}

# image_ref: [registry/]name:tag.
image_ref() {
  local registry="${IMAGE_REGISTRY:-}"
  printf '%s%s:%s\n' "${registry:+${registry%/}/}" "${IMAGE_NAME:-comfy-worker}" "$OPT_TAG"
}

# require_docker: the docker client, its buildx plugin and a running daemon, each with its own message.
require_docker() {
  command -v docker >/dev/null 2>&1 ||
    die "docker is not installed (or not on PATH): install Docker Engine or Docker Desktop first"
  docker buildx version >/dev/null 2>&1 ||
    die "docker buildx is missing: install the buildx plugin (Debian/Ubuntu: apt-get install docker-buildx-plugin)"
  docker info >/dev/null 2>&1 ||
    die "the Docker daemon is not running (docker info failed): start Docker, or check that you may use its socket"
}

# buildx_args: the `docker buildx build` arguments, one a line.
buildx_args() {
  local arg name
  printf '%s\n' buildx build --platform "$OPT_PLATFORM" --file "$ROOT/Dockerfile" --tag "$(image_ref)" \
    --build-arg "BAKE=$OPT_BAKE"
  for arg in "${OPT_BUILD_ARGS[@]}"; do
    printf '%s\n' --build-arg "$arg"
  done
  for name in HF_TOKEN CIVITAI_TOKEN; do
    if [[ -n "${!name:-}" ]]; then
      printf '%s\n' --secret "id=$name,env=$name"
    fi
  done
  if [[ -n "${CA_BUNDLE_FILE:-}" ]]; then
    printf '%s\n' --secret "id=ca_bundle,src=$CA_BUNDLE_FILE"
  fi
  if [[ "$OPT_NO_CACHE" == true ]]; then
    printf '%s\n' --no-cache
  fi
  if [[ "$OPT_PUSH" == true ]]; then
    printf '%s\n' --push
  else
    printf '%s\n' --load
  fi
  printf '%s\n' "$ROOT"
}

build() {
  local args=()
  mapfile -t args < <(buildx_args)
  log "building $(image_ref) (bake: $OPT_BAKE, push: $OPT_PUSH)"
  docker "${args[@]}"
  log "built $(image_ref)"
}

main() {
  parse_args "$@"
  require_docker
  build
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  main "$@"
fi
