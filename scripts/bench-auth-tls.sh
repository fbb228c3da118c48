#!/usr/bin/env bash
# The throughput cost of authentication and TLS: `coffer load` (uniform, 64 connections,
# 15 s by default) against a fresh server in three setups, plain / auth / auth+TLS,
# interleaved ROUNDS times. Prints one line per run and the medians.
#
#   cargo build --release && scripts/bench-auth-tls.sh [ROUNDS] [DURATION]
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
DURATION=${2:-15s}
BIN=target/release/coffer
WORK=$(mktemp -d)
SERVER_PID=
trap 'if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; fi; rm -rf "$WORK"' EXIT
TOKEN=bench-token-0123456789
# A self-signed certificate for 127.0.0.1 (openssl only makes the file; coffer uses rustls).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
  -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 -addext basicConstraints=critical,CA:FALSE \
  -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null
PORT=18480

run() { # setup round
  local setup=$1 round=$2 serve=() load=()
  case $setup in
    plain) ;;
    auth) serve=(--auth-tokens "$TOKEN"); load=(--token "$TOKEN") ;;
    auth+tls) serve=(--auth-tokens "$TOKEN" --tls-cert "$WORK/cert.pem" --tls-key "$WORK/key.pem")
              load=(--token "$TOKEN" --tls-ca "$WORK/cert.pem") ;;
  esac
  rm -rf "$WORK/data"
  "$BIN" serve --data-dir "$WORK/data" --listen "127.0.0.1:$PORT" "${serve[@]}" 2>"$WORK/server.log" &
  SERVER_PID=$!
  for _ in $(seq 100); do
    curl -skf "http://127.0.0.1:$PORT/healthz" >/dev/null 2>&1 && break
    curl -skf "https://127.0.0.1:$PORT/healthz" >/dev/null 2>&1 && break
    sleep 0.1
  done
  local rps
  rps=$("$BIN" load --target "127.0.0.1:$PORT" --workload uniform --connections 64 \
        --duration "$DURATION" --quiet --json "${load[@]}" | jq -r '.requests_per_sec | floor')
  kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=
  echo "$setup round $round: $rps req/s"
  echo "$setup $rps" >>"$WORK/results"
}

for round in $(seq "$ROUNDS"); do
  for setup in plain auth auth+tls; do run "$setup" "$round"; done
done
echo "medians:"
for setup in plain auth auth+tls; do
  grep "^$setup " "$WORK/results" | cut -d' ' -f2 | sort -n |
    awk -v s="$setup" '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; print s, m}'
done
