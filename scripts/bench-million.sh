#!/usr/bin/env bash
# 10^6 members in one room of one edge (#19): every member connected through `loadgen run`,
# kept alive by the edge's pings (the generator answers them), one gift every GIFT_EVERY seconds
# for SECS seconds. Records the connect rate, failures by reason, gift latency p50/p99/max, the
# edge's RSS and CPU, the kernel's memory per connection (/proc/net/sockstat, /proc/slabinfo,
# /proc/meminfo), the accept queues (ListenOverflows/ListenDrops, the edge's listen_backlog
# gauges) and the generator's own memory. Results: bench-results/<date>-SCEN/ (loadgen's
# result.json and README.md, plus kernel.json, samples.jsonl.gz, edge-metrics-*.txt, summary.md,
# and the logs: edge.log, edge-b.log, dispatch.log, redis.log; nothing is left in /tmp). The
# edge's CPU is reported per process (an edge started again is a new process, counting from 0)
# and summed only when every process's is known. Exits with the generator's status, which is
# not 0 when members were down at the end (an edge that died and never came back), or when
# members' first connects failed beyond ALLOW_CONNECT_FAILURES (the 10^6 runs so far had 35 to
# 1,335 first connects time out in a full accept queue: give 0.5% to accept that many); the
# generator's error line is in summary.md.
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
# GIVE_UP (the generator's retry time for a gift: 30 s, 300 s with RESTART; 0: until the
# publishing ends), ALLOW_CONNECT_FAILURES (loadgen --allow-connect-failures: members whose
# first connect may fail without failing the run, N or P%; 0), MOVE_GIVE_UP (how
# long a member's move retries before the generator gives it up, loadgen --move-give-up: its
# default, 120 s, without RESTART; 600 s with RESTART, since a 10^6 restart took 241 s to bring
# every member back; 0: never, as a real client),
# GIFT_EVERY (10 s), SRC_ADDRS (8 per worker), PING_MS (30000), IDLE_MS (90000), PROBES
# (auto|ebpf|sock_diag|off: the edge's kernel probes), PROBE_MS (1000), PRESENCE_MS (1000, the
# edge's default: the online count rides on the room's batches and a silent room gets a
# count-only batch at most every members / presence.max_writes_per_s s; 0 turns pushes off. Before
# that cap, a count-only batch to every member each second of a ramp cut the connect rate from
# 7,800/s to under 1,000/s at 110,000 members), SCEN (million, or
# CONNS-derived), MAX_SECS (CONNECT_DEADLINE + SECS + 300: the whole run is
# stopped after this), EDGE_BIN / LG_BIN
# (prebuilt binaries; default: cargo build --release here), EDGE_CPUS / LG_CPUS (taskset lists),
# INFLIGHT (32: first connects each generator worker keeps in flight), CONNECT_DEADLINE (seconds
# the connect phase may take: default 4 x CONNS / RAMP + 120, so a ramp that slows down at 10^6
# still gets there; the generator's own default, 2 x + 30, ended the 10^6 attempt at 363 s).
#
# RESTART (0 | term | kill): the reconnect storm after an edge restart (#19 item 4). Once every
# member is connected and one gift reached them all, the edge is stopped, with SIGTERM (`term`:
# a drain, each member sent a `goaway` at a random moment within DRAIN_MS, 10000, then closed
# with 1001; the generator follows it, retrying dispatch until the edge is back) or SIGKILL
# (`kill`: members see their sockets reset and come back to the same address), started again
# on the same ports and data directory, and the script measures: time from the signal until
# every member is open again, reconnects per second, the accept-queue overflows and SYN drops
# (TcpExt), the new edge's fullest accept queue (listen_backlog gauges, scraped each second),
# the generator's failed attempts by reason, and that the gifts published after the restart
# reached every member with none lost across it (the generator resumes each member with
# `since`). Results in restart.json and restart-timeline.tsv (one line a second from the
# signal on, the old edge's drain and the time nothing listens included); SECS defaults to 90
# then. The members the old edge held when it exited are its own count at its last /metrics
# answer (for SIGKILL, the one just before the signal), beside the generator's count then.
#
# RESTART=peer: the rolling restart of a fleet, where members are "back within the drain
# spread". Redis (the bus; a redis-server this script starts on 127.0.0.1:18919), a
# stand-alone dispatch (`edge dispatch`, 18913) and a second edge B (18921/18922, same shards)
# run beside edge A (18911/18912); members connect to A; the generator publishes through B (a
# gift reaches A's members over the bus). SIGTERM to A: it drains over DRAIN_MS (default
# 240000 here), each member asks dispatch, which answers B (A reports itself draining), and
# moves with `since`; A exits once empty and is started again (empty). Measured as above, plus
# how long after the signal every member had moved, against DRAIN_MS; the fullest accept queue
# is B's (where members move), and the closes by reason are given for the old A (its last
# /metrics answer), the restarted A and B. SECS defaults to the
# drain period + 300 s (the generator publishes until every member can be back).
#
# PACE (RESTART=peer; 1 or 0, default 1): `drain.pace` of both edges (goaways wait while the
# fleet does not take members, edge/src/drain.rs); MAX_MOVING (default 0: the bound on members on
# their way follows the fleet's uptake): `drain.max_moving`. Both are in restart.json.
#
# SOMAXCONN (NETNS=1 only; default 65535): the namespace's net.core.somaxconn, the kernel's cap
# on each listener's backlog (the edge asks for 65,535 here; the host's 4,096 capped the
# queues of the first 10^6 storm, which overflowed 63,381 times). The host's is not touched.
#
# NETNS (0 | 1): run the whole benchmark (edge, generator, sampler) in a network namespace of
# its own, whose table of established TCP connections has EHASH buckets (default: the power of
# two at or above 2.5 x CONNS, since every member is two sockets on this box) instead of the
# table the kernel sized at boot from memory (262,144 buckets here). At 10^6 members that table
# holds 2x10^6 sockets, eight to a bucket, and every packet's lookup walks its bucket
# (`__inet_lookup_established` was 6% of all CPU at 2x10^5 members, 1.5 to a bucket). A real
# edge holds one socket per member and sizes the table at boot (`thash_entries=`); this is the
# same thing for one run. The host's `net.ipv4.tcp_child_ehash_entries` (read only when a
# namespace is made) is set for the moment the namespace is made and put back at once.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
if [[ ${NETNS:-0} == 1 && -z ${ROOMCAST_IN_NETNS:-} ]]; then
  want=$(((${CONNS:-1000000} * 5 + 1) / 2))
  EHASH=${EHASH:-$(b=1024; while ((b < want && b < 16777216)); do b=$((b * 2)); done; echo $b)}
  old_ehash=$(sysctl -n net.ipv4.tcp_child_ehash_entries)
  sysctl -qw net.ipv4.tcp_child_ehash_entries="$EHASH"
  me=$(readlink /proc/self/ns/net)
  ROOMCAST_IN_NETNS=1 EHASH=$EHASH SOMAXCONN=${SOMAXCONN:-65535} unshare --net -- \
    bash -c 'ip link set lo up && sysctl -qw net.core.somaxconn="$SOMAXCONN" && exec "$0" "$@"' "$0" "$@" &
  child=$!
  for _ in $(seq 100); do
    ns=$(readlink "/proc/$child/ns/net" 2>/dev/null || true)
    [[ -n $ns && $ns != "$me" ]] && break
    sleep 0.05
  done
  sysctl -qw net.ipv4.tcp_child_ehash_entries="$old_ehash"
  trap 'kill -TERM "$child" 2>/dev/null' INT TERM
  wait "$child"
  exit $?
