#!/usr/bin/env bash
# Installs the benchmark's peer, nginx with the Nchan module (scripts/bench-peers.sh), and
# nothing else. An nginx this run installs is stopped and disabled (Debian starts it; the bench
# starts its own on a free port with its own config); one that was there before is left alone.
set -euo pipefail
missing=()
for p in nginx libnginx-mod-nchan; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup-peers: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
  if [[ " ${missing[*]} " == *" nginx "* ]]; then
    systemctl disable --now nginx >/dev/null 2>&1 || true
  fi
fi
