#!/usr/bin/env bash
# Runs README.md's walkthrough as written, in order, against a fresh server, and checks what
# the README says each command answers. Exits non-zero naming the README line at fault.
#
#   scripts/readme-walkthrough.sh
#
# What runs: every ```sh block of README.md, top to bottom, in one bash process (so a
# variable set by one block is there for the next), with `localhost:8080` rewritten to the
# test server (a debug build on a free 127.0.0.1 port, over a temporary data directory).
# A block that must not run (it starts another server, needs a binary on PATH, runs for
# minutes) is marked by the line `<!-- walkthrough: skip -->` just before its fence.
#
# What is checked, from the comment lines of a block (a line that starts with `#`), each
# about the command lines before it:
#   # 201                     the status of the last answer
#   # 409 insufficient_funds  ... and its problem `code` (a lower-case word; prose may follow
#                             after a colon or a space)
#   # 201 Idempotent-Replayed: true
#                             ... and a header of it
#   # 201 {"id": "player-42", "seq": 0, ...}
#                             ... and every field shown, which may go on over the next
#                             comment lines until the brackets close. `...` stands for
#                             anything: the rest of an object's fields or of an array, one
#                             value ("...", {...}), or the end of a string ("01..."). Without
#                             `...` an object must have exactly the fields shown. "<uuid>",
#                             "<time>" and "<cursor>" stand for a UUID, an RFC 3339 time and
#                             an event-stream cursor.
#   # prints 201 201 201 409  the command's output, whitespace collapsed, contains this (same
#                             `...` and placeholders)
# Other comment lines are prose. "The last answer" is that of the last curl of the command
# lines whose body is not sent to /dev/null (`curl` is wrapped to record it).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v jq >/dev/null 2>&1; then
  # The README extracts ids with jq.
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "installing jq"
    apt-get update -qq && apt-get install -y -qq jq >/dev/null
  else
    echo "the README walkthrough needs jq"; exit 1
  fi
fi

# The binary as `cargo test` builds it (see scripts/schemathesis.sh).
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

started=$(date +%s)
python3 - README.md "$work" "127.0.0.1:$port" <<'EOF'
import json
import os
import re
import subprocess
import sys

readme, work, address = sys.argv[1:4]
lines = open(readme).read().split("\n")
SKIP = "<!-- walkthrough: skip -->"

# ---- the blocks, as chunks: command lines, then the comment lines about them ----------
chunks = []  # (first line number, [command lines], [(line number, comment)])
index = 0
while index < len(lines):
    fence = lines[index].strip()
    if fence != "```sh":
        index += 1
        continue
    before = next((l.strip() for l in reversed(lines[:index]) if l.strip()), "")
    end = index + 1
    while end < len(lines) and lines[end].strip() != "```":
        end += 1
    if end == len(lines):
        sys.exit(f"{readme}:{index + 1}: a ```sh block that never ends")
    if before != SKIP:
        commands, comments, start = [], [], None
        for number in range(index + 1, end):
            text = lines[number].strip()
            if not text:
                continue
            if text.startswith("#"):
                comments.append((number + 1, text))
                continue
            if comments or start is None:
                if start is not None:
                    chunks.append((start, commands, comments))
                commands, comments, start = [], [], number + 1
            commands.append(lines[number].replace("localhost:8080", address))
        if start is not None:
            chunks.append((start, commands, comments))
    index = end + 1

# ---- every $VAR a command uses is set by a command before it ----------------------------
known = set()
for start, commands, _ in chunks:
    for offset, command in enumerate(commands):
        for name in re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", command):
            if name not in known:
                sys.exit(f"{readme}:{start + offset}: ${name} is used, but no command before it sets it")
        known.update(re.findall(r"(?:^|[\s;(])([A-Za-z_][A-Za-z0-9_]*)=", command))
        known.update(re.findall(r"\bfor\s+([A-Za-z_][A-Za-z0-9_]*)\s+in\b", command))

# ---- one bash script: each chunk, then a copy of its last answer and its output ---------
script = [
    "set -u",
    f"WT={json.dumps(work)}",
    'curl() {',
    '  local t discard=0 a rc',
    '  t=$(mktemp "$WT/answer.XXXXXX")',
    '  for a in "$@"; do [ "$a" = /dev/null ] && discard=1; done',
    '  command curl -sS -D "$t.h" "$@" | tee "$t.b"',
    '  rc=${PIPESTATUS[0]}',
    '  if [ "$discard" = 0 ]; then mv -f "$t.h" "$WT/last.h"; mv -f "$t.b" "$WT/last.b";',
    '  else rm -f "$t.h" "$t.b"; fi',
    '  rm -f "$t"',
    '  return "$rc"',
    '}',
]
for n, (start, commands, _) in enumerate(chunks):
    script.append(f'rm -f "$WT/last.h" "$WT/last.b"')
    script.append("{")
    script.extend(commands)
    script.append(f'}} >"$WT/out.{n}" 2>&1')
    script.append(f'cp "$WT/last.h" "$WT/answer.{n}.h" 2>/dev/null || true')
    script.append(f'cp "$WT/last.b" "$WT/answer.{n}.b" 2>/dev/null || true')