fi
CONNS=${CONNS:-1000000}
NOFILE=$(ulimit -Hn)
PER_RING=$((NOFILE - 16))
SHARDS=${SHARDS:-$(((CONNS * 6 / 5 + PER_RING - 1) / PER_RING))}
RAMP=${RAMP:-10000}
RESTART=${RESTART:-0}
[[ $RESTART == 1 ]] && RESTART=term
case $RESTART in 0 | term | kill | peer) ;; *) echo "RESTART: 0, term, kill or peer" >&2; exit 1 ;; esac
if [[ $RESTART == peer ]]; then DRAIN_MS=${DRAIN_MS:-240000}; else DRAIN_MS=${DRAIN_MS:-10000}; fi
PACE=${PACE:-1}
case $PACE in 1) PACE_TOML=true ;; 0) PACE_TOML=false ;; *) echo "PACE: 1 or 0" >&2; exit 1 ;; esac
MAX_MOVING=${MAX_MOVING:-0}
[[ $MAX_MOVING =~ ^[0-9]+$ ]] || { echo "MAX_MOVING: a whole number" >&2; exit 1; }
case $RESTART in 0) SECS=${SECS:-60} ;; peer) SECS=${SECS:-$((DRAIN_MS / 1000 + 300))} ;; *) SECS=${SECS:-90} ;; esac
# How long the generator retries a gift before giving it up (loadgen --gift-give-up): above any
# outage a restart causes (a 10^6 edge answered 32 s after SIGKILL), or a gift whose first
# attempt reached the old edge and the next one share a number (counted as duplicates).
if [[ $RESTART == 0 ]]; then GIVE_UP=${GIVE_UP:-30}; else GIVE_UP=${GIVE_UP:-300}; fi
# How long a member's move retries before it is given up (loadgen --move-give-up): members given
# up count as down at the end, so a restart's storm needs longer than loadgen's 120 s default.
if [[ $RESTART == 0 ]]; then MOVE_GIVE_UP=${MOVE_GIVE_UP:-}; else MOVE_GIVE_UP=${MOVE_GIVE_UP:-600}; fi
MOVE_ARGS=()
[[ -n $MOVE_GIVE_UP ]] && MOVE_ARGS=(--move-give-up "$MOVE_GIVE_UP")
INFLIGHT=${INFLIGHT:-32}
ALLOW_CONNECT_FAILURES=${ALLOW_CONNECT_FAILURES:-0}
GIFT_EVERY=${GIFT_EVERY:-10}
SRC_ADDRS=${SRC_ADDRS:-8}
PING_MS=${PING_MS:-30000}
IDLE_MS=${IDLE_MS:-90000}
PROBES=${PROBES:-auto}
PROBE_MS=${PROBE_MS:-1000}
PRESENCE_MS=${PRESENCE_MS:-1000}
CONNECT_DEADLINE=${CONNECT_DEADLINE:-$((4 * CONNS / RAMP + 120))}
MAX_SECS=${MAX_SECS:-$((CONNECT_DEADLINE + SECS + 300))}
EDGE_CPUS=${EDGE_CPUS:-}
LG_CPUS=${LG_CPUS:-}
if ((CONNS >= 1000000)); then DEF_SCEN=million; else DEF_SCEN=$((CONNS / 1000))k-million-script; fi
[[ $RESTART != 0 ]] && DEF_SCEN=restart-storm-$RESTART-$((CONNS / 1000))k
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
[[ $RESTART == peer ]] && ports_free 18913 18919 18921 18922
[[ -x $EDGE_BIN && -x $LG_BIN ]] || { echo "EDGE_BIN ($EDGE_BIN) or LG_BIN ($LG_BIN) is not an executable" >&2; exit 1; }
OUT="$ROOT/bench-results/$(date +%Y-%m-%d)-$SCEN"
TMP=$(mktemp -d)
START=$(date +%s)
RPID=
DPID=
EPID=
BPID=
SPID=
LGPID=
# Everything this script started is stopped, its logs kept in the results folder (edge.log,
# edge-b.log, dispatch.log, redis.log) and its temporary folder ($TMP: configs, data
# directories, sampler) removed: nothing of it is left in /tmp.
# shellcheck disable=SC2317 # called by the EXIT trap
stop_all() {
  set +e
  [[ -n $LGPID ]] && kill -TERM "$LGPID" 2>/dev/null
  [[ -n $SPID ]] && kill "$SPID" 2>/dev/null
  local p
  for p in $EPID $BPID; do
    kill -INT "$p" 2>/dev/null || true
    for _ in $(seq 300); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  for p in $DPID $RPID; do kill -TERM "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  mkdir -p "$OUT"
  if [[ -s $TMP/edge.log ]]; then
    sed -E "s/\x1b\[[0-9;]*m//g; s/^[^ ]+ +//" "$TMP/edge.log" | grep -E "WARN|ERROR" | sed -E "s/(slot|open|left|backlog|shard)=[0-9]+/\1=N/g" | sort | uniq -c | sort -rn | head -30 >"$OUT/edge-warnings.log"
  fi
  if [[ -n $BPID && -s $TMP/edge-b.log ]]; then
    sed -E "s/\x1b\[[0-9;]*m//g; s/^[^ ]+ +//" "$TMP/edge-b.log" | grep -E "WARN|ERROR" | sed -E "s/(slot|open|left|backlog|shard)=[0-9]+/\1=N/g" | sort | uniq -c | sort -rn | head -30 >"$OUT/edge-b-warnings.log"
  fi
  # The logs themselves (tens of KB at 10^6: the edge logs warnings, not connections), without
  # colour codes.
  for p in edge edge-b dispatch redis; do
    [[ -s $TMP/$p.log ]] && sed -E "s/\x1b\[[0-9;]*m//g" "$TMP/$p.log" >"$OUT/$p.log"
  done
  rm -rf "$TMP"
}
trap stop_all EXIT
# A signal ends the script through its EXIT trap (bash runs none when SIGTERM kills it).
trap 'exit 130' INT
trap 'exit 143' TERM
# In RESTART=peer: the bus (top-level key, so before the tables) and the fleet's dispatch.
BUS_LINE=
DISPATCH_LINE=
if [[ $RESTART == peer ]]; then
  BUS_LINE='bus = "redis://127.0.0.1:18919"'
  DISPATCH_LINE='dispatch_url = "http://127.0.0.1:18913/v1/route"'
