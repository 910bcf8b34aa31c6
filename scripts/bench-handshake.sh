#!/usr/bin/env bash
# Handshake cost with token verification (issue #10): the edge's CPU per WebSocket upgrade with
# auth off, HS256, ES256 and RS256 connection tokens, at CONNS connects per run.
#
# The edge and the load generator are built from a git worktree snapshot of HEAD ($WT, made if
# missing and removed at the end unless KEEP_WT=1; an existing one is moved to HEAD), so the
# figures belong to one commit and not to whatever is being edited in the main tree. Tokens are
# signed beforehand by `loadgen tokens` (one per connection, distinct sub u0, u1, ...; exp in an
# hour; rooms ["r*"]), so signing is neither in the edge's CPU nor in the connect timings. Each
# run waits for a quiet box (no cargo, rustc, test binary or debug edge of someone else's
# running; at most WAIT_QUIET minutes over the whole script, then it runs anyway and says so),
# starts a fresh edge (SHARDS shards, kernel probes off so that nothing but the connects costs
# CPU), reads its idle CPU for 2 s, then loadgen opens CONNS connections to room r0 (WORKERS
# worker processes, each holding one handshake in flight at a time, paced to RATE connects/s, 0 =
# as fast as they go) with `--tokens`; nothing is published. The edge's CPU (utime + stime of the
# whole process, from /proc/PID/stat) from before the first connect to 0.5 s after the last
# upgrade, divided by the upgrades answered 101, is the µs per handshake. A run counts only if
# every connection was upgraded (loadgen counts a 401 as failed), none closed, and the edge's
# roomcast_connections_refused_total is 0. A negative control first: an HS256 edge given NEG_CONNS
# tokens signed with another secret must upgrade none of them.
#
# Results: $OUT (summary.md, summary.json, raw/<run>/: loadgen's result.json and README.md, its
# output, the edge's log and /metrics). Env: CONNS (10000), MODES ("none hs256 es256 rs256"),
# RATES ("2000 0"), REPS (2: runs per mode and rate, interleaved), WORKERS (2), SHARDS (2),
# NEG_CONNS (200), PORT (18761; HTTP is PORT+1), WT (${TMPDIR:-/tmp}/roomcast-bench-handshake),
# CARGO_TARGET_DIR ($ROOT/target/bench), EDGE_BIN + LG_BIN (prebuilt: no snapshot), OUT (bench-results/<date>-handshake), KEEP_WT (0), WAIT_QUIET (20).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CONNS=${CONNS:-10000}
MODES=${MODES:-"none hs256 es256 rs256"}
RATES=${RATES:-"2000 0"}
WORKERS=${WORKERS:-2}
SHARDS=${SHARDS:-2}
NEG_CONNS=${NEG_CONNS:-200}
PORT=${PORT:-18761}
HPORT=$((PORT + 1))
WT=${WT:-${TMPDIR:-/tmp}/roomcast-bench-handshake}
KEEP_WT=${KEEP_WT:-0}
WAIT_QUIET=${WAIT_QUIET:-20}
REPS=${REPS:-2}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target/bench}
OUT=${OUT:-$ROOT/bench-results/$(date +%Y-%m-%d)-handshake}
mkdir -p "$OUT/raw"

# shellcheck source=lib/bench.sh
LOAD_MAX=
. "$ROOT/scripts/lib/bench.sh"
ports_free "$PORT" "$HPORT"

snapshot_build

TMP=$(mktemp -d)
EPID=
stop_edge() {
  if [[ -n $EPID ]] && kill -0 "$EPID" 2>/dev/null; then
    kill -INT "$EPID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$EPID" 2>/dev/null || break; sleep 0.2; done
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

# Keys: a random HS256 secret (48 bytes), the test ES256 pair, an RSA-2048 pair made here.
SECRET=$(head -c 48 /dev/urandom | base64 -w0)
OTHER_SECRET=$(head -c 48 /dev/urandom | base64 -w0)
ES_KEY=$WT/edge/tests/keys/es256-a.key.pem
ES_PUB=$WT/edge/tests/keys/es256-a.pub.pem
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$TMP/rs256.key.pem" 2>/dev/null
openssl pkey -in "$TMP/rs256.key.pem" -pubout -out "$TMP/rs256.pub.pem"

tokens() { # $1: mode, $2: count, $3: file; prints the signing time
  local t0=$SECONDS
  case $1 in
    hs256) ROOMCAST_AUTH_SECRET=$SECRET "$LG" tokens --alg hs256 --count "$2" --rooms 'r*' --out "$3" ;;
    es256) "$LG" tokens --alg es256 --key "$ES_KEY" --kid a --count "$2" --rooms 'r*' --out "$3" ;;
    rs256) "$LG" tokens --alg rs256 --key "$TMP/rs256.key.pem" --kid r --count "$2" --rooms 'r*' --out "$3" ;;
  esac
  echo "$1: $2 tokens signed in $((SECONDS - t0)) s"
}

