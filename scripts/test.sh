#!/usr/bin/env bash
# Runs every check and test of the workspace, installing the real peers the tests use
# (helm) when they are missing. Usage: scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

ensure_helm() {
  command -v helm >/dev/null 2>&1 && return
  local installer=../shared/tools/install-helm.sh
  if [ -x "$installer" ] || [ -f "$installer" ]; then
    echo "==> installing helm with $installer"
    bash "$installer" >/dev/null
    hash -r
  else
    echo "helm is not installed and $installer is not here: install helm 3.x or 4.x (https://helm.sh/docs/intro/install/) and run again" >&2
    exit 1
  fi
}

ensure_helm

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> cargo test"
cargo test --workspace --locked
