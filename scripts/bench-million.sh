#!/usr/bin/env bash
# 10^6 members in one room of one edge (#19): every member connected through `loadgen run`,
# kept alive by the edge's pings (the generator answers them), one gift every GIFT_EVERY seconds
# for SECS seconds. Records the connect rate, failures by reason, gift latency p50/p99/max, the
# edge's RSS and CPU, the kernel's memory per connection (/proc/net/sockstat, /proc/slabinfo,
# /proc/meminfo), the accept queues (ListenOverflows/ListenDrops, the edge's listen_backlog
# gauges) and the generator's own memory. Results: bench-results/<date>-SCEN/ (loadgen's
# result.json and README.md, plus kernel.json, samples.jsonl.gz, edge-metrics-*.txt, summary.md).
#
# Why so many shards: this kernel caps each io_uring's table of direct descriptors at
# RLIMIT_NOFILE, and this box's hard RLIMIT_NOFILE is 20,000 (no CAP_SYS_RESOURCE to raise it),
# so one ring holds at most 20,000 - 16 connections and 10^6 need at least 51 rings. Each ring
# is a shard: a thread with its own listener (SO_REUSEPORT, which hashes each new connection's
# 4-tuple to one listener, so shards fill unevenly) and its engine. SHARDS defaults to CONNS x
# 1.2 / 19,984 (20% headroom for the uneven hash: 61 at 10^6). On 2 CPUs that is ~30 threads per
# core; what it costs (idle RSS of the rings and receive buffers, CPU of 61 loops and of a gift
# fanned out to 61 shards) is in summary.md.
#
# Env: CONNS (1000000), SHARDS (see above), RAMP (connections/s in all, 10000), SECS (60),
# GIFT_EVERY (10 s), SRC_ADDRS (8 per worker), PING_MS (30000), IDLE_MS (90000), PROBES
# (auto|ebpf|sock_diag|off: the edge's kernel probes), PROBE_MS (1000), PRESENCE_MS (0: the room's
# online count is not pushed to members; the edge's default, 1000, pushes it to every member each
# second while it changes, which is every second of a ramp: at 2x10^5 members that was ~10^5
# sends/s and the connect rate fell from 7,800/s to under 1,000/s at 110,000 members), SCEN (million, or
# CONNS-derived), MAX_SECS (900: the whole run is stopped after this), EDGE_BIN / LG_BIN
# (prebuilt binaries; default: cargo build --release here), EDGE_CPUS / LG_CPUS (taskset lists).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CONNS=${CONNS:-1000000}
NOFILE=$(ulimit -Hn)
PER_RING=$((NOFILE - 16))
SHARDS=${SHARDS:-$(((CONNS * 6 / 5 + PER_RING - 1) / PER_RING))}
RAMP=${RAMP:-10000}
SECS=${SECS:-60}
GIFT_EVERY=${GIFT_EVERY:-10}
SRC_ADDRS=${SRC_ADDRS:-8}
PING_MS=${PING_MS:-30000}
IDLE_MS=${IDLE_MS:-90000}
PROBES=${PROBES:-auto}
PROBE_MS=${PROBE_MS:-1000}
PRESENCE_MS=${PRESENCE_MS:-0}
MAX_SECS=${MAX_SECS:-900}
EDGE_CPUS=${EDGE_CPUS:-}
LG_CPUS=${LG_CPUS:-}
if ((CONNS >= 1000000)); then DEF_SCEN=million; else DEF_SCEN=$((CONNS / 1000))k-million-script; fi
SCEN=${SCEN:-$DEF_SCEN}
if [[ -z ${EDGE_BIN:-} || -z ${LG_BIN:-} ]]; then
  cargo build -q --release -p edge -p loadgen
