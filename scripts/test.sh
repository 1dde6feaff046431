#!/usr/bin/env bash
# Runs every check and test of the workspace, installing the real peers the tests use
# (helm, socat, nats-server) when they are missing, then builds the container images and
# runs them (scripts/images.sh) where a Docker engine can be had: as root (Debian's
# docker.io is installed and dockerd started when missing) or with one already running.
# Elsewhere the images step says SKIPPED; TAGSTREAM_REQUIRE_IMAGES=1 (CI) makes that a
# failure. Usage: scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

ensure_helm() {
  command -v helm >/dev/null 2>&1 && return
  echo "==> installing helm with scripts/install-helm.sh"
  # Not root: the installer puts helm in ~/.local/bin, which may not be on PATH yet.
  local helm
  helm=$(bash scripts/install-helm.sh | tail -1)
  PATH="$(dirname "$helm"):$PATH"
  export PATH
  hash -r
}

# Debian packages the tests use as real peers.
ensure_packages() {
  local missing=()
  for tool in "$@"; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || missing+=("${tool##*:}")
  done
  [ ${#missing[@]} -eq 0 ] && return
  echo "==> installing ${missing[*]}"
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

ensure_helm
ensure_packages socat:socat nats-server:nats-server

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> cargo test"
cargo test --workspace --locked

if [ "$(id -u)" = 0 ] || docker info >/dev/null 2>&1; then
  echo "==> images (scripts/images.sh)"
  scripts/images.sh
elif [ "${TAGSTREAM_REQUIRE_IMAGES:-0}" = 1 ]; then
  echo "images: no Docker engine and not root, but TAGSTREAM_REQUIRE_IMAGES=1" >&2
  exit 1
else
  echo "SKIPPED images: no Docker engine answers and this is not root (scripts/images.sh needs one)"
fi
