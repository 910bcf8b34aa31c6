#!/usr/bin/env bash
# The latency controller under CPU budgets (issue #12): scripts/bench-100k.sh (10^5 members in
# one room, gifts GIFT/s, chat offered at CHAT/s) with the edge given both CPUs (shared with the
# load generator), one CPU (the generator on the other), and one CPU shared with a busy loop.
# The edge is not told its budget: it measures its capacity and sizes the hot room's window and
# chat sampling from it. Requirement: gift p99 under adaptive.gift_latency_target_ms (2 s) in
# each, chat's visible rate falling with capacity, no gift lost.
#
# Results: bench-results/<date>-100k-budget-{2cpu,1cpu,1cpu-hog}/ (loadgen's files) and
# bench-results/<date>-100k-budgets.md (one table; written by this script).
# Env: as bench-100k.sh (CONNS, SECS, GIFT, CHAT), EDGE_BIN / LG_BIN (prebuilt binaries), ONLY
# (one of 2cpu, 1cpu, 1cpu-hog: run that case alone; the table reads whatever results exist).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DATE=$(date +%Y-%m-%d)
if [[ -z ${EDGE_BIN:-} || -z ${LG_BIN:-} ]]; then
  cargo build -q --release -p edge -p loadgen
  export EDGE_BIN=$ROOT/target/release/edge LG_BIN=$ROOT/target/release/loadgen
fi
ncpu=$(nproc)
last=$((ncpu - 1))
FAILED=0
run() {
  local scen=$1
  shift
  echo "== $scen: $*"
  if ! env "$@" SCEN="$scen" "$ROOT/scripts/bench-100k.sh" >"/tmp/$scen.out" 2>&1; then
    echo "$scen failed: see /tmp/$scen.out" >&2
    tail -3 "/tmp/$scen.out" >&2
    FAILED=1
  fi
  sleep 5
}
ONLY=${ONLY:-}
case $ONLY in
  "" | 2cpu | 1cpu | 1cpu-hog) ;;
  *) echo "ONLY must be 2cpu, 1cpu or 1cpu-hog, not '$ONLY'" >&2; exit 1 ;;
esac
only() { [[ -z $ONLY || $ONLY == "$1" ]]; }
only 2cpu && run 100k-budget-2cpu
only 1cpu && run 100k-budget-1cpu EDGE_CPUS=$last LG_CPUS=0-$((last - 1))
# Half a CPU accepts 10^4 connections a second only partly (the rest are reset): connect slower.
only 1cpu-hog && run 100k-budget-1cpu-hog EDGE_CPUS=$last LG_CPUS=0-$((last - 1)) HOG=1 RAMP=2000
if ((FAILED)); then
  echo "a case failed: the table is not rewritten" >&2
  exit 1
fi
OUT=$ROOT/bench-results/$DATE-100k-budgets.md
python3 - "$ROOT/bench-results" "$DATE" >"$OUT" <<'PY'
import json, sys, os
root, date = sys.argv[1], sys.argv[2]
print("# Members under CPU budgets (scripts/bench-budgets.sh)\n")
print("| budget | members | gift p50 / p99 / max ms | gifts lost | chat delivered per member / accepted / offered | edge µs CPU per delivery | generator saturated |")
print("|---|---|---|---|---|---|---|")
for scen in ["100k-budget-2cpu", "100k-budget-1cpu", "100k-budget-1cpu-hog"]:
    p = os.path.join(root, f"{date}-{scen}", "result.json")
    if not os.path.exists(p):
        print(f"| {scen} | (no result) | | | | | |")
        continue
    r = json.load(open(p))
    g = r["latency_ms"]["gift"]
    conns = max(r["connections"], 1)
    chat_recv = r["received"].get("chat", 0) / conns
    print(f"| {scen[12:]} | {r['connections']} | {g['p50']:.0f} / {g['p99']:.0f} / {g['max']:.0f} | {r['lost']['gift']} | "
          f"{chat_recv:.0f} / {r['published'].get('chat', 0)} / {r.get('publish_offered', {}).get('chat', 0)} | "
          f"{r.get('edge_cpu_us_per_delivery') or 0:.2f} | {r.get('generator_saturated')} |")
PY
cat "$OUT"
