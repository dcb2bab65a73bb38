#!/usr/bin/env bash
# The one test command: makes .venv (uv, pinned requirements + dev tools) if needed, then lints,
# type-checks and runs pytest. Extra arguments go to pytest, e.g. ./test.sh -k local_api -x
set -Eeuo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"

# shellcheck source=start.sh
source ./start.sh  # make_venv: the same environment the worker runs in, plus the dev tools

lint() {
  .venv/bin/ruff check .
  .venv/bin/ruff format --check .
  .venv/bin/mypy
  if command -v shellcheck >/dev/null 2>&1; then
    shellcheck ./*.sh .ci/run
  else
    echo "shellcheck not installed: shell scripts not linted (apt-get install shellcheck)" >&2
  fi
}

main() {
  make_venv "[dev]"
  lint
  .venv/bin/python -m pytest "$@"
}

main "$@"
