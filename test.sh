#!/usr/bin/env bash
# The one test command: makes .venv (uv, pinned requirements + dev tools) if needed, then lints,
# type-checks and runs pytest. Extra arguments go to pytest, e.g. ./test.sh -k local_api -x
set -Eeuo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"

ensure_uv() {
  if ! command -v uv >/dev/null 2>&1; then
    python3 -m pip install --quiet uv
  fi
}

make_venv() {
  if [[ ! -x .venv/bin/python ]]; then
    uv venv --quiet --python "$(command -v python3)" .venv
  fi
  uv pip install --quiet --python .venv/bin/python -r requirements.txt -e '.[dev]'
}

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
  ensure_uv
  make_venv
  lint
  .venv/bin/python -m pytest "$@"
}

main "$@"