start_edge() { # $1: mode; the edge's log goes to $TMP/edge.log
  {
    echo "shards = $SHARDS"
    printf '[ws]\nbacklog = 16384\n[probes]\nsource = "off"\n'
    case $1 in
      es256) printf '[auth]\nkeys = [{ kid = "a", alg = "ES256", file = "%s" }]\n' "$ES_PUB" ;;
      rs256) printf '[auth]\nkeys = [{ kid = "r", alg = "RS256", file = "%s" }]\n' "$TMP/rs256.pub.pem" ;;
    esac
  } >"$TMP/edge.toml"
  local env=(env -u ROOMCAST_AUTH_SECRET)
  [[ $1 == hs256 ]] && env=(env ROOMCAST_AUTH_SECRET="$SECRET")
  "${env[@]}" "$EDGE" --config "$TMP/edge.toml" --listen "127.0.0.1:$PORT" --http "127.0.0.1:$HPORT" \
    >"$TMP/edge.log" 2>&1 &
  EPID=$!
  for _ in $(seq 100); do
    code=$(curl -s -o /dev/null -w '%{http_code}' "127.0.0.1:$HPORT/healthz" || true)
    [[ $code != 000 ]] && return 0
    kill -0 "$EPID" 2>/dev/null || break
    sleep 0.1
  done
  cat "$TMP/edge.log" >&2
  echo "edge did not start ($1)" >&2
  exit 1
}

cpu_ticks() { awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }

run_one() { # $1: run name, $2: mode, $3: rate (0: unpaced), $4: connections, $5: token file or ""
  local name=$1 mode=$2 rate=$3 n=$4 tok=$5 dir=$OUT/raw/$1
  rm -rf "$dir"
  mkdir -p "$dir"
  wait_quiet >"$dir/box-at-start.txt"
  start_edge "$mode"
  local c0 ramp=$rate
  c0=$(cpu_ticks "$EPID")
  sleep 2
  echo "$(($(cpu_ticks "$EPID") - c0))" >"$dir/edge-idle-ticks-2s.txt"
  ((rate > 0)) || ramp=1000000000
  local targs=()
  [[ -n $tok ]] && targs=(--tokens "$tok")
  local rc=0
  "$LG" run --target edge --ws "127.0.0.1:$PORT" --http "127.0.0.1:$HPORT" --connections "$n" \
    --workers "$WORKERS" --ramp "$ramp" --gift-rate 0 --chat-rate 0 --duration 1 \
    --server-pid "$EPID" "${targs[@]}" --out "$TMP/lg" --scenario "$name" \
    --note "handshake bench $mode, edge $COMMIT, shards $SHARDS, probes off, rate ${rate:-0} (0: unpaced)" \
    >"$dir/loadgen.out" 2>&1 || rc=$?
  echo "$rc" >"$dir/loadgen-exit.txt"
  curl -s "127.0.0.1:$HPORT/metrics" >"$dir/edge-metrics.txt" || true
  stop_edge
  sed -E "s/\x1b\[[0-9;]*m//g" "$TMP/edge.log" | head -n 200 >"$dir/edge.log"
  local lgdir
  lgdir=$(find "$TMP/lg" -maxdepth 1 -type d -name "*-$name" | head -n 1)
  if [[ -n $lgdir ]]; then cp "$lgdir/result.json" "$lgdir/README.md" "$dir/"; fi
  rm -rf "$TMP/lg"
  grep -E '^connected|failed:' "$dir/loadgen.out" | head -n 4 || true
}

wait_quiet | tee "$OUT/raw/env.txt"
{ echo "commit $COMMIT"; uname -sr; nproc; lscpu | grep -E 'Model name|^CPU\(s\)'; } >>"$OUT/raw/env.txt"

# Negative control: tokens signed with another secret must all be refused.
ROOMCAST_AUTH_SECRET=$OTHER_SECRET "$LG" tokens --alg hs256 --count "$NEG_CONNS" --out "$TMP/wrong.tok"
run_one negative-wrong-secret hs256 500 "$NEG_CONNS" "$TMP/wrong.tok"

for m in $MODES; do
  if [[ $m != none ]]; then tokens "$m" "$CONNS" "$TMP/$m.tok" | tee -a "$OUT/raw/signing.txt"; fi
done
for rep in $(seq "$REPS"); do
  for rate in $RATES; do
    for m in $MODES; do
      tok=
      [[ $m != none ]] && tok=$TMP/$m.tok
      echo "== $m, rate $rate, repetition $rep"
      run_one "rate$rate-$m-$rep" "$m" "$rate" "$CONNS" "$tok"
    done
  done
