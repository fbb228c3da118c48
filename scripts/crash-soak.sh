#!/usr/bin/env bash
# Crash soak of the release binary: CYCLES times (default 50), 8 concurrent clients drive
# credits, debits, holds, captures, releases and transfers (random pairs, and to a whale
# account that refuses them, so they fail and refund the source) while 8 more transfer to one
# hot account; the server is SIGKILLed at a random moment and restarted on the same data
# directory. After every kill `coffer wal verify` counts the transfers left half done, and the
# recovery must finish exactly those before /readyz is 200. After every restart every
# acknowledged operation is verified (idempotency-key lookup with its original answer,
# balances, holds, transaction seq), every transfer too (GET /v1/transfers/{id}, one
# transfer_out and one transfer_in naming it in the two histories), money is conserved (sum of
# balances = credits - debits - captures) with coffer_transfers_in_flight 0, and every request
# left unanswered by the kill is resolved by a key lookup (on `from` for a transfer) and
# retried.
#
# The harness is the ignored test `soak` in tests/crash.rs, the crash test's own kill cycle;
# this script builds, runs it against target/release/coffer and prints its summary.
#
# Usage: scripts/crash-soak.sh [CYCLES]
# Env:   COFFER_CRASH_SEED (replay a run's random choices), OUT (target/crash-soak),
#        COFFER_BIN (the binary to soak; default target/release/coffer, built here)
# Writes $OUT/summary.json. Exits 0 only when every cycle was verified and nothing was lost;
# a failed run keeps its data directory and server logs (the summary names it).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
CYCLES=${1:-50}
if ! [[ $CYCLES =~ ^[0-9]+$ ]] || ((10#$CYCLES < 1 || 10#$CYCLES > 100000)); then
  echo "usage: $0 [CYCLES]   (CYCLES: 1..=100000, default 50)" >&2
  exit 2
fi
CYCLES=$((10#$CYCLES))
OUT=${OUT:-$ROOT/target/crash-soak}
SUMMARY=$OUT/summary.json
mkdir -p "$OUT"
rm -f "$SUMMARY"

cargo build --release
cargo test --release --test crash --no-run
BIN=${COFFER_BIN:-$ROOT/target/release/coffer}

# The test bounds itself (120 s + 60 s per cycle) and still writes a summary when it runs out
# of time; this outer bound only catches a harness that hangs. `timeout` runs the test in a
# process group of its own and signals the whole group, so the servers it started go too.
LIMIT=$((120 + 60 * CYCLES + 120))
RUN=""
stop_run() { if [ -n "$RUN" ]; then kill -TERM "$RUN" 2>/dev/null || true; fi; }
trap 'stop_run' INT TERM
started=$(date +%s)
COFFER_BIN=$BIN COFFER_SOAK_CYCLES=$CYCLES COFFER_SOAK_SUMMARY=$SUMMARY \
  timeout --kill-after=30 "$LIMIT" \
  cargo test --release --test crash -- --ignored --exact soak --nocapture &
RUN=$!
status=0
wait "$RUN" || status=$?
if kill -0 "$RUN" 2>/dev/null; then # interrupted: let the run stop its servers first
  wait "$RUN" || true
  status=130
fi
RUN=""
trap - INT TERM
elapsed=$(($(date +%s) - started))

echo
if [ ! -s "$SUMMARY" ]; then
  echo "crash soak: no summary (test exit status $status after ${elapsed}s; see the output above)" >&2
  exit $((status == 0 ? 1 : status))
fi
if command -v python3 >/dev/null; then
  python3 - "$SUMMARY" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
rows = [
    ("result", s["result"]),
    ("cycles", f'{s["cycles"]} of {s["cycles_requested"]} (SIGKILL under load, restart, verify)'),
    ("acknowledged ops verified",
     f'{s["acknowledged_verified"]} of {s["acknowledged"]} acknowledged, each after the SIGKILL that followed it'),
    ("lost", s["lost"]),
    ("unanswered resolved",
     f'{s["unanswered_resolved"]} of {s["unanswered"]} ({s["resolved_happened"]} had happened, '
     f'{s["resolved_not_happened"]} had not), then retried'),
    ("requests sent", f'{s["requests"]} ({s["refused"]} refused for funds, {s["retried"]} resent after restarts)'),
    ("rechecked at the end", f'{s["rechecked_at_end"]} applied operations on the last recovered state'),
    ("holds", s["holds"]),
]
if "transfers" in s:
    rows += [
        ("transfers",
         f'{s["transfers"]} happened: {s["transfers_completed"]} completed, '
         f'{s["transfers_failed_refunded"]} failed with the source refunded'),
        ("transfers verified",
         f'{s["transfers_verified"]} after the SIGKILL that followed them (GET, both histories, key '
         f'lookup, conservation, in-flight 0); {s["transfers_rechecked_at_end"]} rechecked at the end'),
        ("transfers answered",
         f'{s["transfers_acknowledged"]} 201, {s["transfers_failed_answered"]} failed (refunded) under load'),
        ("transfers unanswered",
         f'{s["transfers_unanswered"]} at a kill: {s["transfers_resolved_happened"]} had happened '
         f'(lookup on from), {s["transfers_resolved_not_happened"]} had not'),
        ("finished by recovery",
         f'{s["transfers_finished_by_recovery"]} transfers half done at a kill (wal verify), '
         f'finished before /readyz'),
    ]
rows += [
    ("duration", f'{s["duration_secs"]:.1f} s'),
    ("seed", f'{s["seed"]} (COFFER_CRASH_SEED replays the choices)'),
    ("binary", s["binary"]),
]
if s.get("kept_dir"):
    rows.append(("data kept in", s["kept_dir"]))
print("crash soak summary")
for name, value in rows:
    print(f"  {name:<26} {value}")
for failure in s.get("failures") or []:
    print(f"  failure: {failure[:2000]}")
PY
elif command -v jq >/dev/null; then
  jq -r '"crash soak summary",
    "  result                     \(.result)",
    "  cycles                     \(.cycles) of \(.cycles_requested)",
    "  acknowledged ops verified  \(.acknowledged_verified) of \(.acknowledged)",
    "  lost                       \(.lost)",
    "  unanswered resolved        \(.unanswered_resolved) of \(.unanswered)",
    "  transfers                  \(.transfers) (\(.transfers_failed_refunded) failed and refunded)",
    "  transfers verified         \(.transfers_verified)",
    "  transfers unanswered       \(.transfers_unanswered) (\(.transfers_resolved_happened) had happened)",
    "  finished by recovery       \(.transfers_finished_by_recovery)",
    "  duration                   \(.duration_secs) s",
    "  seed                       \(.seed)",
    (if .kept_dir then "  data kept in               \(.kept_dir)" else empty end),
    (.failures[] | "  failure: \(.)")' "$SUMMARY"
else
  cat "$SUMMARY"
fi
echo "  (summary: $SUMMARY)"

# The verdict comes from the summary, not only from the test's exit status.
read -r result lost < <(
  if command -v python3 >/dev/null; then
    python3 -c 'import json,sys; s=json.load(open(sys.argv[1])); print(s["result"], s["lost"])' "$SUMMARY"
  else
    jq -r '"\(.result) \(.lost)"' "$SUMMARY"
  fi
)
if [ "$lost" != 0 ] || [ "$result" != ok ] || [ "$status" != 0 ]; then
  exit $((status == 0 ? 1 : status))
fi
