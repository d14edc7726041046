#!/usr/bin/env bash
# One round of issue 10's burst measurement: a fresh `hearth up` from binary $1 (label $2),
# then `hearth bench api` with 1 client, 64 clients on a function the round creates (its
# sandboxes start during the burst), 64 again (warm), 1 client; then the number of runsc
# containers left (the functions' sandboxes and the ready pool). Further arguments go to
# `hearth up`. Example (release build, agent and images as in docs/perf.md):
#   docs/bench/burst-round.sh target/release/hearth new
set -u
BIN=$1; LABEL=$2; shift 2
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
AGENT=${AGENT:-$ROOT/target/x86_64-unknown-linux-gnu/release/hearth-agent}
IMAGES=${IMAGES:-$ROOT/target/hearth-images}
D=/tmp/burst-round-$LABEL
stop() {
  pkill -TERM -f "up --data-dir /tmp/burst-round-"
  for _ in $(seq 1 120); do pgrep -f "up --data-dir /tmp/burst-round-" >/dev/null || return 0; sleep 1; done
  echo "hearth up did not stop" >&2
}
stop; rm -rf "$D"
(HEARTH_LOG=${HEARTH_LOG:-warn} "$BIN" up --data-dir "$D" --listen 127.0.0.1:0 --image-cache "$IMAGES" \
  --agent "$AGENT" --no-build-images "$@" > "$D.log" 2>&1 &)
for _ in $(seq 1 60); do [ -f "$D/client.env" ] && break; sleep 1; done; sleep 5
b() {
  "$BIN" bench api --data-dir "$D" --function "$1" --clients "$2" --requests "$3" 2>&1 | tail -2 | tr '\n' ' ' \
    | sed -E 's/hearth bench api: //; s/ ok, 0 failed, 0 throttled//'; echo
}
echo "$LABEL 1 client:      $(b one 1 1000)"
echo "$LABEL 64 new fn:     $(b burst 64 2000)"
echo "$LABEL 64 again:      $(b burst 64 2000)"
echo "$LABEL 1 client:      $(b one 1 1000)"
echo "$LABEL sandboxes: $(runsc --root "$D/runsc" list -quiet | wc -l)"
stop