done
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg) (each case's wait for a quiet box: raw/*/box-at-start.txt)" |
  tee -a "$OUT/raw/env.txt"

python3 - "$OUT" "$CONNS" "$NEG_CONNS" "$COMMIT" "$MODES" "$RATES" "$REPS" <<'PY'
import json, os, re, statistics, sys
out, conns, neg_conns, commit, modes, rates, reps = sys.argv[1:]
conns, neg_conns, modes, rates, reps = int(conns), int(neg_conns), modes.split(), rates.split(), int(reps)
hz = os.sysconf("SC_CLK_TCK")

def refused(d):
    """roomcast_connections_refused_total by reason, from the edge's /metrics."""
    r = {}
    p = os.path.join(d, "edge-metrics.txt")
    for line in open(p) if os.path.exists(p) else []:
        m = re.match(r'roomcast_connections_refused_total\{[^}]*reason="([^"]+)"[^}]*\} (\S+)', line)
        if m:
            r[m.group(1)] = r.get(m.group(1), 0) + float(m.group(2))
    return r

def load(name, want):
    d = os.path.join(out, "raw", name)
    p = os.path.join(d, "result.json")
    if not os.path.exists(p):
        return {"run": name, "valid": False, "why": "no result.json"}
    r = json.load(open(p))
    s = r["server"]
    row = {
        "run": name, "connections": r["connections"], "failed": r["failed_connections"],
        "closed": r["closed_during_run"], "refused": refused(d),
        "edge_cpu_s_connecting": s["cpu_s_connecting"], "edge_cpu_us_per_handshake": s["cpu_us_per_connection"],
        "edge_idle_cpu_s_per_s": int(open(os.path.join(d, "edge-idle-ticks-2s.txt")).read()) / hz / 2,
        "connect_s": r["connect_s"], "connects_per_s": r["connect_per_s"],
        "handshake_ms": r["handshake_ms"], "loadgen_exit": int(open(os.path.join(d, "loadgen-exit.txt")).read()),
        "box_at_start": open(os.path.join(d, "box-at-start.txt")).read().strip().replace("\n", "; "),
    }
    row["valid"] = (row["connections"] == want and row["failed"] == 0 and row["closed"] == 0
                    and sum(row["refused"].values()) == 0 and row["loadgen_exit"] == 0
                    and row["edge_cpu_us_per_handshake"] is not None)
    return row

neg = load("negative-wrong-secret", 0)
neg["control_ok"] = neg.get("connections") == 0 and neg.get("failed") == neg_conns \
    and neg.get("refused", {}).get("token_invalid") == neg_conns
runs = {rate: {m: [load(f"rate{rate}-{m}-{k}", conns) for k in range(1, reps + 1)] for m in modes} for rate in rates}
mean_us = {rate: {m: statistics.mean(r["edge_cpu_us_per_handshake"] for r in rr) if all(r["valid"] for r in rr) else None
                  for m, rr in ms.items()} for rate, ms in runs.items()}
json.dump({"commit": commit, "conns": conns, "reps": reps, "negative_control": neg, "mean_us_per_handshake": mean_us,
           "runs": runs}, open(os.path.join(out, "summary.json"), "w"), indent=2)

lines = [f"Negative control (HS256 edge, {neg_conns} tokens signed with another secret): "
         f"upgraded {neg.get('connections')}, failed {neg.get('failed')}, edge refused "
         f"{neg.get('refused')}: {'OK' if neg['control_ok'] else 'NOT OK'}", ""]
for rate in rates:
    label = "unpaced (each worker one handshake at a time)" if rate == "0" else f"paced at {rate} connects/s"
    base = mean_us[rate].get("none")
    lines += [f"Connect rate: {label}; {conns} connections per run, {reps} runs per mode (interleaved)", "",
              "| mode | µs edge CPU / handshake, each run | mean | vs none | connects/s, each run | handshake p50 / p99 ms, each run | all upgraded |",
              "|---|---|---|---|---|---|---|"]
    for m in modes:
        rr = runs[rate][m]
        mu = mean_us[rate][m]
        if mu is None:
            lines.append(f"| {m} | " + ", ".join(str(r.get("edge_cpu_us_per_handshake")) for r in rr) + " | - | - | - | - | NO |")
            continue
        lines.append(
            f"| {m} | " + ", ".join(f"{r['edge_cpu_us_per_handshake']:.1f}" for r in rr)
            + f" | {mu:.1f} | " + (f"{mu / base:.2f}x" if base else "-") + " | "
            + ", ".join(f"{r['connects_per_s']:.0f}" for r in rr) + " | "
            + ", ".join(f"{r['handshake_ms']['p50']:.2f} / {r['handshake_ms']['p99']:.2f}" for r in rr)
            + " | yes |")
    lines.append("")
noisy = [r["run"] for ms in runs.values() for rr in ms.values() for r in rr
         if "box_at_start" in r and not r["box_at_start"].endswith("others busy: 0 processes")]
lines += ["Runs that started with someone else's cargo, rustc, test binary or debug edge running: "
          + (", ".join(noisy) if noisy else "none"), ""]
open(os.path.join(out, "summary.md"), "w").write("\n".join(lines))
print("\n".join(lines))
ok = neg["control_ok"] and all(r.get("valid") for ms in runs.values() for rr in ms.values() for r in rr)
sys.exit(0 if ok else 1)
PY
