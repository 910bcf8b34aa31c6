# shellcheck shell=bash
# Shared by the benchmark scripts that measure one commit on a quiet box. Source it after setting
# ROOT (the repository), WT (the worktree for the snapshot), KEEP_WT, WAIT_QUIET (minutes) and
# LOAD_MAX (the 1-minute load average to wait below; empty: do not look at it).

# Exits when one of the ports is already taken (another run, or anything else).
ports_free() {
  local p
  for p in "$@"; do
    if ss -Htln "sport = :$p" | grep -q .; then
      echo "port $p is in use; set PORT" >&2
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