open(f"{work}/walkthrough.sh", "w").write("\n".join(script) + "\n")
subprocess.run(["bash", f"{work}/walkthrough.sh"], cwd=work, check=False, timeout=300)

# ---- the checks -------------------------------------------------------------------------
PLACEHOLDERS = {
    "<uuid>": r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
    "<time>": r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z",
    "<cursor>": r"e[0-9a-f]{16}",
}
ANY = object()

class Pattern(Exception):
    pass

def parse(text):
    """The expected value of a `# NNN {...}` line: JSON with `...` wildcards."""
    value, at = parse_value(text, 0)
    if text[at:].strip():
        raise Pattern(f"unexpected text after the value: {text[at:]!r}")
    return value

def skip_ws(text, at):
    while at < len(text) and text[at].isspace():
        at += 1
    return at

def skip_prose(text, at):
    # After `...`: words up to the end of the enclosing object or array (or a comma).
    depth = 0
    while at < len(text):
        c = text[at]
        if c in "{[":
            depth += 1
        elif c in "}]":
            if depth == 0:
                return at
            depth -= 1
        elif c == "," and depth == 0:
            return at
        at += 1
    return at

def parse_value(text, at):
    at = skip_ws(text, at)
    if text.startswith("...", at):
        return ANY, skip_prose(text, at + 3)
    c = text[at:at + 1]
    if c == "{":
        return parse_container(text, at + 1, "}")
    if c == "[":
        return parse_container(text, at + 1, "]")
    if c == '"':
        value, end = json.JSONDecoder().raw_decode(text, at)
        if value == "...":
            return ANY, end
        if value in PLACEHOLDERS:
            return ("re", PLACEHOLDERS[value]), end
        if value.endswith("..."):
            return ("prefix", value[:-3]), end
        return ("eq", value), end
    match = re.compile(r"-?\d+(\.\d+)?|true|false|null").match(text, at)
    if not match:
        raise Pattern(f"cannot read a value at {text[at:at + 20]!r}")
    return ("eq", json.loads(match.group(0))), match.end()

def parse_container(text, at, close):
    items, is_open = [], False
    while True:
        at = skip_ws(text, at)
        if text.startswith("...", at):
            is_open = True
            at = skip_ws(text, skip_prose(text, at + 3))
            if text[at:at + 1] == ",":
                at += 1
                continue
        if text[at:at + 1] == close:
            break
        if close == "}":
            key, at = json.JSONDecoder().raw_decode(text, skip_ws(text, at))
            at = skip_ws(text, at)
            if text[at:at + 1] != ":":
                raise Pattern(f"expected ':' after {key!r}")
            value, at = parse_value(text, at + 1)
            items.append((key, value))
        else:
            value, at = parse_value(text, at)
            items.append(value)
        at = skip_ws(text, at)
        if text[at:at + 1] == ",":
            at += 1
        elif text[at:at + 1] != close:
            raise Pattern(f"expected ',' or {close!r} at {text[at:at + 20]!r}")
    kind = "object" if close == "}" else "array"
    return (kind, items, is_open), at + 1

def mismatch(expected, actual, where="body"):
    """Why `actual` does not match `expected`, or None."""
    if expected is ANY:
        return None
    kind = expected[0]
    if kind == "eq":
        return None if actual == expected[1] and type(actual) == type(expected[1]) else f"{where} is {json.dumps(actual)}, the README shows {json.dumps(expected[1])}"
    if kind == "prefix":
        return None if isinstance(actual, str) and actual.startswith(expected[1]) else f"{where} is {json.dumps(actual)}, the README shows {expected[1]}..."
    if kind == "re":
        return None if isinstance(actual, str) and re.fullmatch(expected[1], actual) else f"{where} is {json.dumps(actual)}, not of the form the README shows"
    if kind == "object":
        _, fields, is_open = expected
        if not isinstance(actual, dict):
            return f"{where} is {json.dumps(actual)[:200]}, not an object"
        for key, value in fields:
            if key not in actual:
                return f"{where} has no {key!r}"
            why = mismatch(value, actual[key], f"{where}.{key}")
            if why:
                return why
        extra = set(actual) - {key for key, _ in fields}
        if not is_open and extra:
            return f"{where} also has {sorted(extra)}, which the README does not show (add `...`?)"
        return None
    _, items, is_open = expected
    if not isinstance(actual, list):
        return f"{where} is {json.dumps(actual)[:200]}, not an array"
    if len(actual) < len(items) or (not is_open and len(actual) != len(items)):
        return f"{where} has {len(actual)} items, the README shows {len(items)}{' or more' if is_open else ''}"
    for n, (value, item) in enumerate(zip(items, actual)):
        why = mismatch(value, item, f"{where}[{n}]")
        if why:
            return why
    return None

