#!/usr/bin/env bash
# permessage-deflate against plain frames (issue #18): one edge (2 shards), CONNS members (10^4)
# in one room, gifts GIFT/s and chat CHAT/s for SECS s, members on roomcast.json.v1 (what
# browsers use) without and with permessage-deflate (loadgen --deflate offers it as Chromium
# does and inflates), and rkyv with deflate. Figures: bytes on the wire per delivered message,
# edge CPU per delivery, gift latency, loss (must be 0 for gifts).
# Results: bench-results/<date>-deflate-{json,json-deflate,rkyv-deflate}/ and
# bench-results/<date>-deflate-table.md.
# Env: CONNS (10000), GIFT (10), CHAT (200), SECS (20), EDGE_BIN / LG_BIN (prebuilt binaries;
# default: cargo build --release here).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CONNS=${CONNS:-10000}
GIFT=${GIFT:-10}
CHAT=${CHAT:-200}
SECS=${SECS:-20}
if [[ -z ${EDGE_BIN:-} || -z ${LG_BIN:-} ]]; then
  cargo build -q --release -p edge -p loadgen
fi
EDGE_BIN=${EDGE_BIN:-$ROOT/target/release/edge}
LG_BIN=${LG_BIN:-$ROOT/target/release/loadgen}
DATE=$(date +%Y-%m-%d)
# shellcheck source=lib/bench.sh
. "$ROOT/scripts/lib/bench.sh"
ports_free 18741 18742
whole_numbers CONNS GIFT CHAT SECS
FAILED=0
STARTED=$(date +%s)
run() {
  local name=$1
  shift
  one_edge_case "deflate-$name" "members: $name" "$@"
}
run json --json
run json-deflate --json --deflate
run rkyv
run rkyv-deflate --deflate
OUT=$ROOT/bench-results/$DATE-deflate-table.md
if ((FAILED)); then
  echo "a case failed: no table written" >&2
  exit 1
fi
python3 - "$ROOT/bench-results" "$DATE" "$CONNS" "$GIFT" "$CHAT" "$SECS" "$STARTED" >"$OUT" <<'PY'
import json, os, sys
root, date, conns, gift, chat, secs, started = sys.argv[1:]
print(f"# permessage-deflate against plain frames (scripts/bench-deflate.sh): {conns} members in one room, gifts {gift}/s, chat {chat}/s, {secs} s\n")
print("| members | deliveries/s | edge µs CPU per delivery | bytes per delivery | frames compressed | gift p50 / p99 ms | gifts lost | chat lost |")
print("|---|---|---|---|---|---|---|---|")
for name in ["json", "json-deflate", "rkyv", "rkyv-deflate"]:
    p = os.path.join(root, f"{date}-deflate-{name}", "result.json")
    if not os.path.exists(p) or os.path.getmtime(p) < float(started):
        print(f"| {name} | (no result) | | | | | | |")
        continue
    r = json.load(open(p))
    g = r["latency_ms"]["gift"]
    cpu = r["server"].get("cpu_us_per_delivery") or 0
    bpd = r["bytes"] / max(r["deliveries"], 1)
    z = r.get("compressed_frames", 0) / max(r["frames"], 1)
    print(f"| {name} | {r['deliveries_per_s']:.0f} | {cpu:.3f} | {bpd:.0f} | {z:.0%} | {g['p50']:.0f} / {g['p99']:.0f} | {r['lost']['gift']} | {r['lost']['chat']} |")
PY
cat "$OUT"
