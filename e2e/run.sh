#!/usr/bin/env bash
# The end-to-end suite on kind: creates the cluster (e2e/kind.yaml), builds the two
# images and loads them into it, installs NATS with JetStream and the tagstream chart,
# then runs the Rust suite (e2e/tests/plant.rs) against it. Fails, never skips, when
# kind, docker, kubectl or helm is missing.
#
#   e2e/run.sh            # keeps the cluster afterwards; TAGSTREAM_E2E_DELETE=1 removes it
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER=${TAGSTREAM_E2E_CLUSTER:-tagstream-e2e}
TAGSTREAM_E2E_NAMESPACE=${TAGSTREAM_E2E_NAMESPACE:-tagstream-e2e-$(date +%s)}
export TAGSTREAM_E2E_NAMESPACE
VERSION=$(sed -n 's/^appVersion: "\(.*\)"/\1/p' charts/tagstream/Chart.yaml)

for tool in kind docker kubectl helm cargo; do
  command -v "$tool" >/dev/null || { echo "e2e/run.sh: '$tool' is required and not on PATH" >&2; exit 1; }
done
docker info >/dev/null 2>&1 || { echo "e2e/run.sh: the Docker engine does not answer (docker info)" >&2; exit 1; }

step() { echo; echo "==> $*"; }
dump() {
  echo "==> e2e/run.sh failed; what the cluster shows:"
  kubectl get pods -A -o wide || true
  for ns in tagstream "$TAGSTREAM_E2E_NAMESPACE" nats; do kubectl describe pods -n "$ns" || true; done
  kubectl get events -A --sort-by=.lastTimestamp | tail -80 || true
  kubectl logs -n tagstream deploy/tagstream-operator --tail=200 || true
  kubectl logs -n "$TAGSTREAM_E2E_NAMESPACE" statefulset/tagstream-plant-a --tail=200 || true
}
trap dump ERR

step "kind cluster $CLUSTER"
if ! kind get clusters | grep -qx "$CLUSTER"; then
  kind create cluster --name "$CLUSTER" --config e2e/kind.yaml --wait 180s
fi
KUBECONFIG=$(mktemp)
export KUBECONFIG
kind get kubeconfig --name "$CLUSTER" >"$KUBECONFIG"

step "images $VERSION (built here, loaded into kind)"
docker build -f deploy/docker/ingestor.Dockerfile -t "ghcr.io/tagstream/tagstream-ingestor:$VERSION" .
docker build -f deploy/docker/operator.Dockerfile -t "ghcr.io/tagstream/tagstream-operator:$VERSION" .
kind load docker-image --name "$CLUSTER" \
  "ghcr.io/tagstream/tagstream-ingestor:$VERSION" "ghcr.io/tagstream/tagstream-operator:$VERSION"

step "NATS with JetStream (deploy/nats/values.yaml)"
helm repo add nats https://nats-io.github.io/k8s/helm/charts/ --force-update >/dev/null
helm upgrade --install nats nats/nats -n nats --create-namespace \
  -f deploy/nats/values.yaml --wait --timeout 5m

step "tagstream chart (charts/tagstream/examples/kind.yaml)"
helm upgrade --install tagstream charts/tagstream -n tagstream --create-namespace \
  -f charts/tagstream/examples/kind.yaml --wait --timeout 5m

step "the e2e suite"
timeout 30m cargo test -p tagstream-e2e --locked -- --nocapture

if [[ -n "${TAGSTREAM_E2E_DELETE:-}" ]]; then
  step "deleting cluster $CLUSTER"
  kind delete cluster --name "$CLUSTER"
fi
echo "e2e: passed"