def answer(n):
    try:
        head = open(f"{work}/answer.{n}.h", encoding="utf-8", errors="replace").read()
        body = open(f"{work}/answer.{n}.b", encoding="utf-8", errors="replace").read()
    except FileNotFoundError:
        return None
    blocks = [b for b in head.replace("\r\n", "\n").split("\n\n") if b.strip()]
    if not blocks:
        return None
    status_line, *header_lines = blocks[-1].split("\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if body.startswith("HTTP/"):  # curl -i: the headers are in the output too
        body = body.replace("\r\n", "\n").split("\n\n", 1)[-1]
    return int(status_line.split()[1]), headers, body

def printed_pattern(text):
    parts = re.split(r"(\.\.\.|<uuid>|<time>|<cursor>)", text)
    out = ""
    for part in parts:
        if part == "...":
            out += ".*?"
        elif part in PLACEHOLDERS:
            out += PLACEHOLDERS[part]
        else:
            out += re.escape(part)
    return out

failures = []
checked = 0
for n, (start, commands, comments) in enumerate(chunks):
    output = open(f"{work}/out.{n}", errors="replace").read()
    at = 0
    while at < len(comments):
        number, text = comments[at]
        at += 1
        printed = re.match(r"#\s*prints\s+(.*)$", text)
        status = re.match(r"#\s*(\d{3})(?:\s+(.*))?$", text)
        if printed:
            checked += 1
            flat = " ".join(output.split())
            if not re.search(printed_pattern(printed.group(1).strip()), flat):
                failures.append(f"{readme}:{number}: the command printed {flat[:300]!r}, the README shows: {printed.group(1)}")
            continue
        if not status:
            continue
        checked += 1
        got = answer(n)
        if got is None:
            failures.append(f"{readme}:{number}: the commands of line {start} got no answer; they printed {output[:300]!r}")
            continue
        code, headers, body = got
        want, rest = int(status.group(1)), (status.group(2) or "").strip()
        if code != want:
            failures.append(f"{readme}:{number}: status {code}, the README shows {want}: {body[:300]}")
            continue
        if rest.startswith(("{", "[")):
            text = rest
            while True:
                try:
                    expected = parse(text)
                    break
                except (Pattern, ValueError, IndexError) as error:
                    if at < len(comments) and not re.match(r"#\s*(\d{3}|prints)\b", comments[at][1]):
                        text += " " + comments[at][1].lstrip("#").strip()
                        at += 1
                        continue
                    failures.append(f"{readme}:{number}: cannot read the README's expected body: {error}")
                    expected = None
                    break
            if expected is None:
                continue
            try:
                actual = json.loads(body)
            except ValueError:
                failures.append(f"{readme}:{number}: the answer is not JSON: {body[:300]}")
                continue
            why = mismatch(expected, actual)
            if why:
                failures.append(f"{readme}:{number}: {why}\n    answer: {body[:400]}")
            continue
        header = re.match(r"([A-Z][A-Za-z-]*):\s*(\S+)", rest)
        if header:
            value = headers.get(header.group(1).lower())
            if value != header.group(2):
                failures.append(f"{readme}:{number}: header {header.group(1)} is {value!r}, the README shows {header.group(2)!r}")
            continue
        word = re.match(r"([a-z_]+)(?::|\s|$)", rest)
        if word:
            try:
                got_code = json.loads(body).get("code")
            except ValueError:
                got_code = None
            if got_code != word.group(1):
                failures.append(f"{readme}:{number}: code {got_code!r}, the README shows {word.group(1)!r}: {body[:300]}")

print(f"README walkthrough: {len(chunks)} command groups run, {checked} expectations checked")
if failures:
    print(f"{len(failures)} of them differ from what the server answers:")
    for failure in failures:
        print(" -", failure)
    sys.exit(1)
EOF
echo "README walkthrough: passed in $(( $(date +%s) - started )) s"
