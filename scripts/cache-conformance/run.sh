#!/usr/bin/env bash
# Run the HTTP cache conformance suite (cache-tests.fyi, npm package http-cache-tests) against the
# Meridian edge on loopback, and score it beside the suite's published results for Varnish,
# nginx, Squid, Traffic Server and others.  Needs node and npm (Debian: nodejs, npm).
#   bash scripts/cache-conformance/run.sh          # SHOW_FAILURES=1 lists the failed required tests
#   TEST_ID=age-parse-negative bash scripts/cache-conformance/run.sh   # one test, dumped
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
work="$(mktemp -d /tmp/meridian-cache-tests.XXXXXX)"
origin_port="${ORIGIN_PORT:-8000}"   # the suite's origin server listens here
edge_port="${EDGE_PORT:-18411}"
python="${PYTHON:-$root/.venv/bin/python}"
[ -x "$python" ] || python=python3

(cd "$work" && npm install --silent --no-audit --no-fund http-cache-tests@0.4.5 >/dev/null)
suite="$work/node_modules/http-cache-tests"

cat > "$work/edge.yaml" <<YAML
listeners: {edge: 127.0.0.1:$edge_port, edge_admin: 127.0.0.1:$((edge_port + 1)),
            dns: 127.0.0.1:$((edge_port + 2)), dns_admin: 127.0.0.1:$((edge_port + 3))}
regions:
  local: {location: {lat: 39.0, lon: -77.5}, backends: ["http://127.0.0.1:$origin_port"], addresses: [127.0.2.1]}
pops:
  iad: {location: {lat: 39.0, lon: -77.5}, addresses: [127.0.1.1]}
dns:
  zone: meridian.test
  soa: {mname: ns1.meridian.test, rname: hostmaster.meridian.test}
  ns: [{name: ns1.meridian.test, addresses: [127.0.0.1]}]
  names: {api: {targets: pops}}
# The suite's origin serves / (not /healthz); its stale-if-error tests drop connections on
# purpose, which must not eject the only backend.
health: {path: /}
outlier: {enabled: false}
edge:
  services: {origin: {}}
  routes: [{name: all, service: origin}]
  cache: {memory: 64MiB}
  timeouts: {upstream_idle: 2s}
YAML

pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
(cd "$suite" && npm_package_config_protocol=http npm_package_config_port="$origin_port" \
   npm_package_config_pidfile="$work/server.pid" exec node server/server.mjs >"$work/origin.log" 2>&1) &
pids+=($!)
(cd "$root" && exec "$python" -m edge --config "$work/edge.yaml" --pop iad --log-level warning \
   >"$work/edge.log" 2>&1) &
pids+=($!)
for _ in $(seq 100); do
  curl -sf -o /dev/null "http://127.0.0.1:$edge_port/" && break
  sleep 0.1
done
if [ -n "${TEST_ID:-}" ]; then  # one test, with the suite's request/response dump
  (cd "$suite" && npm_package_config_base="http://127.0.0.1:$edge_port" \
     npm_package_config_id="$TEST_ID" timeout 120 node --no-warnings cli.mjs) || true
  exit 0
fi
(cd "$suite" && npm_package_config_base="http://127.0.0.1:$edge_port" npm_package_config_id= \
   timeout 900 node --no-warnings cli.mjs >"$work/meridian.json")
cp "$work/meridian.json" "${OUT:-/tmp/meridian-cache-tests.json}"
node "$here/score.mjs" "$suite" "$work/meridian.json" \
  "$suite/results/varnish.json" "$suite/results/squid.json" "$suite/results/trafficserver.json" \
  "$suite/results/nginx.json" "$suite/results/fastly.json" "$suite/results/apache.json"
