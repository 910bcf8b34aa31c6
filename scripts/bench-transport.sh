#!/usr/bin/env bash
# The four transports of issue #18 side by side, in one run: plain ws, wss (rustls in the shards,
# user-space encryption), ws + permessage-deflate, wss + permessage-deflate. One edge (2 shards)
# per case, CONNS members (10^4) in one room on ENCODING (rkyv: roomcast.rkyv.v2, or json:
# roomcast.json.v1, what browsers use), gifts GIFT/s and chat CHAT/s for SECS s; the load
# generator's members decrypt and inflate on the same CPUs. Test CA and ECDSA P-256 certificate
# made here with openssl (as scripts/bench-tls.sh).
# Figures per case: edge CPU per delivered message, bytes on the wire per delivered message (the
# edge's roomcast_bytes_written_total over roomcast_messages_delivered_total, read just before
# it stops: ciphertext for wss, compressed for deflate), gift latency, loss (must be 0 for gifts).
# Results: bench-results/<date>-SCEN-{plain,tls,deflate,tls-deflate}/ and
# bench-results/<date>-SCEN-table.md; existing results are never overwritten (the run stops).
# Env: CONNS (10000), GIFT (10), CHAT (200), SECS (20), ENCODING (rkyv), SCEN (transport; another
# name for a smoke run), EDGE_BIN / LG_BIN (prebuilt binaries; default: cargo build --release
# here). Ports 18741-18742.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ ${1:-} == -h || ${1:-} == --help ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
  exit 0
fi
(($# == 0)) || { echo "no arguments: settings are environment variables (--help)" >&2; exit 1; }
ROOT=$PWD
SCEN=${SCEN:-transport}
[[ $SCEN =~ ^[a-z0-9-]+$ ]] || { echo "SCEN must be lowercase letters, digits and dashes, not '$SCEN'" >&2; exit 1; }
CONNS=${CONNS:-10000}
GIFT=${GIFT:-10}
CHAT=${CHAT:-200}
SECS=${SECS:-20}
ENCODING=${ENCODING:-rkyv}
# shellcheck source=lib/bench.sh
. "$ROOT/scripts/lib/bench.sh"
whole_numbers CONNS GIFT CHAT SECS
DATE=$(date +%Y-%m-%d)
for name in plain tls deflate tls-deflate; do
  [[ ! -e $ROOT/bench-results/$DATE-$SCEN-$name ]] || {
    echo "bench-results/$DATE-$SCEN-$name exists: set SCEN to another name, or remove it" >&2
    exit 1
  }
done
if [[ -z ${EDGE_BIN:-} || -z ${LG_BIN:-} ]]; then
  cargo build -q --release -p edge -p loadgen
fi
EDGE_BIN=${EDGE_BIN:-$ROOT/target/release/edge}
LG_BIN=${LG_BIN:-$ROOT/target/release/loadgen}
ports_free 18741 18742
case $ENCODING in
  rkyv) enc=() ;;
  json) enc=(--json) ;;
  *) echo "ENCODING must be rkyv or json, not '$ENCODING'" >&2; exit 1 ;;
esac
PKI=$(mktemp -d)
trap 'rm -rf "$PKI"' EXIT
test_pki "$PKI"
FAILED=0
STARTED=$(date +%s)
# One case: its name, then loadgen's extra flags. The edge serves TLS when the name has "tls".
run() {
  local name=$1
  shift
  EDGE_EXTRA=()
  [[ $name == tls* ]] && EDGE_EXTRA=(--tls-cert "$PKI/cert.pem" --tls-key "$PKI/key.pem")
  one_edge_case "$SCEN-$name" "members: $name, $ENCODING" ${enc[@]+"${enc[@]}"} "$@"
}
run plain
run tls --tls-ca "$PKI/ca.pem"
run deflate --deflate
run tls-deflate --tls-ca "$PKI/ca.pem" --deflate
OUT=$ROOT/bench-results/$DATE-$SCEN-table.md
if ((FAILED)); then
  echo "a case failed: no table written" >&2
  exit 1
fi
python3 - "$ROOT/bench-results" "$DATE" "$CONNS" "$GIFT" "$CHAT" "$SECS" "$STARTED" "$ENCODING" "$SCEN" >"$OUT" <<'PY'
import json, os, sys
root, date, conns, gift, chat, secs, started, encoding, scen = sys.argv[1:]

def counter(text, name):
    """A counter summed over its label sets, from Prometheus text."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total

print(f"# ws, wss, deflate, wss + deflate in one run (scripts/bench-transport.sh): {conns} members in one room ({encoding}), gifts {gift}/s, chat {chat}/s, {secs} s\n")
print("| case | deliveries/s | edge µs CPU per delivery | wire bytes per delivery (edge) | plaintext bytes per delivery (members) | frames compressed | gift p50 / p99 ms | gifts lost | chat lost | generator saturated |")
print("|---|---|---|---|---|---|---|---|---|---|")
for name in ["plain", "tls", "deflate", "tls-deflate"]:
    d = os.path.join(root, f"{date}-{scen}-{name}")
    p = os.path.join(d, "result.json")
    if not os.path.exists(p) or os.path.getmtime(p) < float(started):
        print(f"| {name} | (no result) | | | | | | | | |")
        continue
    r = json.load(open(p))
    g = r["latency_ms"]["gift"]
    cpu = r["server"].get("cpu_us_per_delivery") or 0
    bpd = r["bytes"] / max(r["deliveries"], 1)
    wire = "?"
    m = os.path.join(d, "edge-metrics.txt")
    if os.path.exists(m):
        text = open(m).read()
        delivered = counter(text, "roomcast_messages_delivered_total")
        if delivered:
            wire = f"{counter(text, 'roomcast_bytes_written_total') / delivered:.1f}"
    z = r.get("compressed_frames", 0) / max(r["frames"], 1)
    print(f"| {name} | {r['deliveries_per_s']:.0f} | {cpu:.3f} | {wire} | {bpd:.1f} | {z:.0%} | {g['p50']:.0f} / {g['p99']:.0f} | {r['lost']['gift']} | {r['lost']['chat']} | {r.get('generator_saturated')} |")
PY
cat "$OUT"
