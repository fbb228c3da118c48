#!/usr/bin/env bash
# coffer next to PostgreSQL (pgbench, the shared anchor scripts) and the axum no-op ceiling
# (wrk), measured in one run window, rep by rep interleaved so every pair shares the window.
#
# Usage: scripts/bench-compare.sh            Env: REPS (3) DURATION (20) CONNS ("16 64")
#        ACCOUNTS (100000) SHARED (../shared/anchors/postgres) OUT (target/bench-compare)
# Needs Debian's postgresql, postgresql-contrib and wrk (installed when missing).
# Writes $OUT/coffer.csv, $OUT/pgres/pg_results.csv, $OUT/httpres/http_results.csv,
# $OUT/wrk.csv (coffer under wrk), $OUT/summary.md and $OUT/chart.svg (scripts/bench_chart.py).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
SHARED=$(cd "${SHARED:-$ROOT/../shared/anchors/postgres}" && pwd)
OUT=${OUT:-$ROOT/target/bench-compare}
REPS=${REPS:-3}; DURATION=${DURATION:-20}; CONNS=${CONNS:-"16 64"}; ACCOUNTS=${ACCOUNTS:-100000}
mkdir -p "$OUT"
command -v pgbench >/dev/null && command -v wrk >/dev/null || {
  apt-get update -qq && apt-get install -y -qq postgresql postgresql-contrib wrk >/dev/null; }
cargo build --release -q
BIN=$ROOT/target/release/coffer
PORT=18090; DATA=$OUT/coffer-data
SPID=""
stop_coffer() { if [ -n "$SPID" ]; then kill -TERM "$SPID" 2>/dev/null || true; wait "$SPID" 2>/dev/null || true; SPID=""; fi; }
trap 'stop_coffer; BASE=$OUT RES=$OUT/pgres "$SHARED/run_pg.sh" stop >/dev/null 2>&1 || true' EXIT
start_coffer() {
  "$BIN" serve --data-dir "$DATA" --listen 127.0.0.1:$PORT 2>>"$OUT/coffer.log" &
  SPID=$!
  for _ in $(seq 1200); do curl -sf http://127.0.0.1:$PORT/readyz >/dev/null && return; sleep 0.1; done
  echo "coffer did not become ready"; exit 1
}
[ -f "$OUT/coffer.csv" ] || echo "rep,workload,connections,batch,flows_per_sec,requests_per_sec,p50_ms,p90_ms,p99_ms,p999_ms,max_ms,errors,mismatched" > "$OUT/coffer.csv"
coffer_run() { # rep workload connections batch
  local json
  json=$("$BIN" load --target 127.0.0.1:$PORT --workload "$2" --accounts "$ACCOUNTS" --connections "$3" \
         --batch "$4" --duration "${DURATION}s" --json)
  python3 - "$1" "$2" "$3" "$4" "$json" >> "$OUT/coffer.csv" <<'PY'
import json, sys
rep, w, c, b, j = sys.argv[1:]
r = json.loads(j); l = r["latency_ms"]
print(f'{rep},{w},{c},{b},{r["flows_per_sec"]:.0f},{r["requests_per_sec"]:.0f},{l["p50"]:.3f},{l["p90"]:.3f},'
      f'{l["p99"]:.3f},{l["p999"]:.3f},{l["max"]:.3f},{sum(r["errors"].values())},{r["mismatched_accounts"]}')
PY
  tail -1 "$OUT/coffer.csv"
}
rm -rf "$DATA"
BASE=$OUT RES=$OUT/pgres "$SHARED/run_pg.sh" setup >/dev/null
for rep in $(seq 1 "$REPS"); do
  echo "=== rep $rep $(date -Is)"
  start_coffer
  for c in $CONNS; do
    for w in uniform hot hold-capture; do coffer_run "$rep" "$w" "$c" 1; done
  done
  coffer_run "$rep" uniform 16 1000
  # The same server under wrk, the client the axum ceiling is measured with.
  [ -f "$OUT/wrk.csv" ] || echo "rep,target,req_per_sec,p99" > "$OUT/wrk.csv"
  for target in uniform hot; do
    hot_env=""; [ $target = hot ] && hot_env="HOT=1"
    r=$(env $hot_env ACCOUNTS="$ACCOUNTS" \
        wrk -t2 -c64 -d"${DURATION}s" -s "$ROOT/scripts/wrk-debit.lua" --latency http://127.0.0.1:$PORT)
    echo "$rep,coffer_$target,$(echo "$r" | awk '/Requests\/sec/{print $2}'),$(echo "$r" | awk '$1=="99%"{print $2}')" | tee -a "$OUT/wrk.csv"
  done
  stop_coffer
  BASE=$OUT RES=$OUT/pgres REPS=1 DURATION=$DURATION CLIENTS="$CONNS" "$SHARED/run_pg.sh" bench | grep -E "^(a_uniform|b_hot|c_hold)" || true
  BASE=$OUT REPS=1 DURATION=$DURATION CONNS=64 "$SHARED/run_http.sh" >/dev/null 2>&1 || echo "axum ceiling run failed"
done
python3 "$ROOT/scripts/bench_chart.py" "$OUT" | tee "$OUT/summary.md"
echo "chart: $OUT/chart.svg"
