#!/usr/bin/env bash
# Transfers: coffer (`coffer load --workload transfer | transfer-hot`) next to PostgreSQL
# (run_transfer.sh: e_transfer.sql, f_transfer_hot.sql) in one run window, rep by rep
# interleaved: in each rep coffer runs every configuration, then PostgreSQL does (coffer's
# server is stopped while pgbench runs; PostgreSQL idles while coffer runs).
#
# Usage: bench/pg/compare_transfer.sh [run|summary]   (summary: only the table, from $OUT)
# Env: REPS (3) DURATION (10) CONNS ("16 64") ACCOUNTS (100000, as in the PG schema)
#      OUT (target/bench-transfer) PORT (18091, coffer's)
# Writes $OUT/coffer.csv, $OUT/pgres/pg_results.csv and $OUT/summary.md (medians, ratios).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
OUT=${OUT:-$ROOT/target/bench-transfer}
REPS=${REPS:-3}; DURATION=${DURATION:-10}; CONNS=${CONNS:-"16 64"}; ACCOUNTS=${ACCOUNTS:-100000}
export BASE=$OUT RES=$OUT/pgres

summary() {
  python3 - "$OUT" <<'PY' | tee "$OUT/summary.md"
import csv, sys, statistics as st
from collections import defaultdict
out = sys.argv[1]
co, pg = defaultdict(list), defaultdict(list)
for r in csv.DictReader(open(f"{out}/coffer.csv")):
    co[(r["workload"], int(r["connections"]))].append(r)
names = {"e_transfer": "transfer", "f_transfer_hot": "transfer-hot"}
for r in csv.DictReader(open(f"{out}/pgres/pg_results.csv")):
    pg[(names[r["label"]], int(r["clients"]))].append(r)
med = lambda rs, k: st.median(float(x[k]) for x in rs)
print("| workload | conns | coffer transfers/s (median) | min–max | coffer p50 / p99 / p99.9 ms "
      "| PG TPS (median) | min–max | PG p50 / p99 / p99.9 ms | coffer / PG | per-rep ratios |")
print("|---|---|---|---|---|---|---|---|---|---|")
for key in sorted(co):
    c, p = co[key], pg.get(key, [])
    ct = [float(x["flows_per_sec"]) for x in c]
    line = (f"| {key[0]} | {key[1]} | {st.median(ct):,.0f} | {min(ct):,.0f}–{max(ct):,.0f} | "
            f"{med(c,'p50_ms'):.2f} / {med(c,'p99_ms'):.2f} / {med(c,'p999_ms'):.2f} | ")
    if p:
        pt = [float(x["tps"]) for x in p]
        by_rep = {x["rep"]: float(x["tps"]) for x in p}
        paired = ", ".join(f'{float(x["flows_per_sec"]) / by_rep[x["rep"]]:.1f}x'
                           for x in c if x["rep"] in by_rep)
        line += (f"{st.median(pt):,.0f} | {min(pt):,.0f}–{max(pt):,.0f} | "
                 f"{med(p,'lat_p50_ms'):.2f} / {med(p,'lat_p99_ms'):.2f} / {med(p,'lat_p999_ms'):.2f} | "
                 f"{st.median(ct) / st.median(pt):.1f}x | {paired} |")
    else:
        line += "- | - | - | - | - |"
    print(line)
PY
}
if [ "${1:-run}" = summary ]; then summary; exit 0; fi

mkdir -p "$OUT"
command -v pgbench >/dev/null || {
  apt-get update -qq && apt-get install -y -qq postgresql postgresql-contrib >/dev/null; }
(cd "$ROOT" && cargo build --release -q)
BIN=$ROOT/target/release/coffer
PORT=${PORT:-18091}; DATA=$OUT/coffer-data
SPID=""
stop_coffer() {
  if [ -n "$SPID" ]; then kill -TERM "$SPID" 2>/dev/null || true; wait "$SPID" 2>/dev/null || true; SPID=""; fi
}
trap 'stop_coffer; "$HERE/run_transfer.sh" stop >/dev/null 2>&1 || true' EXIT
start_coffer() {
  "$BIN" serve --data-dir "$DATA" --listen 127.0.0.1:$PORT 2>>"$OUT/coffer.log" &
  SPID=$!
  for _ in $(seq 1200); do curl -sf http://127.0.0.1:$PORT/readyz >/dev/null && return; sleep 0.1; done
  echo "coffer did not become ready"; exit 1
}
coffer_run() { # rep workload connections
  local json
  json=$("$BIN" load --target 127.0.0.1:$PORT --workload "$2" --accounts "$ACCOUNTS" \
         --connections "$3" --duration "${DURATION}s" --json) || echo "coffer load exited $?"
  python3 - "$1" "$2" "$3" "$json" >> "$OUT/coffer.csv" <<'PY'
import json, sys
rep, w, c, j = sys.argv[1:]
r = json.loads(j); l = r["latency_ms"]
errors = ";".join(f"{k}={v}" for k, v in sorted(r["errors"].items()))
print(f'{rep},{w},{c},{r["flows_per_sec"]:.0f},{r["requests_per_sec"]:.0f},{l["p50"]:.3f},{l["p90"]:.3f},'
      f'{l["p99"]:.3f},{l["p999"]:.3f},{l["max"]:.3f},{errors},{r["mismatched_accounts"]}')
PY
  tail -1 "$OUT/coffer.csv"
}
echo "rep,workload,connections,flows_per_sec,requests_per_sec,p50_ms,p90_ms,p99_ms,p999_ms,max_ms,errors,mismatched" > "$OUT/coffer.csv"
rm -f "$RES/pg_results.csv"
rm -rf "$DATA"
"$HERE/run_transfer.sh" setup >/dev/null
for rep in $(seq 1 "$REPS"); do
  echo "=== rep $rep $(date -Is) load $(cut -d' ' -f1-3 /proc/loadavg)"
  start_coffer
  for c in $CONNS; do
    for w in transfer transfer-hot; do coffer_run "$rep" "$w" "$c"; done
  done
  stop_coffer
  REPS=1 REP_FIRST=$rep DURATION=$DURATION CLIENTS="$CONNS" "$HERE/run_transfer.sh" bench
done
echo "load at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
summary
