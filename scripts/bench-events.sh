#!/usr/bin/env bash
# The event stream under load: `coffer load` (uniform, 64 connections, 15 s by default)
# against a fresh server with 0, 1 and 10 event consumers long-polling `GET /v1/events`
# (limit 1000) from the end of the log, interleaved ROUNDS times. Prints one line per run
# (write req/s, events/s delivered to one consumer) and the medians.
#
#   cargo build --release && scripts/bench-events.sh [ROUNDS] [DURATION]
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
DURATION=${2:-15s}
BIN=target/release/coffer
WORK=$(mktemp -d)
SERVER_PID=
trap 'if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; fi; rm -rf "$WORK"' EXIT
PORT=18490

run() { # consumers round
  local consumers=$1 round=$2
  rm -rf "$WORK/data"
  "$BIN" serve --data-dir "$WORK/data" --listen "127.0.0.1:$PORT" 2>"$WORK/server.log" &
  SERVER_PID=$!
  for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && break
    sleep 0.1
  done
  local out rps eps
  out=$("$BIN" load --target "127.0.0.1:$PORT" --workload uniform --connections 64 \
        --duration "$DURATION" --quiet --json --consumers "$consumers")
  rps=$(jq -r '.requests_per_sec | floor' <<<"$out")
  eps=$(jq -r '.events_per_sec_per_consumer | floor' <<<"$out")
  kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=
  echo "consumers $consumers round $round: $rps req/s written, $eps events/s per consumer"
  echo "$consumers $rps $eps" >>"$WORK/results"
}

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2}'; }

for round in $(seq "$ROUNDS"); do
  for consumers in 0 1 10; do run "$consumers" "$round"; done
done
echo "medians (consumers, write req/s, events/s per consumer):"
for consumers in 0 1 10; do
  w=$(grep "^$consumers " "$WORK/results" | cut -d' ' -f2 | median)
  e=$(grep "^$consumers " "$WORK/results" | cut -d' ' -f3 | median)
  echo "$consumers $w $e"
done