fi
cat >"$TMP/edge.toml" <<TOML
shards = $SHARDS
$BUS_LINE
[ws]
backlog = 65535
ping_interval_ms = $PING_MS
idle_timeout_ms = $IDLE_MS
[presence]
interval_ms = $PRESENCE_MS
[probes]
source = "$PROBES"
interval_ms = $PROBE_MS
[drain]
period_ms = $DRAIN_MS
deadline_ms = $((DRAIN_MS * 3 > 30000 ? DRAIN_MS * 3 : 30000))
pace = $PACE_TOML
max_moving = $MAX_MOVING
$DISPATCH_LINE
TOML
if [[ $RESTART == peer ]]; then
  # Redis and dispatch run on machines of their own in a fleet; here they share two CPUs with
  # 2 x 61 shard threads and 67 generator workers, where the scheduler's fair share gave the
  # dispatch's one thread ~1% of the box: it took 3.7 s to answer, 2,127 moves waited on it, and
  # members moved at ~800/s. Their weight (nice -20, ~87x a thread at 0) stands in for their own machines.
  nice -n -20 redis-server --port 18919 --bind 127.0.0.1 --save "" --appendonly no >"$TMP/redis.log" 2>&1 &
  RPID=$!
  for _ in $(seq 50); do redis-cli -p 18919 ping >/dev/null 2>&1 && break; sleep 0.1; done
  nice -n -20 "$EDGE_BIN" dispatch --redis redis://127.0.0.1:18919 --http 127.0.0.1:18913 --backlog 65535 >"$TMP/dispatch.log" 2>&1 &
  DPID=$!
  ADVERTISE=(--advertise ws://127.0.0.1:18911/ws)
else
  ADVERTISE=()
fi
# The edge (again after a restart: same ports, same data directory, so its rooms' numbering and
# gift history carry over); its pid in $TMP/epid for the sampler.
start_edge() {
  $(pin "$EDGE_CPUS") "$EDGE_BIN" --data-dir "$TMP/data" --config "$TMP/edge.toml" --listen 127.0.0.1:18911 --http 127.0.0.1:18912 "${ADVERTISE[@]}" >>"$TMP/edge.log" 2>&1 &
  EPID=$!
  echo "$EPID" >"$TMP/epid"
}
start_edge
if [[ $RESTART == peer ]]; then
  $(pin "$EDGE_CPUS") "$EDGE_BIN" --data-dir "$TMP/data-b" --config "$TMP/edge.toml" --listen 127.0.0.1:18921 --http 127.0.0.1:18922 \
    --advertise ws://127.0.0.1:18921/ws >>"$TMP/edge-b.log" 2>&1 &
  BPID=$!
  echo "$BPID" >"$TMP/bpid"
fi
# Where the generator publishes: edge B in RESTART=peer (it stays up; A's members get the gifts
# over the bus), else the edge itself.
PUB_HTTP=127.0.0.1:18912
[[ $RESTART == peer ]] && PUB_HTTP=127.0.0.1:18922
edge_up "$EPID" 127.0.0.1:18912 "$TMP/edge.log"
[[ -n $BPID ]] && edge_up "$BPID" 127.0.0.1:18922 "$TMP/edge-b.log"
mkdir -p "$OUT"

# Kernel and process figures every 2 s (and at once now, before any member): sockstat, the
# slab caches, meminfo, TcpExt listen counters, the edge's RSS and CPU, the generator's RSS.
cat >"$TMP/sample.py" <<'PY'
import json, os, sys, time
epid_file, out, every, lgpid_file = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
# RESTART=peer: edge B's pid file (the edge members move to).
bpid_file = sys.argv[5] if len(sys.argv) > 5 else None
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
# This run's generator only: the loadgen processes under the pid the script writes to lgpid
# once it starts it (its `timeout`), found through /proc/PID/task/TID/children. Every process
# named loadgen on the box, as before, counted the test suite's generators too (7 processes
# and 4.5x the RSS per member in a 3,000-member trial beside a CI run), and read every pid.
def descendants(pid):
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                kids = [int(c) for c in open(f"/proc/{p}/task/{t}/children").read().split()]
                out += kids
                todo += kids
        except Exception:
            pass
    return out
def loadgen_rss():
    total, n = 0, 0
    try:
        root = int(open(lgpid_file).read())
    except Exception:
        return 0, 0
    for p in descendants(root):
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
        # The edge's pid, which changes when RESTART starts it again.
        epid = int(open(epid_file).read())
        lg, nlg = loadgen_rss()
        row = {"t": round(time.time() - t0, 1), "at": round(time.time(), 1), "sockstat": sockstat(), "slab": slabs(), "mem": meminfo(),
               "tcpext": tcpext(), "edge": proc(epid), "edge_pid": epid, "loadgen_rss": lg, "loadgen_procs": nlg,
               "load": open("/proc/loadavg").read().split()[:3]}
        if bpid_file:
            bpid = int(open(bpid_file).read())
            row["edge_b"] = proc(bpid)
            row["edge_b_pid"] = bpid
        f.write(json.dumps(row) + "\n")
        f.flush()
        time.sleep(every)
PY
python3 "$TMP/sample.py" "$TMP/epid" "$OUT/samples.jsonl" 2 "$TMP/lgpid" ${BPID:+"$TMP/bpid"} &
SPID=$!
curl -s 127.0.0.1:18912/metrics >"$OUT/edge-metrics-idle.txt" || true
# The generator's last progress line's value of KEY (open, moved, delivered; 0 before one).
lg_last() { grep -a '^t=' "$OUT/loadgen-output.txt" 2>/dev/null | tail -1 | sed -nE "s/.* $1=([0-9]+).*/\1/p" | grep . || echo 0; }
tcpext() { awk '/^TcpExt:/ { if (!h) { split($0, k); h = 1 } else { for (i = 2; i <= NF; i++) printf "%s=%s ", k[i], $i } }' /proc/net/netstat; }
# CPU seconds (user + system) PID has used so far, from /proc/PID/stat; nothing once it is gone.
proc_cpu_s() { awk -v tck="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); print ($12 + $13) / tck }' "/proc/$1/stat" 2>/dev/null || true; }
# The members an edge's /metrics text (file $1) says it holds (roomcast_connections, summed).
metrics_members() { awk '/^roomcast_connections\{/ { n += $NF } END { print n + 0 }' "$1" 2>/dev/null || echo 0; }
# See RESTART in the header. Runs while the generator publishes; records restart.json and a
# timeline (restart-timeline.tsv) from the signal on.
restart_storm() {
  local now t0 texit tup tback open moved fullest moved0 gone gone_gen scrape_t old_pid old_cpu
  # Every member connected and one gift delivered to each.
  while (($(lg_last delivered) < CONNS)); do
    kill -0 "$LGPID" 2>/dev/null || return 0
    sleep 0.5
  done
  moved0=$(lg_last moved)
  tcpext >"$OUT/restart-tcpext-before.txt"
  # The edge's last /metrics answer so far (a SIGKILLed edge answers no other).
  scrape_t=$(date +%s.%N)
  curl -s -m 20 127.0.0.1:18912/metrics >"$OUT/edge-metrics-before-restart.txt" || true
  cp "$OUT/edge-metrics-before-restart.txt" "$OUT/edge-metrics-at-exit.txt"
  old_pid=$EPID
  old_cpu=$(proc_cpu_s "$old_pid")
  t0=$(date +%s.%N)
  echo "restart: ${RESTART} restart of the edge (pid $EPID) at $(date -u +%T), $(lg_last open) members open"
  case $RESTART in
    kill) kill -KILL "$EPID" ;;
    *) kill -TERM "$EPID" ;;
  esac
  restart_loop
  tcpext >"$OUT/restart-tcpext-after.txt"
  curl -s -m 20 127.0.0.1:18912/metrics >"$OUT/edge-metrics-after-restart.txt" || true
  [[ $RESTART == peer ]] && { curl -s -m 20 127.0.0.1:18922/metrics >"$OUT/edge-b-metrics-after-restart.txt" || true; }
  restart_report
}
# After the signal (called by restart_storm, whose locals it sets), checked every 0.1 s: the
# old edge's exit (its /metrics and CPU read until then), the edge started again on the same
# ports (RESTART=peer: empty, its members having moved to B), the new edge answering; and from
# the signal on, one timeline line a second: since the signal, members open, moved so far, edge
# A's state (old: the signalled one still up; down; starting; new: the new one answering), whose
# accept queues the ratio is of (term/kill: the edge on A's ports, old or new; peer: B, where
# members move) and its fullest one, ListenOverflows, ListenDrops. Ends once every member is
# open again (term/kill: on the new edge, with reconnects seen) or, in peer mode, has moved and
# A answers again; or when the generator ends.
restart_loop() {
  local next state of ratio lo ld c
  texit=
  tup=
  tback=
  gone=
  gone_gen=
  fullest=0
  next=$t0
  printf 't_s\topen\tmoved\tedge_a\tfullest_ratio_of\tlisten_backlog_fullest_ratio\tListenOverflows_cumulative\tListenDrops_cumulative\n' >"$OUT/restart-timeline.tsv"
  while kill -0 "$LGPID" 2>/dev/null; do
    now=$(date +%s.%N)
    if [[ -z $texit ]] && ! kill -0 "$old_pid" 2>/dev/null; then
      wait "$old_pid" 2>/dev/null
      echo "edge exit status $?" >"$OUT/restart-old-edge-exit.txt"
      texit=$now
      # The members the edge held at its last /metrics answer (scraped at scrape_t; before the
      # signal for a SIGKILL), and the generator's open count when the script saw it gone.
      gone=$(metrics_members "$OUT/edge-metrics-at-exit.txt")
      gone_gen=$(lg_last open)
      echo "restart: edge A (pid $old_pid) exited $(echo "$texit - $t0" | bc) s after the signal, holding $gone members at its last /metrics answer ($(echo "$scrape_t - $t0" | bc) s after the signal); starting it again"
      start_edge
    elif [[ -n $texit && -z $tup ]]; then
      if ! kill -0 "$EPID" 2>/dev/null; then
        echo "the restarted edge exited at start:" >&2
        tail -5 "$TMP/edge.log" >&2
        exit 1
      fi
      if curl -sf -m 1 -o /dev/null 127.0.0.1:18912/healthz; then
        tup=$now
        echo "restart: edge A answering again (pid $EPID) $(echo "$tup - $t0" | bc) s after the signal"
      fi
    fi
    if [[ $(echo "$now >= $next" | bc) == 1 ]]; then
      while [[ $(echo "$next <= $now" | bc) == 1 ]]; do next=$(echo "$next + 1" | bc); done
      open=$(lg_last open)
      moved=$(lg_last moved)
      if [[ -z $texit ]]; then
        state=old
        # The old edge's counters and CPU, as late as it answers.
        if curl -s -m 1 127.0.0.1:18912/metrics >"$TMP/m.txt" 2>/dev/null && [[ -s $TMP/m.txt ]]; then
          cp "$TMP/m.txt" "$OUT/edge-metrics-at-exit.txt"
          scrape_t=$now
        fi
        # The highest reading: a process being torn down may show less.
        c=$(proc_cpu_s "$old_pid")
        [[ -n $c ]] && old_cpu=$(echo "$c ${old_cpu:-0}" | awk '{ print ($1 > $2) ? $1 : $2 }')
      elif [[ -z $tup ]]; then
        state=starting
      else
        state=new
      fi
      if [[ $RESTART == peer ]]; then
        of=B
        ratio=$(curl -s -m 1 127.0.0.1:18922/metrics 2>/dev/null | awk '/^roomcast_listen_backlog_fullest_ratio/ { if ($NF > m) m = $NF } END { print m + 0 }')
        fullest=$(echo "$ratio $fullest" | awk '{ print ($1 > $2) ? $1 : $2 }')
      elif [[ $state == old ]]; then
        of=A-old
        ratio=$(awk '/^roomcast_listen_backlog_fullest_ratio/ { if ($NF > m) m = $NF } END { print m + 0 }' "$TMP/m.txt" 2>/dev/null)
      elif [[ $state == new ]]; then
        of=A-new
        ratio=$(curl -s -m 1 127.0.0.1:18912/metrics 2>/dev/null | awk '/^roomcast_listen_backlog_fullest_ratio/ { if ($NF > m) m = $NF } END { print m + 0 }')
        fullest=$(echo "$ratio $fullest" | awk '{ print ($1 > $2) ? $1 : $2 }')
      else
        of=-
        ratio=
      fi
      read -r lo ld < <(tcpext | tr ' ' '\n' | awk -F= '$1 == "ListenOverflows" { o = $2 } $1 == "ListenDrops" { d = $2 } END { print o, d }')
      printf '%.1f\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$(echo "$now - $t0" | bc)" "$open" "$moved" "$state" "$of" "$ratio" "$lo" "$ld" >>"$OUT/restart-timeline.tsv"
      if [[ -z $tback ]]; then
        if [[ $RESTART == peer ]] && ((moved - moved0 >= CONNS && open >= CONNS)); then
          tback=$now
          echo "restart: all $CONNS members moved and open $(echo "$tback - $t0" | bc) s after the signal (drain period $((DRAIN_MS / 1000)) s)"
        elif [[ $RESTART != peer && -n $tup ]] && ((open >= CONNS && moved > moved0)); then
          # moved > moved0: a progress line from after the signal, not one from before it.
          tback=$now
          echo "restart: all $CONNS members open again $(echo "$tback - $t0" | bc) s after the signal"
        fi
      fi
      [[ -n $tback && -n $tup ]] && break
    fi
    sleep 0.1
  done
}
# restart.json from restart_storm's locals.
restart_report() {
  python3 - "$OUT" "$RESTART" "$CONNS" "$t0" "${texit:-}" "${tup:-}" "${tback:-}" "$moved0" "$(lg_last moved)" "$fullest" \
    "${gone:-}" "${gone_gen:-}" "$scrape_t" "$DRAIN_MS" "$old_pid" "${old_cpu:-}" "$PACE_TOML" "$MAX_MOVING" <<'PY'
import json, os, re, sys
(out, mode, conns, t0, texit, tup, tback, moved0, moved1, fullest, gone, gone_gen, scrape_t, drain_ms,
 old_pid, old_cpu, pace, max_moving) = sys.argv[1:]
conns, t0 = int(conns), float(t0)
texit = float(texit) if texit else None
tup = float(tup) if tup else None
def ext(name):
    return dict(kv.split("=") for kv in open(f"{out}/restart-tcpext-{name}.txt").read().split())
b, a = ext("before"), ext("after")
keys = ["ListenOverflows", "ListenDrops", "TCPReqQFullDrop", "TCPReqQFullDoCookies", "SyncookiesSent", "TCPTimeouts", "TCPSynRetrans"]
back = float(tback) - t0 if tback else None
moves = int(moved1) - int(moved0)
r = {
    "mode": {"term": "SIGTERM (drain with goaway)", "kill": "SIGKILL",
             "peer": "SIGTERM (drain with goaway) to edge A, members moved to edge B through dispatch (Redis bus)"}[mode],
    "drain_period_ms": int(drain_ms) if mode in ("term", "peer") else None,
    # drain.pace and drain.max_moving (0: the bound follows the fleet's uptake) of the edges.
    "drain_pace": pace == "true" if mode in ("term", "peer") else None,
    "drain_max_moving": int(max_moving) if mode in ("term", "peer") else None,
    "members": conns,
    # When the signal went (Unix time): the memory figures are from the samples before it.
    "signal_at": t0,
    "old_edge_exited_after_s": round(texit - t0, 2) if texit else None,
    # The old edge's own count (roomcast_connections) at its last /metrics answer before it
    # exited, and when that answer came (s after the signal; a SIGKILLed edge's last answer is
    # the one just before the signal). Until 2026-12-01 this was `members_open_when_it_exited`,
    # which in RESTART=term/kill was the generator's count, not the edge's.
    "old_edge_members_at_its_last_scrape": int(gone) if gone else None,
    "old_edge_last_scrape_after_s": round(float(scrape_t) - t0, 2),
    # The generator's members open at its last progress line when the script saw the old edge
    # gone (members whose socket the kernel reset may not have noticed yet).
    "generator_members_open_when_old_edge_exited": int(gone_gen) if gone_gen else None,
    "old_edge_pid": int(old_pid),
    # Its CPU (user + system since it started) at the last reading of /proc/PID/stat before it
    # exited (each second while it was up, and just before a SIGKILL).
    "old_edge_cpu_s_at_last_reading": float(old_cpu) if old_cpu else None,
    "new_edge_answering_after_s": round(tup - t0, 2) if tup else None,
    "all_members_open_again_after_s": round(back, 2) if back else None,
    "reconnects": moves,
    "reconnects_per_s_from_signal": round(moves / back, 1) if back else None,
    "reconnects_per_s_from_new_edge_up": round(moves / (float(tback) - tup), 1) if back and tup and mode != "peer" and float(tback) > tup else None,
    "tcpext_during_restart": {k: int(a.get(k, 0)) - int(b.get(k, 0)) for k in keys},
}
# Whose accept queues: in peer mode members move to B (A comes back empty).
if mode == "peer":
    r["edge_b_listen_backlog_fullest_ratio"] = float(fullest)
else:
    r["new_edge_listen_backlog_fullest_ratio"] = float(fullest)
def closes(path):
    c = {}
    for l in open(path) if os.path.exists(path) else []:
        m = re.match(r'roomcast_connections_closed_total\{.*reason="(\w+)".*\} (\S+)', l)
        if m and float(m.group(2)):
            c[m.group(1)] = c.get(m.group(1), 0) + int(float(m.group(2)))
    return c
# The old edge's closes by reason, from its last answer to /metrics before it exited.
r["old_edge_closes_by_reason_at_its_last_scrape"] = closes(f"{out}/edge-metrics-at-exit.txt")
# Connections the edge accepted before the signal, against members and their reconnects so far:
# more accepts than that are connections the generator opened and closed without counting them.
def total(path, name):
    if not os.path.exists(path):
        return None
    return int(sum(float(l.split()[-1]) for l in open(path) if l.startswith(name + "{") or l.startswith(name + " ")))
# Drain pacing (drain.pace): how often the old edge's goaways waited for the fleet, and how its
# graceful closes ended (lingering close: the peer's FIN, the linger's timeout, and so on).
r["old_edge_drain_holds_at_its_last_scrape"] = total(f"{out}/edge-metrics-at-exit.txt", "roomcast_drain_holds_total")
def by_label(path, name, label):
    c = {}
    for l in open(path) if os.path.exists(path) else []:
        m = re.match(name + r'\{.*' + label + r'="(\w+)".*\} (\S+)', l)
        if m and float(m.group(2)):
            c[m.group(1)] = c.get(m.group(1), 0) + int(float(m.group(2)))
    return c
r["old_edge_close_lingers_by_outcome_at_its_last_scrape"] = by_label(
    f"{out}/edge-metrics-at-exit.txt", "roomcast_close_lingers_total", "outcome")
acc = total(f"{out}/edge-metrics-before-restart.txt", "roomcast_connections_accepted_total")
r["accepted_before_signal"] = acc
r["generator_reconnects_before_signal"] = int(moved0)
r["accepted_beyond_members_and_reconnects"] = acc - conns - int(moved0) if acc is not None else None
json.dump(r, open(f"{out}/restart.json", "w"), indent=2)
print(json.dumps(r, indent=2))
PY
}
BUDGET=$((MAX_SECS - ($(date +%s) - START) - 30))
GIFT_RATE=$(python3 -c "print(1 / $GIFT_EVERY)")
set +e
# The generator's own limit: stopped (SIGTERM, its workers with it) past the run's budget.
$(pin "$LG_CPUS") timeout --signal=TERM "$BUDGET" "$LG_BIN" run --target edge --ws 127.0.0.1:18911 --http "$PUB_HTTP" \
  --connections "$CONNS" --ramp "$RAMP" --src-addrs "$SRC_ADDRS" --duration "$SECS" \
  --connect-inflight "$INFLIGHT" --connect-deadline "$CONNECT_DEADLINE" --allow-connect-failures "$ALLOW_CONNECT_FAILURES" \
  --gift-rate "$GIFT_RATE" --chat-rate 0 --gift-streams 1 --chat-streams 1 --gift-give-up "$GIVE_UP" \
  "${MOVE_ARGS[@]}" \
  --server-pid "$EPID" --out "$ROOT/bench-results" --scenario "$SCEN" --replace \
  --note "edge --shards $SHARDS (ring cap $PER_RING = RLIMIT_NOFILE $NOFILE - 16), pings every $PING_MS ms (idle timeout $IDLE_MS), probes $PROBES/${PROBE_MS}ms, presence push every $PRESENCE_MS ms (0: off); one room; a gift every $GIFT_EVERY s${ROOMCAST_IN_NETNS:+; own network namespace with $EHASH established-hash buckets and somaxconn $(sysctl -n net.core.somaxconn)}${BPID:+; RESTART=peer: edge B and Redis beside it, published through B}; edge CPUs ${EDGE_CPUS:-all}, generator CPUs ${LG_CPUS:-all}" \
  > >(tee "$OUT/loadgen-output.txt") 2> >(tee "$OUT/loadgen-stderr.txt" >&2) &
