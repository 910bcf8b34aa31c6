# shellcheck shell=bash
# Shared by the benchmark scripts that measure one commit on a quiet box. Source it after setting
# ROOT (the repository), WT (the worktree for the snapshot), KEEP_WT, WAIT_QUIET (minutes) and
# LOAD_MAX (the 1-minute load average to wait below; empty: do not look at it).

# Exits when one of the ports is already taken (another run, or anything else).
ports_free() {
  local p
  for p in "$@"; do
    if ss -Htln "sport = :$p" | grep -q .; then
      echo "port $p is in use: another benchmark may be running (ss -ltnp 'sport = :$p' says what listens)" >&2
      exit 1
    fi
  done
}

# Builds edge and loadgen from a git worktree snapshot of HEAD ($WT: made if missing, else moved
# to HEAD) into $CARGO_TARGET_DIR, so the figures belong to one commit. Sets COMMIT, EDGE, LG and
# MADE_WT.
snapshot_build() {
  MADE_WT=0
  if [[ -n ${EDGE_BIN:-} && -n ${LG_BIN:-} ]]; then
    COMMIT=$(git -C "$ROOT" rev-parse HEAD)
    git -C "$ROOT" diff --quiet HEAD -- edge loadgen 2>/dev/null || COMMIT="$COMMIT+uncommitted"
    EDGE=$EDGE_BIN
    LG=$LG_BIN
    echo "prebuilt edge and loadgen ($EDGE_BIN, $LG_BIN) at $COMMIT"
    return 0
  fi
  if [[ ! -e $WT ]]; then
    git -C "$ROOT" worktree add --detach "$WT" HEAD
    MADE_WT=1
  else
    git -C "$WT" checkout -q --detach "$(git -C "$ROOT" rev-parse HEAD)"
  fi
  COMMIT=$(git -C "$WT" rev-parse HEAD)
  echo "building edge and loadgen at $COMMIT ($WT) into $CARGO_TARGET_DIR"
  (cd "$WT" && cargo build -q --release -p edge -p loadgen)
  EDGE=$CARGO_TARGET_DIR/release/edge
  LG=$CARGO_TARGET_DIR/release/loadgen
}

# For the caller's cleanup: removes the worktree this run made (unless KEEP_WT=1).
snapshot_remove() {
  if [[ ${MADE_WT:-0} == 1 && ${KEEP_WT:-0} != 1 ]]; then git -C "$ROOT" worktree remove --force "$WT" || true; fi
}

# What else is compiling or testing (their edges included).
busy() { pgrep -f 'cargo (test|bench|build|clippy)|rustc|/deps/|target/debug/edge' || true; }

# Waits for a quiet box (nothing in `busy`, the load average under LOAD_MAX), at most
# WAIT_QUIET minutes, then runs anyway; prints one line saying which, for the results.
wait_quiet() {
  local waited=0
  loaded() { [[ -n ${LOAD_MAX:-} ]] && awk -v l="$(cut -d' ' -f1 /proc/loadavg)" -v m="$LOAD_MAX" 'BEGIN { exit !(l >= m) }'; }
  while [[ -n $(busy) ]] || loaded; do
    if ((waited >= WAIT_QUIET * 60)); then
      echo "NOT QUIET after ${waited}s (ran anyway); load average $(cut -d' ' -f1-3 /proc/loadavg); others busy: $(busy | wc -l) processes"
      return 0
    fi
    sleep 5
    waited=$((waited + 5))
  done
  echo "quiet after ${waited}s; load average $(cut -d' ' -f1-3 /proc/loadavg); others busy: 0 processes"
}

