#!/usr/bin/env bash
# A real Kubernetes control plane for the tests, as controller-runtime's envtest gives Go
# operators: etcd, kube-apiserver and kube-controller-manager on loopback, no node.
#
#   scripts/control-plane.sh build 1.37        builds the binaries (cached, see below)
#   scripts/control-plane.sh run 1.37 -- CMD   starts a fresh control plane, runs CMD with
#                                              TAGSTREAM_KUBECONFIG (and KUBECONFIG) set to
#                                              its admin kubeconfig, stops everything after
#   scripts/control-plane.sh versions          the versions it knows, newest first
#
# The binaries are built from the k8s.io/kubernetes Go module pinned in
# e2e/controlplane/k8s-<minor>/ (etcd at the version that Kubernetes release requires)
# into target/controlplane/<minor>/, or $TAGSTREAM_CONTROL_PLANE_CACHE/<minor>/; a second
# build builds nothing, and Go's build cache makes a rebuild after `cargo clean` quick.
# Each run gets its own etcd data directory, free ports, a CA and serving certificate
# made with openssl, a static admin token, and a trap that stops and reaps every process
# on exit or failure.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"

versions() { ls -1 "$root/e2e/controlplane" | sed -n 's/^k8s-//p' | sort -t. -k2 -n -r; }

bin_dir() { echo "${TAGSTREAM_CONTROL_PLANE_CACHE:-$root/target/controlplane}/$1"; }