LGPID=$!
echo "$LGPID" >"$TMP/lgpid"
# The edge's /metrics once every member is in (the generator's "connected ..." line).
(
  for _ in $(seq "$BUDGET"); do
    grep -q "^connected " "$OUT/loadgen-output.txt" 2>/dev/null && break
    kill -0 "$LGPID" 2>/dev/null || exit 0
    sleep 1
  done
  curl -s -m 20 127.0.0.1:18912/metrics >"$OUT/edge-metrics-connected.txt"
) &
if [[ $RESTART != 0 ]]; then
  restart_storm
fi
wait "$LGPID"
RC=$?
LGPID=
set -e
# The closes "to the end, teardown included": the generator's members are gone once it has
# exited, but the edge counts each close as its shard gets to it, and a scrape at once found
# 2,119 of 5,000 still open (RESTART=kill, 5,000 members). Wait (up to 30 s) for the edges on
# A's and B's ports to hold none.
for _ in $(seq 300); do
  held=$(curl -s -m 2 127.0.0.1:18912/metrics | awk '/^roomcast_connections\{/ { n += $NF } END { print n + 0 }')
  [[ $RESTART == peer ]] && held=$((held + $(curl -s -m 2 127.0.0.1:18922/metrics | awk '/^roomcast_connections\{/ { n += $NF } END { print n + 0 }')))
  ((held == 0)) && break
  sleep 0.1
