#!/usr/bin/env bash
# Store benchmark (issue #11): must-deliver publishes per second over HTTP with each
# `store.fsync` policy ("always", an interval of 10 ms, "never") and with `--no-store`, for one
# room and for ROOMS_MANY rooms, at each concurrency in CONC.
#
# The edge and the load generator are built from a git worktree snapshot of HEAD ($WT, made if
# missing and removed at the end unless KEEP_WT=1; an existing one is moved to HEAD). Each case
# waits for a quiet box (no cargo, rustc, test binary or debug edge running and a 1-minute load
# average under LOAD_MAX; at most WAIT_QUIET minutes per case, then it runs anyway and says so),
# measures the raw fdatasync latency of the data dir's filesystem (FSYNC_N appends of 200 bytes,
# each followed by fdatasync), starts a fresh edge on a fresh temporary data dir with
#
#   shards = SHARDS; [probes] source = "off"; [store] fsync = <policy>;
#   [limits] must_deliver_room_rate = must_deliver_room_burst = 1e9
#
# (the per-room must-deliver limit, 5,000/s by default, is raised out of reach: the store is
# measured, not the limit; kernel probes off: nothing else costs CPU), runs `loadgen pubbench`
# (closed loop: C clients publishing gifts back to back, rooms round robin, WARMUP s not counted,
# then SECS s measured), reads the edge's /metrics, stops it (SIGTERM) and measures fdatasync
# again. Cases are interleaved: for each repetition, rooms and concurrency, every policy in turn
# (A B C D A B C D), so that a change in the disk's speed is seen by all policies.
#
# Results: $OUT (README.md is written by hand; summary.md and summary.json by this script;
# raw/<case>/: pubbench.json, pubbench.err, fsync-before.json, fsync-after.json, edge.toml,
# edge.log, metrics.txt, data-dir-bytes.txt, box.txt; raw/env.txt).
# Env: POLICIES ("always 10 never nostore"), ROOMS ("1 1000"), CONC ("16 64"), REPS (2), SECS (10),
# WARMUP (2), BODY (64: bytes of the message body), SHARDS (2), GEN_THREADS (1), FSYNC_N (200),
# PORT (18781; HTTP is PORT+1), WT (${TMPDIR:-/tmp}/roomcast-bench-store), CARGO_TARGET_DIR
# ($ROOT/target/bench), EDGE_BIN + LG_BIN (prebuilt binaries: no snapshot, the commit is HEAD's),
# OUT (bench-results/<date>-store), KEEP_WT (0), WAIT_QUIET (20), LOAD_MAX (1.0),
# DATA_ROOT (a temporary directory under /tmp).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
POLICIES=${POLICIES:-"always 10 never nostore"}
ROOMS=${ROOMS:-"1 1000"}
CONC=${CONC:-"16 64"}
REPS=${REPS:-2}
SECS=${SECS:-10}
WARMUP=${WARMUP:-2}
BODY=${BODY:-64}
SHARDS=${SHARDS:-2}
GEN_THREADS=${GEN_THREADS:-1}
FSYNC_N=${FSYNC_N:-200}
PORT=${PORT:-18781}
HPORT=$((PORT + 1))
WT=${WT:-${TMPDIR:-/tmp}/roomcast-bench-store}
KEEP_WT=${KEEP_WT:-0}
WAIT_QUIET=${WAIT_QUIET:-20}
LOAD_MAX=${LOAD_MAX:-1.0}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target/bench}
OUT=${OUT:-$ROOT/bench-results/$(date +%Y-%m-%d)-store}
mkdir -p "$OUT/raw"

# shellcheck source=lib/bench.sh
. "$ROOT/scripts/lib/bench.sh"
ports_free "$PORT" "$HPORT"

snapshot_build

TMP=${DATA_ROOT:-$(mktemp -d /tmp/bench-store.XXXXXX)}
mkdir -p "$TMP"
EPID=
stop_edge() {
  if [[ -n $EPID ]] && kill -0 "$EPID" 2>/dev/null; then
    kill -TERM "$EPID" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$EPID" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$EPID" 2>/dev/null || true
  fi
  [[ -n $EPID ]] && wait "$EPID" 2>/dev/null || true
  EPID=
}
cleanup() {
  stop_edge
  rm -rf "$TMP"
  snapshot_remove
}
trap cleanup EXIT


