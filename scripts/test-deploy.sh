#!/usr/bin/env bash
# The operator's files, checked with the tools that will read them:
#   - the systemd unit with `systemd-analyze verify`;
#   - the Kubernetes manifests against the API schemas (kubernetes-validate, in a venv of its own);
#   - the Prometheus scrape config and rules with `promtool check`, the alerts with `promtool test
#     rules` (unit tests in deploy/prometheus/roomcast-rules.test.yml);
#   - a real Prometheus scraping a real edge: the target is up, a roomcast series and a recording
#     rule answer a query, and `promtool check metrics` passes on the edge's real /metrics;
#   - the Grafana dashboard: valid JSON whose every query names metrics the real edge exports.
# Needs: target/debug/edge (cargo test --workspace builds it), prometheus and promtool
# (scripts/setup.sh installs Debian's prometheus package), python3 with venv, PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
EDGE=${ROOMCAST_EDGE_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/debug/edge}
fail() { echo "test-deploy: FAIL: $*" >&2; exit 1; }
[[ -x $EDGE ]] || fail "no edge binary at $EDGE (cargo test --workspace --no-run)"
command -v promtool >/dev/null || fail "promtool missing (scripts/setup.sh installs prometheus)"
command -v prometheus >/dev/null || fail "prometheus missing (scripts/setup.sh installs it)"
TMP=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

echo "test-deploy: systemd unit"
sed "s#/usr/local/bin/edge#$EDGE#" deploy/systemd/roomcast-edge.service >"$TMP/roomcast-edge.service"
out=$(systemd-analyze verify "$TMP/roomcast-edge.service" 2>&1 || true)
# verify also reports on units the host itself has; only lines about ours count.
if grep -i "roomcast-edge" <<<"$out" | grep -v "^$"; then fail "systemd-analyze verify: see above"; fi

echo "test-deploy: Kubernetes manifests"
VENV=$ROOT/target/deploy-venv
if [[ ! -x $VENV/bin/kubernetes-validate ]]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q -r scripts/deploy/requirements.txt
fi
"$VENV/bin/kubernetes-validate" --strict deploy/k8s/*.yaml

echo "test-deploy: Prometheus config and rules"
promtool check config deploy/prometheus/prometheus.yml
promtool check rules deploy/prometheus/roomcast-rules.yml
(cd deploy/prometheus && promtool test rules roomcast-rules.test.yml)

echo "test-deploy: a real Prometheus scraping a real edge"
WS=$(free_port); HTTP=$(free_port); PROM=$(free_port)
"$EDGE" --no-store --listen "127.0.0.1:$WS" --http "127.0.0.1:$HTTP" --shards 1 >"$TMP/edge.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do curl -sf -o /dev/null "127.0.0.1:$HTTP/healthz" && break; sleep 0.1; done
# Some traffic, and the first kernel probe, so that the scrape has those families too.
for kind in gift chat; do
  curl -sf -o /dev/null -X POST "127.0.0.1:$HTTP/v1/rooms/deploy/messages" -d "{\"kind\":\"$kind\",\"body\":1}" \
    || fail "publish $kind"
done
for _ in $(seq 50); do curl -sf "127.0.0.1:$HTTP/metrics" | grep -q '^roomcast_tcp_sockets' && break; sleep 0.2; done
curl -sf "127.0.0.1:$HTTP/metrics" >"$TMP/metrics.txt" || fail "no /metrics"
promtool check metrics <"$TMP/metrics.txt" || fail "promtool check metrics on the edge's /metrics"
cp deploy/prometheus/roomcast-rules.yml "$TMP/"
cat >"$TMP/prometheus.yml" <<YML
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: [roomcast-rules.yml]
scrape_configs:
  - job_name: roomcast
    static_configs:
      - targets: ["127.0.0.1:$HTTP"]
YML
prometheus --config.file="$TMP/prometheus.yml" --storage.tsdb.path="$TMP/tsdb" \
  --web.listen-address="127.0.0.1:$PROM" >"$TMP/prometheus.log" 2>&1 &
PIDS+=($!)
query() { curl -sf --get "127.0.0.1:$PROM/api/v1/query" --data-urlencode "query=$1" 2>/dev/null || true; }
has() { python3 -c 'import json,sys; d=json.load(sys.stdin); sys.exit(0 if d["data"]["result"] else 1)' 2>/dev/null; }
ok=
for _ in $(seq 60); do
  if query 'up{job="roomcast"} == 1' | has && query 'roomcast_health{state="ok"}' | has \
     && query 'instance:roomcast_connections:sum' | has; then ok=1; break; fi
  sleep 0.5
done
[[ -n $ok ]] || { tail -20 "$TMP/prometheus.log" >&2; fail "Prometheus never had the edge's series"; }

echo "test-deploy: Grafana dashboard"
python3 - deploy/grafana/roomcast.json "$TMP/metrics.txt" edge/src/metrics.rs <<'PY'
import json, re, sys
dash = json.load(open(sys.argv[1]))
# Families with labels show in a scrape only once something happened to them (a refusal, a
# drop): those count if the edge registers them (a string literal in metrics.rs).
registered = {"roomcast_" + n for n in re.findall(r'"([a-z][a-z0-9_]*)"', open(sys.argv[3]).read())}
have = set()
for line in open(sys.argv[2]):
    if line.startswith("# TYPE "):
        name, kind = line.split()[2:4]
        have.add(name)
        if kind == "histogram":
            have.update({name + "_bucket", name + "_count", name + "_sum"})
have.add("up")
exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
assert exprs, "no queries"
missing = set()
for e in exprs:
    for name in re.findall(r"\b(roomcast_[a-z_]+|up)\b(?=\s*[{\[)])", e):
        if name not in have and name not in registered:
            missing.add(name)
if missing:
    sys.exit(f"dashboard queries metrics the edge does not export: {sorted(missing)}")
print(f"test-deploy: {len(exprs)} dashboard queries, every metric exported")
PY
echo "test-deploy: ok"