done
curl -s -m 20 127.0.0.1:18912/metrics >"$OUT/edge-metrics-end.txt" || true
curl -s -m 20 127.0.0.1:18912/v1/rooms/r0 >"$OUT/room-stats.json" || true
if [[ $RESTART == peer ]]; then
  curl -s -m 20 127.0.0.1:18922/metrics >"$OUT/edge-b-metrics-end.txt" || true
  curl -s -m 20 127.0.0.1:18922/v1/rooms/r0 >"$OUT/room-stats-b.json" || true
  # Dispatch's answers by outcome (why members were refused a route).
  curl -s -m 20 127.0.0.1:18913/metrics >"$OUT/dispatch-metrics-end.txt" || true
fi
sleep 2
kill "$SPID" 2>/dev/null || true
SPID=
echo "loadgen exit status $RC" >>"$OUT/loadgen-output.txt"

# Summary: the kernel's memory per connection (each member is two sockets on this box: the
# edge's and the generator's), from the sample before any member and the one with the most.
python3 - "$OUT" "$CONNS" "$SHARDS" "$RC" "$RESTART" "$MOVE_GIVE_UP" <<'PY'
import json, os, re, sys
out, conns, shards, rc, restart = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
move_give_up = sys.argv[6] or "loadgen's default"
rs = json.load(open(f"{out}/restart.json")) if os.path.exists(f"{out}/restart.json") else None
S = [json.loads(l) for l in open(f"{out}/samples.jsonl")]
base = S[0]
# The memory figures are of the members held, so of the samples before a restart's signal: a
# rolling restart's sockets peak while members move (both edges' and the generator's sockets at
# once), when the drained edge's RSS is falling (a 10^6 run read -130 bytes per connection).
held = [s for s in S if not rs or s.get("at", 0) < rs.get("signal_at", float("inf"))] or S
peak = max(held, key=lambda s: s["sockstat"].get("inuse", 0))
n = max(peak["sockstat"].get("inuse", 0) - base["sockstat"].get("inuse", 0), 1)
pairs = n / 2
slab_d = sorted(((k, peak["slab"].get(k, 0) - base["slab"].get(k, 0)) for k in peak["slab"]), key=lambda x: -x[1])
mem_d = {k: peak["mem"][k] - base["mem"][k] for k in ("Slab", "SUnreclaim", "SReclaimable", "KernelStack", "Percpu", "PageTables", "MemAvailable")}
edge_rss = (peak["edge"] or {}).get("rss", 0) - (base["edge"] or {}).get("rss", 0)
# The edge's CPU per process (user + system since each started, at its last sample): a
# restart starts a new process whose counters begin at 0, so one difference across the run
# mixed two processes (and left edge B out in RESTART=peer). Edge A before the restart: its
# last reading before it exited (the sampler's, every 2 s, or the restart loop's, each second
# and just before a SIGKILL, whichever is later).
def cpu_of(key, pid_key):
    by = {}
    for s in S:
        if s.get(key) and s.get(pid_key) is not None:
            by[s[pid_key]] = max(by.get(s[pid_key], 0.0), s[key]["cpu_s"])
    return by
