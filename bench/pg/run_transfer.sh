#!/usr/bin/env bash
# PostgreSQL 15 transfer baseline: (e) random pairs and (f) one hot destination, each
# transfer ONE transaction (e_transfer.sql, f_transfer_hot.sql). The cluster is the shared
# anchor's (../../../shared/anchors/postgres/run_pg.sh: same initdb, settings, port 5433 and
# schema.sql), plus schema_transfer.sql. Each pgbench run is run_pg.sh's: `pgbench -n -M
# prepared -c C -j 2 -T DURATION -P 5 -r -l` after `VACUUM ...; CHECKPOINT`, latency
# percentiles from the per-transaction logs.
#
# Usage: bench/pg/run_transfer.sh [setup|bench|summary|stop|all]   (default all)
# Env: REPS (3)  DURATION (10)  CLIENTS ("16 64", the connection counts of the coffer run)
#      BASE (target/bench-transfer: cluster in $BASE/pg)  RES ($BASE/pgres)
#      SHARED (../shared/anchors/postgres next to the project)
# Writes $RES/pg_results.csv (rep,label,clients,tps,lat_avg_ms,lat_p50_ms,lat_p99_ms,
# lat_p999_ms,failed) and pgbench's output per run in $RES/out/.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
SHARED=$(cd "${SHARED:-$ROOT/../shared/anchors/postgres}" && pwd)
BASE=${BASE:-$ROOT/target/bench-transfer}
RES=${RES:-$BASE/pgres}
REPS=${REPS:-3}
DURATION=${DURATION:-10}
CLIENTS=${CLIENTS:-"16 64"}
PGBIN=/usr/lib/postgresql/15/bin
DATA=$BASE/pg/data
export PGHOST=127.0.0.1 PGPORT=5433 PGUSER=postgres PGDATABASE=postgres
PSQL="psql -X -q -v ON_ERROR_STOP=1"
asuser() { runuser -u postgres -- "$@"; }
export BASE

setup() {
  mkdir -p "$BASE"
  if [ -f "$DATA/PG_VERSION" ]; then
    # A cluster of an earlier run: drop the transfer tables first, their foreign keys would
    # stop schema.sql from dropping `account`. run_pg.sh setup starts the cluster itself.
    asuser "$PGBIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1 ||
      asuser "$PGBIN/pg_ctl" -D "$DATA" -l "$BASE/pg/server.log" -w start >/dev/null
    $PSQL -c "DROP TABLE IF EXISTS transfer_idem, transfer"
    asuser "$PGBIN/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null
  fi
  "$SHARED/run_pg.sh" setup
  $PSQL -f "$HERE/schema_transfer.sql"
}

# one pgbench run: label script clients rep
one() {
  local label=$1 script=$2 c=$3 rep=$4
  local tag="$label.c$c.r$rep"
  $PSQL -c "VACUUM account" -c "VACUUM transfer" -c "VACUUM transfer_idem" -c "CHECKPOINT"
  rm -f "$RES/logs/$tag".*
  pgbench -n -M prepared -c "$c" -j 2 -T "$DURATION" -P 5 -r \
      -l --log-prefix="$RES/logs/$tag" -f "$HERE/$script" > "$RES/out/$tag.txt" 2>&1 ||
    { echo "pgbench failed: $tag"; cat "$RES/out/$tag.txt"; }
  python3 - "$RES" "$tag" "$label" "$c" "$rep" <<'PY'
import sys, glob, re
res, tag, label, c, rep = sys.argv[1:]
out = open(f"{res}/out/{tag}.txt").read()
tps = re.search(r"tps = ([\d.]+) \(without initial", out)
avg = re.search(r"latency average = ([\d.]+) ms", out)
if not tps or not avg:
    sys.exit(f"{tag}: no tps in pgbench output")
tps, avg = float(tps.group(1)), float(avg.group(1))
failed = re.search(r"number of failed transactions: (\d+)", out)
failed = int(failed.group(1)) if failed else 0
aborted = re.search(r"(\d+) of \d+ clients? aborted|client \d+ aborted", out)
lat = []
for f in glob.glob(f"{res}/logs/{tag}.*"):
    for line in open(f):
        p = line.split()
        if len(p) >= 3 and p[2].isdigit():
            lat.append(int(p[2]))
lat.sort()
q = lambda x: lat[min(len(lat) - 1, int(x * len(lat)))] / 1000.0 if lat else float("nan")
with open(f"{res}/pg_results.csv", "a") as fh:
    fh.write(f"{rep},{label},{c},{tps:.1f},{avg:.3f},{q(0.50):.3f},{q(0.99):.3f},{q(0.999):.3f},{failed}\n")
print(f"{tag}: tps={tps:.0f} avg={avg:.2f}ms p50={q(0.5):.2f}ms p99={q(0.99):.2f}ms "
      f"p99.9={q(0.999):.2f}ms failed={failed}" + (" CLIENTS ABORTED" if aborted else ""))
PY
  rm -f "$RES/logs/$tag".*
}

bench() {
  mkdir -p "$RES/out" "$RES/logs"
  [ -f "$RES/pg_results.csv" ] ||
    echo "rep,label,clients,tps,lat_avg_ms,lat_p50_ms,lat_p99_ms,lat_p999_ms,failed" > "$RES/pg_results.csv"
  for rep in $(seq "${REP_FIRST:-1}" "$((${REP_FIRST:-1} + REPS - 1))"); do
    echo "=== pg rep $rep $(date -Is)"
    for c in $CLIENTS; do
      one e_transfer     e_transfer.sql     "$c" "$rep"
      one f_transfer_hot f_transfer_hot.sql "$c" "$rep"
    done
  done
  # Money is conserved by every committed transfer: the sum of balances never changes.
  $PSQL -A -t -c "SELECT 'sum of balances: ' || sum(balance) || ' (expected ' || 100000 * 1000000000::bigint || '), transfers: ' || (SELECT count(*) FROM transfer) FROM account"
}

summary() {
  python3 - "$RES/pg_results.csv" <<'PY'
import csv, sys, statistics as st
from collections import defaultdict
g = defaultdict(list)
for r in csv.DictReader(open(sys.argv[1])):
    g[(r["label"], int(r["clients"]))].append(r)
print("| scenario | clients | runs | TPS (median) | TPS min–max | avg lat ms | p50 ms | p99 ms | p99.9 ms | failed |")
print("|---|---|---|---|---|---|---|---|---|---|")
for (l, c), rs in sorted(g.items()):
    m = lambda k: st.median(float(x[k]) for x in rs)
    t = [float(x["tps"]) for x in rs]
    print(f"| {l} | {c} | {len(rs)} | {m('tps'):.0f} | {min(t):.0f}–{max(t):.0f} | {m('lat_avg_ms'):.2f} | "
          f"{m('lat_p50_ms'):.2f} | {m('lat_p99_ms'):.2f} | {m('lat_p999_ms'):.2f} | {sum(int(x['failed']) for x in rs)} |")
PY
}

stop() { "$SHARED/run_pg.sh" stop; }

case "${1:-all}" in
  setup) setup ;; bench) bench ;; summary) summary ;; stop) stop ;;
  all) setup; trap stop EXIT; bench; summary ;;
  *) echo "usage: $0 [setup|bench|summary|stop|all]"; exit 2 ;;
esac