# Raw fdatasync latency of the filesystem the data dirs are on: N appends of 200 bytes, each
# followed by fdatasync (what a group commit of one small record costs at least).
fsync_probe() { # $1: output file
  python3 - "$TMP" "$FSYNC_N" >"$1" <<'PY'
import json, os, statistics, sys, time
d, n = sys.argv[1], int(sys.argv[2])
p = os.path.join(d, "fsync-probe")
fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
rec, lat = os.urandom(200), []
for _ in range(n):
    t = time.perf_counter()
    os.write(fd, rec)
    os.fdatasync(fd)
    lat.append((time.perf_counter() - t) * 1e6)
os.close(fd)
os.unlink(p)
lat.sort()
q = lambda x: lat[min(len(lat) - 1, int(x * len(lat)))]
print(json.dumps({"n": n, "p50_us": round(q(0.5), 1), "p90_us": round(q(0.9), 1), "p99_us": round(q(0.99), 1),
                  "max_us": round(lat[-1], 1), "mean_us": round(statistics.mean(lat), 1),
                  "at": time.strftime("%H:%M:%S", time.gmtime())}))
PY
}

start_edge() { # $1: policy, $2: case dir
  local policy=$1 dir=$2 data=$TMP/data args=()
  rm -rf "$data"
  {
    echo "shards = $SHARDS"
    printf '[probes]\nsource = "off"\n'
    printf '[limits]\nmust_deliver_room_rate = 1e9\nmust_deliver_room_burst = 1e9\n'
    case $policy in
      always | never) printf '[store]\nfsync = "%s"\n' "$policy" ;;
      nostore) ;;
      *) printf '[store]\nfsync = %s\n' "$policy" ;;
    esac
  } >"$dir/edge.toml"
  [[ $policy == nostore ]] && args=(--no-store)
  "$EDGE" --config "$dir/edge.toml" --data-dir "$data" --listen "127.0.0.1:$PORT" --http "127.0.0.1:$HPORT" \
    "${args[@]}" >"$TMP/edge.log" 2>&1 &
  EPID=$!
  for _ in $(seq 100); do
    code=$(curl -s -o /dev/null -w '%{http_code}' "127.0.0.1:$HPORT/healthz" || true)
    [[ $code != 000 ]] && return 0
    kill -0 "$EPID" 2>/dev/null || break
    sleep 0.1
  done
  cat "$TMP/edge.log" >&2
  echo "edge did not start ($policy)" >&2
  exit 1
}

run_case() { # $1: policy, $2: rooms, $3: concurrency, $4: repetition
  local policy=$1 rooms=$2 conc=$3 rep=$4
  local name=$policy-rooms$rooms-c$conc-$rep
  local dir=$OUT/raw/$name
  rm -rf "$dir"
  mkdir -p "$dir"
  wait_quiet | tee "$dir/box.txt"
  fsync_probe "$dir/fsync-before.json"
  start_edge "$policy" "$dir"
  local rc=0
  "$LG" pubbench --http "127.0.0.1:$HPORT" --rooms "$rooms" --concurrency "$conc" --duration "$SECS" \
    --warmup "$WARMUP" --kind gift --body-bytes "$BODY" --threads "$GEN_THREADS" --server-pid "$EPID" \
    --label "$name" --out "$dir/pubbench.json" >/dev/null 2>"$dir/pubbench.err" || rc=$?
  echo "$rc" >"$dir/pubbench-exit.txt"
  curl -s "127.0.0.1:$HPORT/metrics" |
    grep -E '^roomcast_(publish_rejected|messages_in|messages_dropped|store_bytes|rooms_restored)' >"$dir/metrics.txt" || true
  du -sb "$TMP/data" 2>/dev/null | cut -f1 >"$dir/data-dir-bytes.txt" || true
  stop_edge
  sed -E "s/\x1b\[[0-9;]*m//g" "$TMP/edge.log" | head -n 100 >"$dir/edge.log"
  fsync_probe "$dir/fsync-after.json"
  python3 - "$dir" <<'PY'
import json, sys
d = sys.argv[1]
r = json.load(open(f"{d}/pubbench.json"))
b, a = json.load(open(f"{d}/fsync-before.json")), json.load(open(f"{d}/fsync-after.json"))
print(f"  {r['label']}: {r['accepted_per_s']:.0f}/s, ack p50 {r['ack_ms']['p50']:.2f} p99 {r['ack_ms']['p99']:.2f} "
      f"max {r['ack_ms']['max']:.1f} ms, edge {r['edge_cpu_us_per_publish'] or 0:.1f} us/publish, "
      f"other {r['other_answers']} errors {r['transport_errors']}; fdatasync p50 {b['p50_us']:.0f} -> {a['p50_us']:.0f} us")
PY
}