a_cpu = cpu_of("edge", "edge_pid")
a_pids = list(dict.fromkeys(s["edge_pid"] for s in S if s.get("edge_pid") is not None))
cpu_rows, missing = [], []
if restart == "0":
    expected = [("edge", a_pids[0] if a_pids else None, "to its last sample")]
else:
    old_pid = rs["old_edge_pid"] if rs else (a_pids[0] if a_pids else None)
    new_pid = next((p for p in a_pids if p != old_pid), None)
    expected = [("edge A before the restart", old_pid, "to its last reading before it exited"),
                ("edge A restarted", new_pid, "to its last sample")]
    if rs and rs.get("old_edge_cpu_s_at_last_reading") is not None and old_pid is not None:
        a_cpu[old_pid] = max(a_cpu.get(old_pid, 0.0), rs["old_edge_cpu_s_at_last_reading"])
if restart == "peer":
    b_cpu = cpu_of("edge_b", "edge_b_pid")
    b_pid = next(iter(b_cpu), None)
    a_cpu.update(b_cpu)
    expected.append(("edge B", b_pid, "to its last sample"))
for label, pid, until in expected:
    if pid is None or pid not in a_cpu:
        missing.append(f"{label}: no sample of its CPU" + ("" if pid is None else f" (pid {pid})"))
        continue
    cpu_rows.append({"process": label, "pid": pid, "cpu_s": round(a_cpu[pid], 1), "until": until})