fi
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
EDGE_BIN=${EDGE_BIN:-$TARGET_DIR/release/edge}
LG_BIN=${LG_BIN:-$TARGET_DIR/release/loadgen}
pin() { if [[ -n $1 ]]; then echo "taskset -c $1"; fi; }
# shellcheck source=lib/bench.sh
. "$ROOT/scripts/lib/bench.sh"
ports_free 18911 18912
[[ -x $EDGE_BIN && -x $LG_BIN ]] || { echo "EDGE_BIN ($EDGE_BIN) or LG_BIN ($LG_BIN) is not an executable" >&2; exit 1; }
OUT="$ROOT/bench-results/$(date +%Y-%m-%d)-$SCEN"
TMP=$(mktemp -d)
START=$(date +%s)
cat >"$TMP/edge.toml" <<TOML
shards = $SHARDS
[ws]
backlog = 65535
ping_interval_ms = $PING_MS
idle_timeout_ms = $IDLE_MS
[presence]
interval_ms = $PRESENCE_MS
[probes]
source = "$PROBES"
interval_ms = $PROBE_MS
TOML
$(pin "$EDGE_CPUS") "$EDGE_BIN" --data-dir "$TMP/data" --config "$TMP/edge.toml" --listen 127.0.0.1:18911 --http 127.0.0.1:18912 >"$TMP/edge.log" 2>&1 &
EPID=$!
SPID=
LGPID=
stop_all() {
  [[ -n $LGPID ]] && kill -TERM "$LGPID" 2>/dev/null
  [[ -n $SPID ]] && kill "$SPID" 2>/dev/null
  kill -INT "$EPID" 2>/dev/null || true
  for _ in $(seq 300); do kill -0 "$EPID" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$EPID" 2>/dev/null || true
  wait "$EPID" 2>/dev/null || true
  mkdir -p "$OUT"
  sed -E "s/\x1b\[[0-9;]*m//g; s/^[^ ]+ +//" "$TMP/edge.log" | grep -E "WARN|ERROR" | sed -E "s/(slot|open|left|backlog|shard)=[0-9]+/\1=N/g" | sort | uniq -c | sort -rn | head -30 >"$OUT/edge-warnings.log" || true
  cp "$TMP/edge.log" "/tmp/$SCEN-edge.log" 2>/dev/null
  rm -rf "$TMP"
}
trap stop_all EXIT
edge_up "$EPID" 127.0.0.1:18912 "$TMP/edge.log"
mkdir -p "$OUT"

# Kernel and process figures every 2 s (and at once now, before any member): sockstat, the
# slab caches, meminfo, TcpExt listen counters, the edge's RSS and CPU, the generator's RSS.
cat >"$TMP/sample.py" <<'PY'
import json, os, sys, time
epid, out, every = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
tick = os.sysconf("SC_CLK_TCK")
def sockstat():
    for l in open("/proc/net/sockstat"):
        if l.startswith("TCP:"):
            f = l.split()[1:]
            return {f[i]: int(f[i + 1]) for i in range(0, len(f), 2)}
    return {}
def slabs():
    d = {}
    for l in open("/proc/slabinfo").readlines()[2:]:
        f = l.split()
        d[f[0]] = int(f[2]) * int(f[3])
    return d
def meminfo():
    return {l.split(":")[0]: int(l.split()[1]) * 1024 for l in open("/proc/meminfo")}
def tcpext():
    lines = [l.split() for l in open("/proc/net/netstat") if l.startswith("TcpExt:")]
    m = dict(zip(lines[0][1:], map(int, lines[1][1:])))
    return {k: m.get(k, 0) for k in ("ListenOverflows", "ListenDrops", "TCPReqQFullDrop", "TCPReqQFullDoCookies", "SyncookiesSent")}