{
  echo "commit $COMMIT"
  echo "started $(date -u +%FT%TZ)"
  uname -sr
  nproc
  lscpu | grep -E 'Model name|^CPU\(s\)'
  findmnt -no SOURCE,FSTYPE,OPTIONS --target "$TMP"
  echo "POLICIES=$POLICIES ROOMS=$ROOMS CONC=$CONC REPS=$REPS SECS=$SECS WARMUP=$WARMUP BODY=$BODY SHARDS=$SHARDS GEN_THREADS=$GEN_THREADS"
} >"$OUT/raw/env.txt"
fsync_probe "$OUT/raw/fsync-start.json"
for rep in $(seq "$REPS"); do
  for rooms in $ROOMS; do
    for conc in $CONC; do
      for policy in $POLICIES; do
        echo "== $policy, $rooms rooms, concurrency $conc, repetition $rep"
        run_case "$policy" "$rooms" "$conc" "$rep"
      done
    done
  done
done
echo "ended $(date -u +%FT%TZ)" >>"$OUT/raw/env.txt"

python3 - "$OUT" "$POLICIES" "$ROOMS" "$CONC" "$REPS" "$COMMIT" <<'PY'
import json, os, statistics, sys
out, policies, rooms, conc, reps, commit = sys.argv[1], sys.argv[2].split(), sys.argv[3].split(), sys.argv[4].split(), int(sys.argv[5]), sys.argv[6]
label = {"always": 'fsync "always"', "never": 'fsync "never"', "nostore": "--no-store"}
rows, lines = [], []
for r in rooms:
    for c in conc:
        lines += [f"### {r} room{'s' if r != '1' else ''}, concurrency {c}", "",
                  "| policy | accepted/s, each run | mean | vs --no-store | ack p50 / p99 / max ms, each run | edge µs CPU / publish, each run | edge cores | generator µs / publish | other answers | fdatasync p50 µs before → after, each run |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        means = {}
        for p in policies:
            runs = []
            for k in range(1, reps + 1):
                d = os.path.join(out, "raw", f"{p}-rooms{r}-c{c}-{k}")
                try:
                    j = json.load(open(os.path.join(d, "pubbench.json")))
                except (OSError, ValueError):
                    continue
                j["fsync_before"] = json.load(open(os.path.join(d, "fsync-before.json")))
                j["fsync_after"] = json.load(open(os.path.join(d, "fsync-after.json")))
                j["box"] = open(os.path.join(d, "box.txt")).read().strip()
                j["case"] = f"{p}-rooms{r}-c{c}-{k}"
                runs.append(j)
                rows.append(j)
            if runs:
                means[p] = statistics.mean(x["accepted_per_s"] for x in runs)
        base = means.get("nostore")
        for p in policies:
            runs = [x for x in rows if x["case"].startswith(f"{p}-rooms{r}-c{c}-")]
            if not runs:
                lines.append(f"| {label.get(p, f'fsync = {p} (ms)')} | no result | | | | | | | | |")
                continue
            other = {}
            for x in runs:
                for s, n in x["other_answers"].items():
                    other[s] = other.get(s, 0) + n
                if x["transport_errors"]:
                    other["error"] = other.get("error", 0) + x["transport_errors"]
            lines.append(
                f"| {label.get(p, f'fsync = {p} (ms)')} | " + ", ".join(f"{x['accepted_per_s']:.0f}" for x in runs)
                + f" | {means[p]:.0f} | " + (f"{means[p] / base:.2f}x" if base else "-") + " | "
                + ", ".join(f"{x['ack_ms']['p50']:.2f} / {x['ack_ms']['p99']:.2f} / {x['ack_ms']['max']:.1f}" for x in runs) + " | "
                + ", ".join(f"{x['edge_cpu_us_per_publish']:.1f}" if x['edge_cpu_us_per_publish'] else "-" for x in runs) + " | "
                + ", ".join(f"{x['edge_cpu_cores']:.2f}" if x['edge_cpu_cores'] else "-" for x in runs) + " | "
                + ", ".join(f"{x['generator_cpu_us_per_publish']:.1f}" if x['generator_cpu_us_per_publish'] else "-" for x in runs) + " | "
                + (", ".join(f"{s}: {n}" for s, n in sorted(other.items())) or "none") + " | "
                + ", ".join(f"{x['fsync_before']['p50_us']:.0f} → {x['fsync_after']['p50_us']:.0f}" for x in runs) + " |")
        lines.append("")
noisy = [x["case"] for x in rows if not x["box"].startswith("quiet")]
lines += ["Cases that started on a box that was not quiet: " + (", ".join(noisy) if noisy else "none"), ""]
json.dump({"commit": commit, "runs": rows}, open(os.path.join(out, "summary.json"), "w"), indent=2)
open(os.path.join(out, "summary.md"), "w").write("\n".join(lines))
print("\n".join(lines))
PY