edge_cpu = round(sum(r["cpu_s"] for r in cpu_rows), 1) if not missing else None
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
    "edge_cpu_s_by_process": cpu_rows,
    # The sum over the processes above, only when every one is known.
    "edge_cpu_s_whole_run": edge_cpu,
    "edge_cpu_s_whole_run_omitted_because": "; ".join(missing) or None,
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
# Connections the edge accepted by the time every member was in, against the members and the
# generator's reconnects by then (its last connect line): more accepts than both are sockets
# the generator opened and closed without counting them (the 10^6 attempt's edge counted
# 973,605 accepts for 859,587 members).
acc = gauge(f"{out}/edge-metrics-connected.txt", "roomcast_connections_accepted_total")
lines = [l for l in open(f"{out}/loadgen-output.txt") if l.startswith("connecting t=")] if os.path.exists(f"{out}/loadgen-output.txt") else []
rec = int(re.search(r"reconnected=(\d+)", lines[-1]).group(1)) if lines and "reconnected=" in lines[-1] else None
k["edge_accepted_when_connected"] = int(sum(acc)) if acc else None
k["generator_reconnects_when_connected"] = rec
def closes_of(path):
    closes = {}
    for l in open(path) if os.path.exists(path) else []:
        m = re.match(r'roomcast_connections_closed_total\{(.*)\} (\S+)', l)
        if m:
            r = re.search(r'reason="(\w+)"', m.group(1)).group(1)
            closes[r] = closes.get(r, 0) + float(m.group(2))
    return {r: int(v) for r, v in closes.items() if v}
# The edge on A's ports at the end: with RESTART, the restarted one (in peer mode it starts
# empty, its members on B). The old A's are from its last /metrics answer before it exited, B's to the end.
k["edge_closes_by_reason"] = closes_of(f"{out}/edge-metrics-end.txt")
# The restarted A starts empty, but members still moving once it answers ask dispatch, which
# may send them to it (a 5,000-member trial's restarted A took 168): "empty" was not true.
acc_end = gauge(f"{out}/edge-metrics-end.txt", "roomcast_connections_accepted_total")
k["restarted_edge_accepted"] = int(sum(acc_end)) if acc_end else None
if rs:
    k["old_edge_closes_by_reason_at_its_last_scrape"] = rs.get("old_edge_closes_by_reason_at_its_last_scrape", {})
if restart == "peer":
    k["edge_b_closes_by_reason"] = closes_of(f"{out}/edge-b-metrics-end.txt")
    def counted(path, name, label=None):
        got = {}
        for l in open(path) if os.path.exists(path) else []:
            m = re.match(name + r'(\{(.*)\})? (\S+)$', l.strip())
            if m:
                key = re.search(label + r'="(\w+)"', m.group(2)).group(1) if label else name
                got[key] = got.get(key, 0) + int(float(m.group(3)))
        return got
    k["dispatch_answers_by_outcome"] = counted(f"{out}/dispatch-metrics-end.txt", "roomcast_dispatch_answers_total", "outcome")
    # Joins with a since older than the edge's history, and the reads of Redis they shared.
    k["recovery_reads_joins"] = {
        e: (counted(p, "roomcast_recovery_reads_total").get("roomcast_recovery_reads_total"),
            counted(p, "roomcast_recovery_joins_total").get("roomcast_recovery_joins_total"))
        for e, p in (("A restarted", f"{out}/edge-metrics-end.txt"), ("B", f"{out}/edge-b-metrics-end.txt"))
    }
