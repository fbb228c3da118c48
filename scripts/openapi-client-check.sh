#!/usr/bin/env bash
# Does a client generated from the served OpenAPI document keep every operation? Starts the
# coffer server on a free 127.0.0.1 port over a temporary data directory, fetches its
# /openapi.json, generates a Python client with openapi-python-client (pinned; installed
# into target/openapi-client-venv when missing) and checks that:
#   - the generator warned about nothing (a schema it cannot read is silently left out of
#     the client, with its operations' bodies or answers);
#   - every operationId of the document became a module api/<tag>/<operation>.py whose
#     sync_detailed and asyncio_detailed functions import and exist (POST /v1/batch
#     included, whose operations are a oneOf told apart by the `op` discriminator);
#   - each batch op has its own model, so a client builds batch operations by type.
# Exits non-zero, naming what is missing, otherwise.
#
#   scripts/openapi-client-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
GENERATOR_VERSION=0.29.1
venv=target/openapi-client-venv

if ! "$venv/bin/openapi-python-client" --version 2>/dev/null | grep -q "version: $GENERATOR_VERSION\$"; then
  echo "installing openapi-python-client $GENERATOR_VERSION into $venv"
  if ! python3 -m venv "$venv" 2>/dev/null; then
    # Debian's python3 lacks venv until python3-venv is installed.
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
      apt-get update -qq && apt-get install -y -qq python3-venv python3-pip >/dev/null
    fi
    python3 -m venv "$venv"
  fi
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet "openapi-python-client==$GENERATOR_VERSION"
fi

# The binary as `cargo test` builds it (see scripts/schemathesis.sh): nothing new to build
# after `cargo test`.
cargo test --quiet --no-run --test openapi
binary=target/debug/coffer

work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')
base="http://127.0.0.1:$port"
"$binary" serve --data-dir "$work/data" --listen "127.0.0.1:$port" >"$work/server.log" 2>&1 &
server=$!
cleanup() {
  kill "$server" 2>/dev/null || true
  wait "$server" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
for _ in $(seq 1 200); do
  if curl -fsS "$base/readyz" >/dev/null 2>&1; then break; fi
  if ! kill -0 "$server" 2>/dev/null; then
    echo "the server exited:"; cat "$work/server.log"; exit 1
  fi
  sleep 0.1
done
curl -fsS "$base/openapi.json" >"$work/openapi.json"

# The package is generated into its own directory, named so that it imports as `coffer_client`.
(cd "$work" && "$OLDPWD/$venv/bin/openapi-python-client" generate --path openapi.json \
  --meta none --output-path coffer_client >generate.log 2>&1) || {
  echo "openapi-python-client failed:"; cat "$work/generate.log"; exit 1
}

"$venv/bin/python" - "$work" <<'EOF'
import importlib
import json
import re
import sys

work = sys.argv[1]
sys.path.insert(0, work)
log = open(f"{work}/generate.log").read()
failures = []

# Lines the generator prints about the document itself (not about missing formatters).
noise = re.compile(r"^(Generating|Warning\(s\) encountered|Skipping Integration|ruff is not in PATH|If you believe)")
warnings = [line for line in log.splitlines() if line.strip() and not noise.match(line)]
if warnings:
    failures.append("the generator warned about the document:\n  " + "\n  ".join(warnings[:40]))

def snake(name):
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()

doc = json.load(open(f"{work}/openapi.json"))
operations = []
for path, item in doc["paths"].items():
    for method, operation in item.items():
        if method not in ("get", "put", "post", "delete", "patch", "head", "options", "trace"):
            continue
        operations.append((method, path, operation["operationId"], operation["tags"][0]))
for method, path, operation_id, tag in operations:
    module = f"coffer_client.api.{snake(tag)}.{snake(operation_id)}"
    try:
        loaded = importlib.import_module(module)
    except Exception as error:
        failures.append(f"{method.upper()} {path} ({operation_id}): no module {module}: {error}")
        continue
    for function in ("sync_detailed", "asyncio_detailed"):
        if not callable(getattr(loaded, function, None)):
            failures.append(f"{method.upper()} {path} ({operation_id}): {module}.{function} is missing")

mapping = doc["components"]["schemas"]["BatchOperation"]["discriminator"]["mapping"]
models = importlib.import_module("coffer_client.models")
for op, target in mapping.items():
    name = target.rsplit("/", 1)[-1]
    if not hasattr(models, name):
        failures.append(f"batch op {op}: no model {name}")

if failures:
    print("openapi-python-client check failed:")
    for failure in failures:
        print(" -", failure)
    sys.exit(1)
print(f"openapi-python-client: all {len(operations)} operations generated (batch included), no warnings")
EOF