# Waits for the edge started as PID to answer on HTTP (host:port), at most SECS (20) s; exits with its
# log's tail (LOG) when it died or never answered, so a run never measures somebody else's edge.
edge_up() {
  local pid=$1 http=$2 log=$3 secs=${4:-20}
  local deadline=$((SECONDS + secs))
  # A deadline in seconds, not a count of tries: on a loaded box each curl takes its own time.
  while ((SECONDS < deadline)); do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "the edge exited at start:" >&2
      tail -5 "$log" >&2
      exit 1
    fi
    curl -sf -m 2 -o /dev/null "$http/healthz" && return 0
    sleep 0.1
  done
  echo "the edge did not answer on $http within $secs s:" >&2
  tail -5 "$log" >&2
  exit 1
}

# A test CA (DIR/ca.pem) and an ECDSA P-256 certificate for 127.0.0.1 signed by it
# (DIR/cert.pem, DIR/key.pem), valid one day: what the TLS benchmarks serve and trust.
test_pki() {
  local dir=$1 ec=(-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes)
  openssl req -x509 "${ec[@]}" -keyout "$dir/ca.key" -out "$dir/ca.pem" -days 1 -subj "/CN=roomcast bench CA" 2>/dev/null
  openssl req "${ec[@]}" -keyout "$dir/key.pem" -out "$dir/leaf.csr" -subj "/CN=127.0.0.1" 2>/dev/null
  echo "subjectAltName=IP:127.0.0.1" >"$dir/ext.cnf"
  openssl x509 -req -in "$dir/leaf.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" -CAcreateserial \
    -out "$dir/cert.pem" -days 1 -extfile "$dir/ext.cnf" 2>/dev/null
}

# Exits naming the first of the named variables that does not hold a whole number.
whole_numbers() {
  local v
  for v in "$@"; do
    [[ ${!v} =~ ^[0-9]+$ ]] || { echo "$v must be a whole number, not '${!v}'" >&2; exit 1; }
  done
}

# One case of the one-edge comparisons (bench-sse, bench-deflate, bench-tls, bench-transport):
# an edge (--no-store, 2 shards, ports 18741-18742, plus the caller's EDGE_EXTRA array) and
# CONNS members for SECS s at GIFT gifts and CHAT chat messages a second; the rest of the
# arguments go to loadgen. Usage: one_edge_case SCENARIO NOTE [LOADGEN ARGS...]. Results in
# bench-results/DATE-SCENARIO/, with the edge's /metrics just before it stopped
# (edge-metrics.txt); FAILED=1 when the generator fails.
one_edge_case() {
  local scenario=$1 note=$2 tmp epid
  shift 2
  tmp=$(mktemp -d)
  "$EDGE_BIN" --no-store --shards 2 --listen 127.0.0.1:18741 --http 127.0.0.1:18742 \
    ${EDGE_EXTRA[@]+"${EDGE_EXTRA[@]}"} >"$tmp/edge.log" 2>&1 &
  epid=$!
  edge_up "$epid" 127.0.0.1:18742 "$tmp/edge.log"
  "$LG_BIN" run --target edge --ws 127.0.0.1:18741 --http 127.0.0.1:18742 --connections "$CONNS" \
    --duration "$SECS" --gift-rate "$GIFT" --chat-rate "$CHAT" --server-pid "$epid" \
    --out "$ROOT/bench-results" --scenario "$scenario" --replace "$@" \
    --note "one edge --no-store --shards 2, defaults (window 100 ms, adaptive, visible chat 50/s); $note" \
    >"$tmp/lg.out" 2>&1 || { echo "$scenario failed:"; tail -5 "$tmp/lg.out"; FAILED=1; }
  curl -sf http://127.0.0.1:18742/metrics >"$tmp/metrics.txt" || true
  if [[ -d $ROOT/bench-results/$DATE-$scenario ]]; then
    cp "$tmp/metrics.txt" "$ROOT/bench-results/$DATE-$scenario/edge-metrics.txt"
  fi
  kill -INT "$epid" 2>/dev/null || true
  wait "$epid" 2>/dev/null || true
  rm -rf "$tmp"
  sleep 3
}
