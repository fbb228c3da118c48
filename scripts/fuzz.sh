#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for SECONDS each (default 60), each from a scratch
# copy of its seed corpus (fuzz/corpus/<target>, when there is one) so the committed corpus
# stays small. Prints execs/s and total executions per target; exits non-zero on any crash,
# leak, timeout or out-of-memory (the input is kept in fuzz/artifacts/<target>/).
#
#   scripts/fuzz.sh [SECONDS]
#
# Needs the nightly toolchain and cargo-fuzz; installs both when missing.
#
# FUZZ_SANITIZER (default `none`): coffer forbids unsafe code, so AddressSanitizer mostly
# checks dependencies and costs 3-5x the executions; `FUZZ_SANITIZER=address` turns it on.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-60}"
sanitizer="${FUZZ_SANITIZER:-none}"
if ! [[ "$seconds" =~ ^[0-9]+$ ]] || [ "$seconds" -lt 1 ]; then
  echo "usage: scripts/fuzz.sh [SECONDS]" >&2
  exit 2
fi

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "== installing the nightly toolchain"
  rustup toolchain install nightly --profile minimal
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

cd fuzz
echo "== building the fuzz targets"
cargo +nightly fuzz build --sanitizer "$sanitizer"

mapfile -t targets < <(cargo +nightly fuzz list)
if [ "${#targets[@]}" -eq 0 ]; then
  echo "no fuzz targets found" >&2
  exit 1
fi

scratch="$(mktemp -d "${TMPDIR:-/tmp}/coffer-fuzz.XXXXXX")"
trap 'rm -rf "$scratch"' EXIT

failed=()
summary=()
for target in "${targets[@]}"; do
  corpus="$scratch/corpus/$target"
  mkdir -p "$corpus"
  if [ -d "corpus/$target" ]; then
    cp -R "corpus/$target/." "$corpus/"
  fi
  log="$scratch/$target.log"
  echo "== fuzzing $target for ${seconds}s ($(find "$corpus" -type f | wc -l) seeds)"
  status=0
  cargo +nightly fuzz run --sanitizer "$sanitizer" "$target" "$corpus" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    >"$log" 2>&1 || status=$?
  # The last status line libFuzzer printed: "#N <event> cov: ... exec/s: X rss: ...".
  last="$(grep -E '^#[0-9]+' "$log" | tail -n 1 || true)"
  runs="$(grep -E '^stat::number_of_executed_units:' "$log" | tail -n 1 | awk '{print $2}' || true)"
  if [ -z "$runs" ]; then
    runs="$(sed -E -n 's/^#([0-9]+).*/\1/p' <<<"$last")"
  fi
  rate="$(sed -E -n 's/.*exec\/s: ([0-9]+).*/\1/p' <<<"$last")"
  cov="$(sed -E -n 's/.* cov: ([0-9]+).*/\1/p' <<<"$last")"
  corp="$(sed -E -n 's/.* corp: ([0-9]+)\/.*/\1/p' <<<"$last")"
  if [ "$status" -ne 0 ]; then
    failed+=("$target")
    echo "!! $target failed (exit $status); the end of its log:"
    grep -E -m 5 -A 3 "panicked at|ERROR: libFuzzer|==ERROR|SUMMARY" "$log" | cut -c1-300 || true
    tail -n 12 "$log" | cut -c1-300
    summary+=("$(printf '%-20s FAILED  executions=%s exec/s=%s' "$target" "${runs:-?}" "${rate:-?}")")
  else
    tail -n 3 "$log" | sed 's/^/   /'
    summary+=("$(printf '%-20s ok      executions=%s exec/s=%s cov=%s corpus=%s' \
      "$target" "${runs:-?}" "${rate:-?}" "${cov:-?}" "${corp:-?}")")
  fi
done

echo "== summary (${seconds}s per target, sanitizer: $sanitizer)"
printf '%s\n' "${summary[@]}"
if [ "${#failed[@]}" -ne 0 ]; then
  echo "crashed: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
  exit 1
fi