json.dump(k, open(f"{out}/kernel.json", "w"), indent=2)
print(json.dumps(k, indent=2))
r = json.load(open(f"{out}/result.json")) if os.path.exists(f"{out}/result.json") else {}
g = r.get("latency_ms", {}).get("gift", {})
rows = [
    ("members connected (failed; by reason)", f"{r.get('connections', 'no result')} ({r.get('failed_connections', '-')}; {r.get('failed_by_reason', {})})"),
    ("workers died", len(r.get("workers_died", [])) if r else "-"),
    ("connect rate (handshake p50/p99 ms)", f"{r.get('connect_per_s', 0):.0f}/s ({r.get('handshake_ms', {}).get('p50', '-')}/{r.get('handshake_ms', {}).get('p99', '-')})" if r else "-"),
    # Gifts given up were never acknowledged (an edge down for the whole give-up time): not
    # "lost" (nobody was to get them), but not delivered either, and the run's loss of 0 hid them.
    ("gifts published; deliveries; lost; given up unacknowledged (refusals by status)", f"{r.get('published', {}).get('gift', '-')}; {r.get('deliveries', '-')}; {r.get('lost', {}).get('gift', '-')}; {r.get('publish_gave_up', {}).get('gift', '-')} ({r.get('publish_refused_by_status', {})})"),
    ("gift p50 / p99 / max (ms)", f"{g.get('p50', '-')} / {g.get('p99', '-')} / {g.get('max', '-')}"),
    ("closes received by members, by code", r.get("closes_by_code", "-")),
    ("members' sockets lost without a close frame, by how", r.get("sockets_lost_by_reason", "-")),
    *([("edge closes by reason (to the end, teardown included)", k["edge_closes_by_reason"])] if not rs else [
        ("edge closes by reason: edge A before the restart (its last /metrics answer before it exited)", k["old_edge_closes_by_reason_at_its_last_scrape"]),
        ("edge closes by reason: edge A restarted" + (f" (started empty; members dispatch sent it afterwards: {k['restarted_edge_accepted']} accepted)" if restart == "peer" else "") + " (to the end, teardown included)", k["edge_closes_by_reason"]),
    ]),
    *([("edge closes by reason: edge B (to the end, teardown included)", k["edge_b_closes_by_reason"])] if restart == "peer" else []),
    ("edge RSS per connection (B; idle RSS)", f"{k['edge_rss_bytes_per_connection']} ({k['edge_rss_idle_bytes']})"),
    ("kernel slab per socket (B); per member (2 sockets)", f"{k['slab_total_bytes_per_socket']}; {k['kernel_bytes_per_connection_pair']['Slab']}"),
    ("top slab caches per socket (B)", k["slab_bytes_per_socket"]),
    ("TCP buffer pages at peak (sockstat mem)", k["tcp_buffer_pages_at_peak"]),
    ("edge CPU s by process (since it started)", "; ".join(f"{c['process']} (pid {c['pid']}, {c['until']}): {c['cpu_s']}" for c in cpu_rows) or "-"),
    ("edge CPU s (whole run: the sum); threads", f"{edge_cpu if edge_cpu is not None else 'omitted: ' + k['edge_cpu_s_whole_run_omitted_because']}; {k['edge_threads']}"),
    ("generator RSS per member (B; processes)", f"{k['loadgen_rss_bytes_per_connection']} ({k['loadgen_processes']})"),
    ("ListenOverflows / ListenDrops / syncookies", f"{k['listen_overflows']} / {k['listen_drops']} / {k['syncookies_sent']}"),
    ("fullest accept queue when connected (ratio)", max(k["listen_backlog_fullest_ratio_connected"] or [0])),
    ("edge accepts when connected; generator reconnects by then", f"{k['edge_accepted_when_connected']}; {k['generator_reconnects_when_connected']}"),
    ("generator exit status", rc),
]
# Why the generator failed, in its own words (its last `Error:` line).
err = [l.strip() for l in open(f"{out}/loadgen-stderr.txt")] if os.path.exists(f"{out}/loadgen-stderr.txt") else []
err = [l for l in err if l.startswith("Error:")]
if rc and err:
    rows.append(("generator's error", err[-1]))
if rs:
    peer = restart == "peer"
    rows += [
        ("restart: how", rs["mode"]),
        ("restart: old edge exited / new edge answering / all members open again (s after the signal)",
         f"{rs['old_edge_exited_after_s']} / {rs['new_edge_answering_after_s']} / {rs['all_members_open_again_after_s']}"),
        ("restart: members the old edge held at its last /metrics answer (the edge's count; answer at s after the signal)",
         f"{rs['old_edge_members_at_its_last_scrape']} ({rs['old_edge_last_scrape_after_s']})"),
        ("restart: members open at the generator's last line when the old edge was seen gone (the generator's count)",
         rs["generator_members_open_when_old_edge_exited"]),
        ("restart: reconnects; per s from the signal; per s from the new edge up",
         f"{rs['reconnects']}; {rs['reconnects_per_s_from_signal']}; {rs['reconnects_per_s_from_new_edge_up']}"),
        ("restart: TcpExt deltas", rs["tcpext_during_restart"]),
        ("restart: edge B's fullest accept queue (ratio; where members moved)", rs["edge_b_listen_backlog_fullest_ratio"]) if peer
        else ("restart: new edge's fullest accept queue (ratio)", rs["new_edge_listen_backlog_fullest_ratio"]),
        ("restart: generator's failed attempts by reason", r.get("reconnect_attempts_failed_by_reason", "-")),
        *([("restart: dispatch answers by outcome", k.get("dispatch_answers_by_outcome") or "-"),
           ("restart: joins recovered from Redis: (reads, joins) by edge", k.get("recovery_reads_joins") or "-")] if peer else []),
        ("restart: answers past their deadline read late by the generator (taken, not failures)", r.get("move_answers_read_late", "-")),
        (f"restart: moves given up (--move-give-up: {move_give_up}; 0: never)", r.get("reconnect_failed", "-")),
    ]
with open(f"{out}/summary.md", "w") as f:
    f.write(f"# {conns} members, {shards} shards\n\n| figure | value |\n|---|---|\n")
    for name, v in rows:
        f.write(f"| {name} | {v} |\n")
PY
gzip -f "$OUT/samples.jsonl"
exit "$RC"
