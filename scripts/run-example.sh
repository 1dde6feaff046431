#!/usr/bin/env bash
# Runs the example plant end to end on this machine: a local nats-server with JetStream
# (installed from Debian when missing), the ingestor polling the example devices from its
# in-process simulator, a setpoint written through the ingestor, and a live view of the
# points (and the write's audit) arriving in JetStream.
#
# Usage: scripts/run-example.sh [seconds]   (default 15; 0 runs until Ctrl-C)
# With no nats-server installable, the ingestor still runs and buffers every point in its
# queue, saying so, and delivers them once a broker appears on the port it was given.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-15}

if ! command -v nats-server >/dev/null 2>&1; then
  echo "==> installing nats-server (Debian package)"
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  { $sudo apt-get update -qq && $sudo apt-get install -y -qq nats-server >/dev/null; } \
    || echo "nats-server could not be installed: the ingestor will buffer points until a broker appears"
fi

echo "==> building tagstream-ingestor"
cargo build -q -p tagstream-ingestor
bin=target/debug/tagstream-ingestor

work=$(mktemp -d)
pids=()
cleanup() {
  # Newest first: the ingestor drains to a broker that is still there.
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill -TERM "${pids[i]}" 2>/dev/null || true
    wait "${pids[i]}" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
url="nats://127.0.0.1:$port"
if command -v nats-server >/dev/null 2>&1; then
  nats-server -js -a 127.0.0.1 -p "$port" -sd "$work/nats" >"$work/nats.log" 2>&1 &
  pids+=($!)
  echo "==> nats-server with JetStream on $url"
fi

echo "==> ingestor: example plant (deploy/examples), simulated devices, queue in $work/queue"
"$bin" run -f deploy/examples --simulate --nats-url "$url" --queue-dir "$work/queue" \
  --http 127.0.0.1:9464 >"$work/ingestor.log" 2>&1 &
pids+=($!)
sleep 1
echo "    status: curl -s 127.0.0.1:9464/status    metrics: curl -s 127.0.0.1:9464/metrics"

if command -v nats-server >/dev/null 2>&1; then
  subject=tagstream-write.default.plant-a.boiler.setpoint
  echo "==> in 3 s, a write through the ingestor: $bin write --nats-url $url --subject $subject 72.5"
  ( sleep 3; "$bin" write --nats-url "$url" --subject "$subject" --requested-by run-example 72.5 2>&1 \
      | sed 's/^/    write: /' ) &
  pids+=($!)
  echo "==> points arriving in JetStream (tagstream.default.plant-a.>):"
  if [ "$seconds" = 0 ]; then
    "$bin" tail --nats-url "$url" --subject 'tagstream.default.plant-a.>'
  else
    timeout "$seconds" "$bin" tail --nats-url "$url" --subject 'tagstream.default.plant-a.>' || true
  fi
else
  echo "==> no broker: the ingestor keeps buffering; its log says so:"
  sleep "${seconds:-15}"
  grep -i "broker" "$work/ingestor.log" | tail -3 || true
fi

echo "==> queue and publisher now:"
curl -s 127.0.0.1:9464/status | python3 -c 'import json,sys; s=json.load(sys.stdin); print(json.dumps({"queue": s["queue"], "publisher": s["publisher"], "pointsPolled": s["pointsPolled"], "pointsDerived": s["pointsDerived"], "writes": s["writes"]}, indent=2))'
