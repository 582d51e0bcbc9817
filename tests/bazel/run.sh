#!/usr/bin/env bash
# End-to-end test: a real Bazel (Debian's bazel-bootstrap, Bazel 4.2.3, run as
# `bazel-4`) uses Kiln as its remote cache.
#
#   tests/bazel/run.sh KILN_BIN
#
# 1. Starts `KILN_BIN serve` on 127.0.0.1 (ports chosen by the kernel) with its
#    disk stores in a temp dir, and reads the gRPC port from its stdout.
# 2. Run 1: `bazel build //...` then `bazel test //...` of the workspace in
#    tests/bazel/workspace, in a fresh output base, with --remote_cache pointing
#    at Kiln. Everything executes locally (the cache is empty) and is uploaded.
# 3. Run 2: the same two commands in ANOTHER fresh output base (nothing local
#    survives). Every spawn must be a remote cache hit (execution log and
#    Bazel's process summary), the tests must be "(cached)", and every output
#    must be byte-identical to run 1.
#
# The build is fully offline: the three repositories Bazel 4.2.3 would
# download (rules_cc, rules_java, remote_coverage_tools) are replaced by the
# local stand-ins in tests/bazel/offline (see the WORKSPACE file).
#
# Environment:
#   BAZEL                 Bazel binary (default: bazel-4)
#   KILN_BAZEL_KEEP=1     keep the temp dir (logs, output bases) afterwards
#   KILN_BAZEL_TIMEOUT    seconds allowed per Bazel command (default: 600)
#
# Nothing outside the temp dir is written: Bazel gets its own
# --output_user_root/--output_base there, ~/.bazelrc is ignored, and the
# workspace is copied there so no convenience symlinks land in the source tree.

set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly SCRIPT_DIR
readonly BAZEL="${BAZEL:-bazel-4}"
readonly BAZEL_TIMEOUT="${KILN_BAZEL_TIMEOUT:-600}"
readonly SERVER_START_TIMEOUT=30
readonly SERVER_STOP_TIMEOUT=15
readonly WORKSPACE_NAME="kiln_bazel_e2e"

log() { printf 'bazel-e2e: %s\n' "$*"; }
fail() {
  printf 'bazel-e2e: FAIL: %s\n' "$*" >&2
  exit 1
}

# ---------------------------------------------------------------- arguments --