def proc(pid):
    try:
        st = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        rss = next(int(l.split()[1]) * 1024 for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS:"))
        thr = next(int(l.split()[1]) for l in open(f"/proc/{pid}/status") if l.startswith("Threads:"))
        return {"cpu_s": (int(st[11]) + int(st[12])) / tick, "rss": rss, "threads": thr}
    except Exception:
        return None
def loadgen_rss():
    total, n = 0, 0
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            if open(f"/proc/{p}/comm").read().strip() != "loadgen":
                continue
            total += next(int(l.split()[1]) * 1024 for l in open(f"/proc/{p}/status") if l.startswith("VmRSS:"))
            n += 1
        except Exception:
            pass
    return total, n
t0 = time.time()
with open(out, "a") as f:
    while True:
        lg, nlg = loadgen_rss()
        f.write(json.dumps({"t": round(time.time() - t0, 1), "sockstat": sockstat(), "slab": slabs(), "mem": meminfo(),
                            "tcpext": tcpext(), "edge": proc(epid), "loadgen_rss": lg, "loadgen_procs": nlg,
                            "load": open("/proc/loadavg").read().split()[:3]}) + "\n")
        f.flush()
        time.sleep(every)
PY
python3 "$TMP/sample.py" "$EPID" "$OUT/samples.jsonl" 2 &
SPID=$!
curl -s 127.0.0.1:18912/metrics >"$OUT/edge-metrics-idle.txt" || true
BUDGET=$((MAX_SECS - ($(date +%s) - START) - 30))
GIFT_RATE=$(python3 -c "print(1 / $GIFT_EVERY)")
set +e
# The generator's own limit: stopped (SIGTERM, its workers with it) past the run's budget.
$(pin "$LG_CPUS") timeout --signal=TERM "$BUDGET" "$LG_BIN" run --target edge --ws 127.0.0.1:18911 --http 127.0.0.1:18912 \
  --connections "$CONNS" --ramp "$RAMP" --src-addrs "$SRC_ADDRS" --duration "$SECS" \
  --gift-rate "$GIFT_RATE" --chat-rate 0 --gift-streams 1 --chat-streams 1 \
  --server-pid "$EPID" --out "$ROOT/bench-results" --scenario "$SCEN" \
  --note "edge --shards $SHARDS (ring cap $PER_RING = RLIMIT_NOFILE $NOFILE - 16), pings every $PING_MS ms (idle timeout $IDLE_MS), probes $PROBES/${PROBE_MS}ms, presence push every $PRESENCE_MS ms (0: off); one room; a gift every $GIFT_EVERY s; edge CPUs ${EDGE_CPUS:-all}, generator CPUs ${LG_CPUS:-all}" \
  > >(tee "$OUT/loadgen-output.txt") 2> >(tee "$OUT/loadgen-stderr.txt" >&2) &
LGPID=$!
# The edge's /metrics once every member is in (the generator's "connected ..." line).
(
  for _ in $(seq "$BUDGET"); do
    grep -q "^connected " "$OUT/loadgen-output.txt" 2>/dev/null && break
    kill -0 "$LGPID" 2>/dev/null || exit 0
    sleep 1
  done
  curl -s -m 20 127.0.0.1:18912/metrics >"$OUT/edge-metrics-connected.txt"
) &
wait "$LGPID"
RC=$?
LGPID=
set -e
curl -s -m 20 127.0.0.1:18912/metrics >"$OUT/edge-metrics-end.txt" || true
curl -s -m 20 127.0.0.1:18912/v1/rooms/r0 >"$OUT/room-stats.json" || true
sleep 2
kill "$SPID" 2>/dev/null || true
SPID=
echo "loadgen exit status $RC" >>"$OUT/loadgen-output.txt"

# Summary: the kernel's memory per connection (each member is two sockets on this box: the
# edge's and the generator's), from the sample before any member and the one with the most.
python3 - "$OUT" "$CONNS" "$SHARDS" "$RC" <<'PY'
import json, re, sys
out, conns, shards, rc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
S = [json.loads(l) for l in open(f"{out}/samples.jsonl")]
base = S[0]
peak = max(S, key=lambda s: s["sockstat"].get("inuse", 0))
n = max(peak["sockstat"].get("inuse", 0) - base["sockstat"].get("inuse", 0), 1)
pairs = n / 2
slab_d = sorted(((k, peak["slab"].get(k, 0) - base["slab"].get(k, 0)) for k in peak["slab"]), key=lambda x: -x[1])
mem_d = {k: peak["mem"][k] - base["mem"][k] for k in ("Slab", "SUnreclaim", "SReclaimable", "KernelStack", "Percpu", "PageTables", "MemAvailable")}
edge_rss = (peak["edge"] or {}).get("rss", 0) - (base["edge"] or {}).get("rss", 0)
ends = [s for s in S if s["edge"]]
edge_cpu = ends[-1]["edge"]["cpu_s"] - ends[0]["edge"]["cpu_s"] if ends else 0
k = {
    "sockets_at_peak": peak["sockstat"].get("inuse", 0),
    "sockets_added": n,
    "connection_pairs": pairs,
    "tcp_buffer_pages_at_peak": peak["sockstat"].get("mem", 0),
    "slab_bytes_per_socket": {k: round(v / n, 1) for k, v in slab_d[:12] if v > 0},
    "slab_total_bytes_per_socket": round(mem_d["Slab"] / n, 1),
    "kernel_bytes_per_connection_pair": {k: round(v / pairs, 1) for k, v in mem_d.items()},
    "edge_rss_bytes_per_connection": round(edge_rss / pairs, 1),
    "edge_rss_idle_bytes": (base["edge"] or {}).get("rss"),
    "edge_threads": (peak["edge"] or {}).get("threads"),
    "edge_cpu_s_whole_run": round(edge_cpu, 1),
    "loadgen_rss_bytes_per_connection": round(peak["loadgen_rss"] / pairs, 1),
    "loadgen_processes": peak["loadgen_procs"],
    "listen_overflows": S[-1]["tcpext"]["ListenOverflows"] - base["tcpext"]["ListenOverflows"],
    "listen_drops": S[-1]["tcpext"]["ListenDrops"] - base["tcpext"]["ListenDrops"],
    "syncookies_sent": S[-1]["tcpext"]["SyncookiesSent"] - base["tcpext"]["SyncookiesSent"],
    "load_at_peak": peak["load"],
    "loadgen_exit_status": rc,
}
# The accept queues' fullest fill while connecting, from the edge's gauges when it answered.
def gauge(path, name):
    try:
        return [float(l.split()[-1]) for l in open(path) if l.startswith(name)]
    except Exception:
        return []
k["listen_backlog_fullest_ratio_connected"] = gauge(f"{out}/edge-metrics-connected.txt", "roomcast_listen_backlog_fullest_ratio")
closes = {}
import os
for l in open(f"{out}/edge-metrics-end.txt") if os.path.exists(f"{out}/edge-metrics-end.txt") else []:
    m = re.match(r'roomcast_connections_closed_total\{(.*)\} (\S+)', l)
    if m:
        r = re.search(r'reason="(\w+)"', m.group(1)).group(1)
        closes[r] = closes.get(r, 0) + float(m.group(2))
k["edge_closes_by_reason"] = {r: int(v) for r, v in closes.items() if v}
json.dump(k, open(f"{out}/kernel.json", "w"), indent=2)
print(json.dumps(k, indent=2))
r = json.load(open(f"{out}/result.json")) if os.path.exists(f"{out}/result.json") else {}
g = r.get("latency_ms", {}).get("gift", {})
rows = [
    ("members connected (failed; by reason)", f"{r.get('connections', 'no result')} ({r.get('failed_connections', '-')}; {r.get('failed_by_reason', {})})"),
    ("workers died", len(r.get("workers_died", [])) if r else "-"),
    ("connect rate (handshake p50/p99 ms)", f"{r.get('connect_per_s', 0):.0f}/s ({r.get('handshake_ms', {}).get('p50', '-')}/{r.get('handshake_ms', {}).get('p99', '-')})" if r else "-"),
    ("gifts published; deliveries; lost", f"{r.get('published', {}).get('gift', '-')}; {r.get('deliveries', '-')}; {r.get('lost', {}).get('gift', '-')}"),
    ("gift p50 / p99 / max (ms)", f"{g.get('p50', '-')} / {g.get('p99', '-')} / {g.get('max', '-')}"),
    ("closes received by members, by code", r.get("closes_by_code", "-")),
    ("edge closes by reason (to the end, teardown included)", k["edge_closes_by_reason"]),
    ("edge RSS per connection (B; idle RSS)", f"{k['edge_rss_bytes_per_connection']} ({k['edge_rss_idle_bytes']})"),
    ("kernel slab per socket (B); per member (2 sockets)", f"{k['slab_total_bytes_per_socket']}; {k['kernel_bytes_per_connection_pair']['Slab']}"),
    ("top slab caches per socket (B)", k["slab_bytes_per_socket"]),
    ("TCP buffer pages at peak (sockstat mem)", k["tcp_buffer_pages_at_peak"]),
    ("edge CPU s (whole run); threads", f"{k['edge_cpu_s_whole_run']}; {k['edge_threads']}"),
    ("generator RSS per member (B; processes)", f"{k['loadgen_rss_bytes_per_connection']} ({k['loadgen_processes']})"),
    ("ListenOverflows / ListenDrops / syncookies", f"{k['listen_overflows']} / {k['listen_drops']} / {k['syncookies_sent']}"),
    ("fullest accept queue when connected (ratio)", max(k["listen_backlog_fullest_ratio_connected"] or [0])),
    ("generator exit status", rc),
]
with open(f"{out}/summary.md", "w") as f:
    f.write(f"# {conns} members, {shards} shards\n\n| figure | value |\n|---|---|\n")
    for name, v in rows:
        f.write(f"| {name} | {v} |\n")
PY
gzip -f "$OUT/samples.jsonl"
exit "$RC"