build() {
  local minor=$1 module="$root/e2e/controlplane/k8s-$1" out version ldflags
  [ -f "$module/go.mod" ] || { echo "no pinned module for Kubernetes $minor (known: $(versions | xargs))" >&2; exit 2; }
  out=$(bin_dir "$minor")
  if [ -x "$out/etcd" ] && [ -x "$out/kube-apiserver" ] && [ -x "$out/kube-controller-manager" ] &&
    [ "$out/.built" -nt "$module/go.mod" ] && [ "$out/.built" -nt "$0" ]; then
    return
  fi
  version=$(sed -n 's#^\s*k8s.io/kubernetes \(v[0-9.]*\)$#\1#p' "$module/go.mod")
  command -v go >/dev/null || { echo "Go is needed to build the control plane (https://go.dev/dl, or Debian's golang)" >&2; exit 1; }
  echo "==> building etcd, kube-apiserver and kube-controller-manager $version into $out" >&2
  mkdir -p "$out"
  # -checklinkname=0: Kubernetes 1.29's dependencies (reflect2) reach into the runtime
  # in a way Go 1.23 and later refuse by default. No VCS stamp: this repository's commit
  # would relink the servers after every commit. The version stamp is what Kubernetes'
  # own build writes, so the servers report their release.
  ldflags="-s -w -checklinkname=0"
  for var in gitVersion=$version gitMajor=1 gitMinor=${minor#1.} gitTreeState=clean; do
    ldflags+=" -X k8s.io/component-base/version.$var -X k8s.io/client-go/pkg/version.$var"
  done
  (cd "$module" && GOFLAGS=-buildvcs=false GOTOOLCHAIN=local go build -trimpath -ldflags='-s -w -checklinkname=0' -o "$out/etcd" go.etcd.io/etcd/server/v3)
  (cd "$module" && GOFLAGS=-buildvcs=false GOTOOLCHAIN=local go build -trimpath -ldflags="$ldflags" -o "$out/" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager)
  touch "$out/.built"
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Waits up to $2 seconds for $1 (a command) to succeed while the last process started
# runs; prints the log $3 on failure.
wait_for() {
  local check=$1 seconds=$2 log=$3
  for _ in $(seq $((seconds * 5))); do
    eval "$check" >/dev/null 2>&1 && return
    kill -0 "${pids[-1]}" 2>/dev/null || { echo "control plane: $(basename "$log" .log) exited" >&2; break; }
    sleep 0.2
  done
  echo "control plane: '$check' did not succeed within ${seconds}s; last lines of $log:" >&2
  tail -30 "$log" >&2
  return 1
}

certificates() {
  local dir=$1
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=tagstream-test-ca \
    -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj /CN=kube-apiserver -keyout "$dir/apiserver.key" \
    -out "$dir/apiserver.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\n' >"$dir/san.ext"
  openssl x509 -req -in "$dir/apiserver.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
    -days 2 -extfile "$dir/san.ext" -out "$dir/apiserver.crt" 2>/dev/null
  openssl genrsa -out "$dir/sa.key" 2048 2>/dev/null
  openssl rsa -in "$dir/sa.key" -pubout -out "$dir/sa.pub" 2>/dev/null
}

run() {
  local minor=$1
  shift
  [ "${1:-}" = -- ] && shift
  [ $# -gt 0 ] || { echo "usage: control-plane.sh run <minor> -- CMD..." >&2; exit 2; }
  build "$minor"
  local bin etcd_port peer_port api_port token status=0
  bin=$(bin_dir "$minor")
  dir=$(mktemp -d "${TMPDIR:-/tmp}/tagstream-control-plane.XXXXXX")
  pids=()
  # shellcheck disable=SC2317 # called by the trap
  stop() {
    local pid
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      kill -9 "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
    done
    [ "${TAGSTREAM_CONTROL_PLANE_KEEP:-0}" = 1 ] && echo "control plane files kept in $dir" >&2 || rm -rf "$dir"
  }
  trap stop EXIT
  trap 'exit 130' INT TERM

  certificates "$dir"
  token=$(openssl rand -hex 16)
  printf '%s,admin,admin,system:masters\n' "$token" >"$dir/tokens.csv"
  etcd_port=$(free_port)
  peer_port=$(free_port)
  api_port=$(free_port)

  "$bin/etcd" --name test --data-dir "$dir/etcd" --unsafe-no-fsync \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-cluster "test=http://127.0.0.1:$peer_port" --log-level warn >"$dir/etcd.log" 2>&1 &
  pids+=($!)
  wait_for "curl -fsS http://127.0.0.1:$etcd_port/health" 30 "$dir/etcd.log"

  "$bin/kube-apiserver" --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$api_port" \
    --tls-cert-file "$dir/apiserver.crt" --tls-private-key-file "$dir/apiserver.key" \
    --client-ca-file "$dir/ca.crt" --token-auth-file "$dir/tokens.csv" --authorization-mode RBAC \
    --service-account-issuer https://kubernetes.default.svc --service-account-key-file "$dir/sa.pub" \
    --service-account-signing-key-file "$dir/sa.key" --service-cluster-ip-range 10.0.0.0/24 \
    --allow-privileged --endpoint-reconciler-type none --cert-dir "$dir/apiserver-certs" >"$dir/kube-apiserver.log" 2>&1 &
  pids+=($!)
  wait_for "curl -fsS --cacert $dir/ca.crt -H 'Authorization: Bearer $token' https://127.0.0.1:$api_port/readyz" 90 \
    "$dir/kube-apiserver.log"

  cat >"$dir/kubeconfig" <<KUBECONFIG
apiVersion: v1
kind: Config
clusters:
- name: test
  cluster:
    server: https://127.0.0.1:$api_port
    certificate-authority-data: $(base64 -w0 <"$dir/ca.crt")
users:
- name: admin
  user:
    token: $token
contexts:
- name: test
  context: {cluster: test, user: admin}
current-context: test
KUBECONFIG

  "$bin/kube-controller-manager" --kubeconfig "$dir/kubeconfig" --leader-elect=false \
    --bind-address 127.0.0.1 --secure-port 0 --service-account-private-key-file "$dir/sa.key" \
    --root-ca-file "$dir/ca.crt" --use-service-account-credentials=false \
    >"$dir/kube-controller-manager.log" 2>&1 &
  pids+=($!)
  # The namespace controller's service account exists once the controllers run.
  wait_for "curl -fsS --cacert $dir/ca.crt -H 'Authorization: Bearer $token' \
    https://127.0.0.1:$api_port/api/v1/namespaces/default/serviceaccounts/default" 60 \
    "$dir/kube-controller-manager.log"

  echo "==> Kubernetes $("$bin/kube-apiserver" --version | cut -d' ' -f2) on https://127.0.0.1:$api_port (logs in $dir)" >&2
  TAGSTREAM_KUBECONFIG="$dir/kubeconfig" KUBECONFIG="$dir/kubeconfig" \
    TAGSTREAM_CONTROL_PLANE_LOGS="$dir" TAGSTREAM_KUBE_MINOR="$minor" "$@" || status=$?
  return "$status"
}

case "${1:-}" in
  build) build "${2:?usage: control-plane.sh build <minor>}" ;;
  run) shift; run "$@" ;;
  versions) versions ;;
  *) sed -n '2,18p' "$0" >&2; exit 2 ;;
esac
