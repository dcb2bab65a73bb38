#!/usr/bin/env bash
# CI as a new machine runs it, for a developer: a fresh clone of this checkout's HEAD into /work/NAME, a second
# Docker engine with an empty data root on its own socket (no image or layer cache), empty caches, then
# `CI=true bash .ci/run`; prints the exit status and the wall time. About 40 GB of disk: the engine's data
# root (two 9 GB images) is removed at the end.
#   .ci/bare-machine.sh NAME        (add `yes >/dev/null &` beside it to keep one core busy)
set -Eeuo pipefail

main() {
  local name="${1:-ci-bare}" source root start status=0
  source="$(git -C "$(dirname "${BASH_SOURCE[0]}")/.." rev-parse --show-toplevel)"
  root="/tmp/$name"
  rm -rf "/work/$name" "$root"
  mkdir -p "$root/cache" "$root/docker"
  git clone -q "$source" "/work/$name"
  dockerd --data-root "$root/docker/root" --exec-root "$root/docker/exec" --pidfile "$root/docker/pid" \
    -H "unix://$root/docker/sock" --bridge=none --iptables=false >"$root/dockerd.log" 2>&1 &
  export DOCKER_HOST="unix://$root/docker/sock"
  for _ in $(seq 60); do
    /usr/bin/docker info >/dev/null 2>&1 && break
    sleep 1
  done
  export XDG_CACHE_HOME="$root/cache" npm_config_cache="$root/cache/npm"
  start="$(date +%s)"
  (cd "/work/$name" && CI=true bash .ci/run) || status=$?
  echo "bare-machine: exit $status after $(($(date +%s) - start)) s"
  kill "$(cat "$root/docker/pid")" || true
  sleep 5
  umount -l "$root/docker/exec/netns/default" 2>/dev/null || true
  rm -rf "$root/docker"
  return "$status"
}

main "$@"