if [[ $# -ne 1 ]]; then
  echo "usage: $0 KILN_BIN" >&2
  exit 2
fi
KILN_BIN="$1"
[[ -x "$KILN_BIN" ]] || fail "kiln binary '$KILN_BIN' is missing or not executable"
KILN_BIN="$(cd "$(dirname "$KILN_BIN")" && pwd)/$(basename "$KILN_BIN")"

if ! command -v "$BAZEL" >/dev/null 2>&1; then
  fail "'$BAZEL' is not installed. Install Debian's Bazel 4.2.3 with" \
    ".ci/install-bazel.sh (apt-get install -y bazel-bootstrap)."
fi
for tool in python3 sha256sum timeout tail mkfifo; do
  command -v "$tool" >/dev/null 2>&1 || fail "required tool '$tool' is not installed"
done

# ----------------------------------------------------------------- temp dir --

WORK="$(mktemp -d "${TMPDIR:-/tmp}/kiln-bazel-e2e.XXXXXX")"
readonly WORK
SERVER_PID=""
DRAIN_PID=""
BAZEL_PID=""
STARTED=$SECONDS

# Waits (bounded) for a process we started to exit; returns 1 if it did not.
wait_exit() {
  local pid="$1" secs="$2"
  timeout "$secs" tail --pid="$pid" -f /dev/null >/dev/null 2>&1 || return 1
}

stop_pid() {
  local pid="$1" secs="$2"
  [[ -n "$pid" ]] || return 0
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  if ! wait_exit "$pid" "$secs"; then
    log "process $pid did not stop within ${secs}s; killing it"
    kill -KILL "$pid" 2>/dev/null || true
    wait_exit "$pid" 5 || true
  fi
}

show_server_log() {
  echo "----- kiln stdout (last 40 lines) -----" >&2
  tail -n 40 "$WORK/server.stdout" >&2 2>/dev/null || true
  echo "----- kiln stderr (last 60 lines) -----" >&2
  tail -n 60 "$WORK/server.stderr" >&2 2>/dev/null || true
  echo "---------------------------------------" >&2
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  stop_pid "$BAZEL_PID" 30
  stop_pid "$SERVER_PID" "$SERVER_STOP_TIMEOUT"
  stop_pid "$DRAIN_PID" 5
  if [[ $rc -ne 0 ]]; then
    show_server_log
  fi
  if [[ "${KILN_BAZEL_KEEP:-0}" == "1" ]]; then
    log "kept $WORK"
  else
    chmod -R u+w "$WORK" 2>/dev/null || true
    rm -rf "$WORK"
  fi
  if [[ $rc -eq 0 ]]; then
    log "PASS in $((SECONDS - STARTED))s"
  else
    log "FAILED (exit $rc) after $((SECONDS - STARTED))s" >&2
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Bazel's HOME only matters if it is unset (the client insists on one).
export HOME="${HOME:-$WORK/home}"

mkdir -p "$WORK/src" "$WORK/data" "$WORK/logs"
cp -R "$SCRIPT_DIR/workspace" "$SCRIPT_DIR/offline" "$WORK/src/"
readonly WS="$WORK/src/workspace"

# ------------------------------------------------------------- kiln server --

mkfifo "$WORK/server.fifo"
: >"$WORK/server.stdout"
"$KILN_BIN" serve \
  --listen 127.0.0.1:0 \
  --http-listen 127.0.0.1:0 \
  --data-dir "$WORK/data" \
  >"$WORK/server.fifo" 2>"$WORK/server.stderr" &
SERVER_PID=$!
# Read-write open never blocks on a FIFO; the server's lines arrive on it.
exec {SERVER_FD}<>"$WORK/server.fifo"

GRPC_PORT=""
partial=""
deadline=$((SECONDS + SERVER_START_TIMEOUT))
while [[ -z "$GRPC_PORT" ]]; do
  if ((SECONDS >= deadline)); then
    fail "kiln did not print 'kiln: grpc listening on 127.0.0.1:PORT' within ${SERVER_START_TIMEOUT}s"
  fi
  line=""
  if IFS= read -r -t 1 -u "$SERVER_FD" line; then
    line="$partial$line"
    partial=""
    printf '%s\n' "$line" >>"$WORK/server.stdout"
    if [[ "$line" =~ ^kiln:\ grpc\ listening\ on\ 127\.0\.0\.1:([0-9]+)$ ]]; then
      GRPC_PORT="${BASH_REMATCH[1]}"
    fi
  else
    # Timed out: keep what arrived of an unfinished line.
    partial+="$line"
  fi
  if [[ -z "$GRPC_PORT" ]] && ! kill -0 "$SERVER_PID" 2>/dev/null; then
    wait "$SERVER_PID" && server_rc=0 || server_rc=$?
    fail "kiln exited (status $server_rc) before it was listening"
  fi
done
# Keep draining the server's stdout so it never blocks on a full pipe.
cat <&"$SERVER_FD" >>"$WORK/server.stdout" &
DRAIN_PID=$!
exec {SERVER_FD}<&-
log "kiln (pid $SERVER_PID) serves gRPC on 127.0.0.1:$GRPC_PORT"

# -------------------------------------------------------------------- bazel --

# Startup options. The system bazelrc (/etc/bazel/bazelrc) is kept on purpose:
# Debian's Bazel needs its --install_base=/usr/share/bazel from there.
startup_opts() {
  local output_base="$1"
  printf '%s\n' \
    --nohome_rc \
    --batch \
    "--output_user_root=$WORK/bazel-root" \
    "--output_base=$output_base"
}

# Options of build and test (identical in both runs, so action keys match).
common_opts() {
  printf '%s\n' \
    "--remote_cache=grpc://127.0.0.1:$GRPC_PORT" \
    --remote_timeout=60 \
    --remote_upload_local_results=true \
    --remote_download_outputs=all \
    --disk_cache= \
    --incompatible_strict_action_env \
    --nosandbox_debug \
    --symlink_prefix=/ \
    --color=no \
    --curses=no \
    --show_timestamps \
    --test_output=errors
}

# run_bazel NAME OUTPUT_BASE COMMAND: runs `bazel COMMAND //...`, with its
# output in logs/NAME.log and its execution log in logs/NAME.exec.json.
run_bazel() {
  local name="$1" output_base="$2" cmd="$3"
  local out="$WORK/logs/$name.log"
  local -a startup common
  mapfile -t startup < <(startup_opts "$output_base")
  mapfile -t common < <(common_opts)
  log "$name: $BAZEL $cmd //... (output base $(basename "$output_base"))"
  local t0=$SECONDS rc=0
  timeout --kill-after=30 "$BAZEL_TIMEOUT" \
    "$BAZEL" "${startup[@]}" "$cmd" "${common[@]}" \
    "--execution_log_json_file=$WORK/logs/$name.exec.json" \
    //... </dev/null >"$out" 2>&1 &
  BAZEL_PID=$!
  wait "$BAZEL_PID" || rc=$?
  BAZEL_PID=""
  log "$name: exit $rc in $((SECONDS - t0))s; $(grep -E '^(\([^)]*\) )?INFO: [0-9]+ process' "$out" | tail -n 1 | sed -E 's/^\([^)]*\) //')"
  if [[ $rc -ne 0 ]]; then
    echo "----- bazel output of $name (last 80 lines) -----" >&2
    tail -n 80 "$out" >&2
    [[ $rc -eq 124 ]] && fail "$name: bazel $cmd timed out after ${BAZEL_TIMEOUT}s"
    fail "$name: bazel $cmd failed with exit code $rc"
  fi
  # A warning about the remote cache means uploads or downloads went wrong,
  # even if Bazel carried on locally.
  if grep -Ei '(WARNING|ERROR):.*(remote|grpc)' "$out" >/dev/null; then
    echo "----- remote cache warnings in $name -----" >&2
    grep -Ei '(WARNING|ERROR):.*(remote|grpc)' "$out" | head -n 20 >&2
    fail "$name: Bazel reported remote cache problems"
  fi
  kill -0 "$SERVER_PID" 2>/dev/null || fail "kiln died during $name"
}

# check_spawns NAME EXPECT: checks logs/NAME.exec.json and Bazel's
# "N processes: ..." line. EXPECT is "hit" (every spawn a remote cache hit,
# none executed) or "miss" (every spawn executed locally, none a hit: the cache
# started empty). Prints the sorted action identities to logs/NAME.actions.
check_spawns() {
  local name="$1" expect="$2"
  python3 - "$WORK/logs/$name.exec.json" "$WORK/logs/$name.log" "$expect" \
    "$WORK/logs/$name.actions" <<'PY'
import json
import re
import sys

exec_log, bazel_log, expect, actions_out = sys.argv[1:5]

with open(exec_log, encoding="utf-8") as f:
    text = f.read()
decoder = json.JSONDecoder()
spawns = []
pos = 0
while True:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    if pos >= len(text):
        break
    obj, pos = decoder.raw_decode(text, pos)
    spawns.append(obj)

problems = []
if not spawns:
    problems.append("the execution log has no spawns")
for s in spawns:
    what = "%s [%s] runner=%r" % (
        s.get("progressMessage") or s.get("listedOutputs"),
        s.get("mnemonic"),
        s.get("runner"),
    )
    hit = s.get("remoteCacheHit") is True and s.get("runner") == "remote cache hit"
    if expect == "hit" and not hit:
        problems.append("not a remote cache hit: " + what)
    if expect == "miss" and s.get("remoteCacheHit") is True:
        problems.append("remote cache hit on an empty cache: " + what)
    if s.get("exitCode", 0) != 0:
        problems.append("exit code %s: %s" % (s.get("exitCode"), what))
    if expect == "miss" and s.get("remoteCacheable") is not True:
        problems.append("not remote-cacheable: " + what)

# Bazel's summary, e.g. "INFO: 30 processes: 28 remote cache hit, 2 internal."
summary = None
with open(bazel_log, encoding="utf-8", errors="replace") as f:
    for line in f:
        m = re.search(r"INFO: (\d+) process(?:es)?(?:: (.*?))?\.?\s*$", line)
        if m:
            summary = (int(m.group(1)), m.group(2) or "")
if summary is None:
    problems.append("no 'INFO: N processes' line in the Bazel output")
else:
    total, detail = summary
    kinds = {}
    for part in filter(None, (p.strip() for p in detail.split(","))):
        m = re.match(r"(\d+) (.+)$", part)
        if not m:
            problems.append("cannot parse process summary part %r" % part)
            continue
        kinds[m.group(2)] = int(m.group(1))
    # (Bazel 4.2's total counts actions, not spawns, so only the per-kind
    # counts are compared with the execution log.)
    hits = kinds.pop("remote cache hit", 0)
    kinds.pop("internal", None)
    if expect == "hit":
        if kinds:
            problems.append("processes that were not remote cache hits: %r" % kinds)
        if hits != len(spawns):
            problems.append(
                "%d remote cache hits in the summary but %d spawns in the log"
                % (hits, len(spawns))
            )
    else:
        if hits:
            problems.append("%d remote cache hits on an empty cache" % hits)
        executed = sum(kinds.values())
        if executed != len(spawns):
            problems.append(
                "%d executed processes in the summary but %d spawns in the log"
                % (executed, len(spawns))
            )

with open(actions_out, "w", encoding="utf-8") as f:
    for s in sorted(
        "%s %s" % (s.get("mnemonic"), " ".join(sorted(s.get("listedOutputs", []))))
        for s in spawns
    ):
        f.write(s + "\n")

hits = sum(1 for s in spawns if s.get("remoteCacheHit") is True)
print("%d spawns, %d remote cache hits" % (len(spawns), hits))
if problems:
    for p in problems[:50]:
        print("  " + p, file=sys.stderr)
    if len(problems) > 50:
        print("  ... and %d more" % (len(problems) - 50), file=sys.stderr)
    sys.exit(1)
PY
}

# Digest of every output that must be byte-identical between the runs: all
# files Bazel produced under bin/ and testlogs/ of both configurations, except
# the runfiles manifests (they hold absolute paths into the output base) and
# test.cache_status (Bazel's local bookkeeping of where a result came from).
hash_outputs() {
  local output_base="$1" dest="$2"
  local out_dir="$output_base/execroot/$WORKSPACE_NAME/bazel-out"
  [[ -d "$out_dir" ]] || fail "no bazel-out under $output_base"
  (
    cd "$out_dir"
    find . -path ./_tmp -prune -o -type f \
      \( -path './*/bin/*' -o -path './*/testlogs/*' \) \
      ! -name '*.runfiles_manifest' ! -path '*.runfiles/MANIFEST' \
      ! -name 'test.cache_status' -print0 |
      sort -z | xargs -0 -r sha256sum
  ) >"$dest"
}

check_test_summary() {
  local name="$1" expect="$2"
  local out="$WORK/logs/$name.log"
  local tests=(//lib:mathx_test //lib:report_test)
  for t in "${tests[@]}"; do
    if [[ "$expect" == "cached" ]]; then
      grep -E "^$t +\(cached\) PASSED" "$out" >/dev/null ||
        fail "$name: $t was not reported '(cached) PASSED'"
    else
      grep -E "^$t +PASSED" "$out" >/dev/null ||
        fail "$name: $t was not reported PASSED"
    fi
  done
  if [[ "$expect" == "cached" ]]; then
    grep -E "Executed 0 out of ${#tests[@]} tests?: ${#tests[@]} tests? pass" "$out" >/dev/null ||
      fail "$name: expected 'Executed 0 out of ${#tests[@]} tests' (all cached)"
  else
    grep -E "Executed ${#tests[@]} out of ${#tests[@]} tests?: ${#tests[@]} tests? pass" "$out" >/dev/null ||
      fail "$name: expected all ${#tests[@]} tests executed and passing"
  fi
}

check_file_content() {
  local output_base="$1" rel="$2" want="$3"
  local path="$output_base/execroot/$WORKSPACE_NAME/bazel-out/k8-fastbuild/bin/$rel"
  [[ -f "$path" ]] || fail "missing output $rel"
  local got
  got="$(cat "$path")"
  [[ "$got" == "$want" ]] || fail "$rel holds '$got', want '$want'"
}

cd "$WS"

# Run 1: empty cache; everything executes locally and is uploaded.
OB1="$WORK/ob1"
run_bazel run1-build "$OB1" build
check_spawns run1-build miss || fail "run1-build: unexpected execution log (see above)"
run_bazel run1-test "$OB1" test
check_spawns run1-test miss || fail "run1-test: unexpected execution log (see above)"
check_test_summary run1-test executed
check_file_content "$OB1" gen/squares_sum.txt 285
check_file_content "$OB1" app/demo_output.txt "hello from kiln: sum_of_squares=285"
hash_outputs "$OB1" "$WORK/logs/run1.sha256"

# Run 2: a brand-new output base; every spawn must come from the cache.
OB2="$WORK/ob2"
run_bazel run2-build "$OB2" build
check_spawns run2-build hit || fail "run2-build: not every action was a remote cache hit (see above)"
run_bazel run2-test "$OB2" test
check_spawns run2-test hit || fail "run2-test: not every test action was a remote cache hit (see above)"
check_test_summary run2-test cached
hash_outputs "$OB2" "$WORK/logs/run2.sha256"

# Run 2 ran exactly the spawns of run 1, each now a cache hit (for tests that
# includes the spawn generating test.xml).
for cmd in build test; do
  if ! diff -u "$WORK/logs/run1-$cmd.actions" "$WORK/logs/run2-$cmd.actions" >&2; then
    fail "$cmd: run 2 ran a different set of spawns than run 1"
  fi
done

# Byte-identical outputs.
n_outputs=$(wc -l <"$WORK/logs/run1.sha256")
((n_outputs >= 40)) || fail "only $n_outputs outputs were hashed; expected the full build"
grep -q ' \./k8-fastbuild/testlogs/lib/report_test/test.xml$' "$WORK/logs/run1.sha256" ||
  fail "test results are missing from the hashed outputs"
if ! diff -u "$WORK/logs/run1.sha256" "$WORK/logs/run2.sha256" >&2; then
  fail "outputs of run 2 differ from run 1"
fi
log "run 2: every action a remote cache hit; $n_outputs outputs byte-identical to run 1"
