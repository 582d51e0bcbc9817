#!/usr/bin/env bash
# End-to-end test: a real Bazel (Debian's bazel-bootstrap, Bazel 4.2.3, run as
# `bazel-4`) builds and tests a C++ workspace through Kiln's REMOTE EXECUTION.
#
#   tests/bazel/run-re.sh KILN_BIN
#
# 1. Generates the workspace (tests/bazel/gen-re-workspace.sh: 60 layered
#    cc_library targets, 3 cc_binary, 4 cc_test, 5 genrules) in a temp dir.
# 2. Starts `KILN_BIN serve` with the embedded default configuration (CAS, AC,
#    scheduler and one in-process sandboxed worker) on 127.0.0.1, ports chosen
#    by the kernel, its data in the temp dir.
# 3. Run 1: `bazel build //...` then `bazel test //...` in a fresh output base
#    with --remote_executor pointing at Kiln and --spawn_strategy=remote. Every
#    spawn must have run remotely (execution log: runner "remote", remotable,
#    no cache hit; Bazel's summary: only "remote" and "internal"), the tests
#    must pass, the genrules' outputs must be what the generator computed, the
#    downloaded binaries must run here and print the same, and Kiln's Action
#    Cache must hold exactly one entry per executed spawn.
# 4. Run 2: the same commands in ANOTHER fresh output base: every spawn a
#    remote cache hit, the tests "(cached)", the same set of spawns as run 1,
#    every output byte-identical to run 1, and no new Action Cache entries.
# 5. Run 3 (failures, in run 1's output base): //tests:fails_test (tag
#    manual) exits 3, twice; both times Kiln must execute it (a failure is
#    never cached) and its stdout and stderr must reach Bazel.
#    //tests:sleeps_test with --test_timeout=3 must be reported TIMEOUT, its
#    partial output returned, and no process of it left running.
# 6. Stops Kiln with SIGTERM: it must exit 0 within a bounded time, leave no
#    sandbox process behind, and its log must hold no WARN or ERROR line.
#
# The build is fully offline: rules_cc, rules_java and remote_coverage_tools
# are the local stand-ins of tests/bazel/offline (shared with run.sh).
#
# Environment:
#   BAZEL                 Bazel binary (default: bazel-4)
#   KILN_BAZEL_KEEP=1     keep the temp dir (logs, output bases) afterwards
#   KILN_BAZEL_TIMEOUT    seconds allowed per Bazel command (default: 300)
#   KILN_BAZEL_JOBS       Bazel --jobs (default: 8)
#   KILN_LOG              Kiln's log filter (default: info); to diagnose a
#                         failing action:
#                         KILN_LOG=info,kiln_scheduler=debug,kiln_worker=debug
#
# Nothing outside the temp dir is written: Bazel gets its own
# --output_user_root/--output_base there and ~/.bazelrc is ignored.

set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly SCRIPT_DIR
readonly BAZEL="${BAZEL:-bazel-4}"
readonly BAZEL_TIMEOUT="${KILN_BAZEL_TIMEOUT:-300}"
readonly BAZEL_JOBS="${KILN_BAZEL_JOBS:-8}"
readonly SERVER_START_TIMEOUT=30
readonly SERVER_STOP_TIMEOUT=20
readonly WORKSPACE_NAME="kiln_bazel_re"
readonly TESTS=(//tests:golden_test //tests:layer0_test //tests:mid_test //tests:top_test)

log() { printf 'bazel-re: %s\n' "$*"; }
fail() {
  printf 'bazel-re: FAIL: %s\n' "$*" >&2
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

WORK="$(mktemp -d "${TMPDIR:-/tmp}/kiln-bazel-re.XXXXXX")"
readonly WORK
SERVER_PID=""
DRAIN_PID=""
BAZEL_PID=""
STARTED=$SECONDS

# Waits (bounded) for a process to exit; returns 1 if it did not.
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
  echo "----- kiln stdout (last 20 lines) -----" >&2
  tail -n 20 "$WORK/server.stdout" >&2 2>/dev/null || true
  echo "----- kiln stderr (last 80 lines; KILN_LOG=debug for more) -----" >&2
  tail -n 80 "$WORK/server.stderr" >&2 2>/dev/null || true
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
export KILN_LOG="${KILN_LOG:-info}"

mkdir -p "$WORK/src" "$WORK/data" "$WORK/logs"
cp -R "$SCRIPT_DIR/offline" "$WORK/src/"
readonly WS="$WORK/src/workspace-re"
bash "$SCRIPT_DIR/gen-re-workspace.sh" "$WS" >"$WORK/logs/gen.log" 2>&1 ||
  {
    cat "$WORK/logs/gen.log" >&2
    fail "gen-re-workspace.sh failed"
  }
log "$(cat "$WORK/logs/gen.log")"

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
HTTP_PORT=""
partial=""
deadline=$((SECONDS + SERVER_START_TIMEOUT))
while [[ -z "$GRPC_PORT" || -z "$HTTP_PORT" ]]; do
  if ((SECONDS >= deadline)); then
    fail "kiln did not print its gRPC and HTTP addresses within ${SERVER_START_TIMEOUT}s"
  fi
  line=""
  if IFS= read -r -t 1 -u "$SERVER_FD" line; then
    line="$partial$line"
    partial=""
    printf '%s\n' "$line" >>"$WORK/server.stdout"
    if [[ "$line" =~ ^kiln:\ grpc\ listening\ on\ 127\.0\.0\.1:([0-9]+)$ ]]; then
      GRPC_PORT="${BASH_REMATCH[1]}"
    elif [[ "$line" =~ ^kiln:\ http\ listening\ on\ 127\.0\.0\.1:([0-9]+)$ ]]; then
      HTTP_PORT="${BASH_REMATCH[1]}"
    fi
  else
    # Timed out: keep what arrived of an unfinished line.
    partial+="$line"
  fi
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    wait "$SERVER_PID" && server_rc=0 || server_rc=$?
    SERVER_PID=""
    fail "kiln exited (status $server_rc) before it was listening"
  fi
done
# Keep draining the server's stdout so it never blocks on a full pipe.
cat <&"$SERVER_FD" >>"$WORK/server.stdout" &
DRAIN_PID=$!
exec {SERVER_FD}<&-
log "kiln (pid $SERVER_PID) serves gRPC on 127.0.0.1:$GRPC_PORT, HTTP on 127.0.0.1:$HTTP_PORT"

# procs child PID | procs named NAME: lists (from /proc, one per line as
# "PID ARGS") the children of PID, or the processes whose name is NAME.
procs() {
  python3 - "$1" "$2" <<'PY'
import os
import sys

mode, arg = sys.argv[1:3]
for entry in os.listdir("/proc"):
    if not entry.isdigit():
        continue
    try:
        with open("/proc/%s/stat" % entry, encoding="utf-8", errors="replace") as f:
            stat = f.read()
        with open("/proc/%s/cmdline" % entry, "rb") as f:
            args = f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        continue  # gone meanwhile
    name = stat[stat.index("(") + 1 : stat.rindex(")")]
    ppid = stat[stat.rindex(")") + 2 :].split()[1]
    if (mode == "child" and ppid == arg) or (mode == "named" and name == arg):
        print(entry, args)
PY
}

# Number of entries in the Action Cache of the default instance (store "ac"
# of the embedded default configuration), from Kiln's /stats.
ac_entries() {
  python3 - "$HTTP_PORT" <<'PY'
import json
import sys
import urllib.request

with urllib.request.urlopen("http://127.0.0.1:%s/stats" % sys.argv[1], timeout=10) as r:
    stats = json.load(r)
try:
    print(stats["stores"]["ac"]["items"])
except (KeyError, TypeError):
    sys.exit("kiln's /stats has no stores.ac.items (the embedded default's Action Cache): %r" % stats)
PY
}

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
# No platform flags: the host platform has no exec_properties, so actions
# carry an empty Platform, which Kiln's default worker satisfies.
common_opts() {
  printf '%s\n' \
    "--remote_executor=grpc://127.0.0.1:$GRPC_PORT" \
    --spawn_strategy=remote \
    --genrule_strategy=remote \
    --noremote_local_fallback \
    --remote_timeout=60 \
    --remote_download_outputs=all \
    "--jobs=$BAZEL_JOBS" \
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
  # A warning about remote execution or the cache means something went wrong
  # even if Bazel carried on.
  if grep -Ei '(WARNING|ERROR):.*(remote|grpc|execut)' "$out" >/dev/null; then
    echo "----- remote warnings in $name -----" >&2
    grep -Ei '(WARNING|ERROR):.*(remote|grpc|execut)' "$out" | head -n 20 >&2
    fail "$name: Bazel reported remote execution problems"
  fi
  kill -0 "$SERVER_PID" 2>/dev/null || fail "kiln died during $name"
}

# check_spawns NAME EXPECT [MNEMONIC=MIN ...]: checks logs/NAME.exec.json and
# Bazel's "N processes: ..." line. EXPECT is "remote" (every spawn executed
# by Kiln: runner "remote", remotable, not a cache hit) or "hit" (every spawn
# a remote cache hit). MNEMONIC=MIN requires at least MIN spawns of that
# mnemonic. Writes the sorted action identities to logs/NAME.actions and the
# number of spawns to logs/NAME.count.
check_spawns() {
  local name="$1" expect="$2"
  shift 2
  python3 - "$WORK/logs/$name.exec.json" "$WORK/logs/$name.log" "$expect" \
    "$WORK/logs/$name.actions" "$WORK/logs/$name.count" "$@" <<'PY'
import collections
import json
import re
import sys

exec_log, bazel_log, expect, actions_out, count_out = sys.argv[1:6]
minimums = {}
for arg in sys.argv[6:]:
    mnemonic, _, n = arg.partition("=")
    minimums[mnemonic] = int(n)

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
    if s.get("remotable") is not True:
        problems.append("not remotable: " + what)
    if expect == "remote":
        if s.get("runner") != "remote":
            problems.append("did not run on Kiln's remote executor: " + what)
        if s.get("remoteCacheHit") is True:
            problems.append("remote cache hit on an empty cache: " + what)
    else:
        if s.get("runner") != "remote cache hit" or s.get("remoteCacheHit") is not True:
            problems.append("not a remote cache hit: " + what)
    if s.get("exitCode", 0) != 0:
        problems.append("exit code %s: %s" % (s.get("exitCode"), what))
    if s.get("status"):
        problems.append("status %r: %s" % (s.get("status"), what))

by_mnemonic = collections.Counter(s.get("mnemonic") for s in spawns)
for mnemonic, n in sorted(minimums.items()):
    if by_mnemonic[mnemonic] < n:
        problems.append(
            "only %d %s spawns, expected at least %d" % (by_mnemonic[mnemonic], mnemonic, n)
        )

# Bazel's summary, e.g. "INFO: 412 processes: 208 internal, 204 remote."
summary = None
with open(bazel_log, encoding="utf-8", errors="replace") as f:
    for line in f:
        m = re.search(r"INFO: (\d+) process(?:es)?(?:: (.*?))?\.?\s*$", line)
        if m:
            summary = (int(m.group(1)), m.group(2) or "")
if summary is None:
    problems.append("no 'INFO: N processes' line in the Bazel output")
else:
    kinds = {}
    for part in filter(None, (p.strip() for p in summary[1].split(","))):
        m = re.match(r"(\d+) (.+)$", part)
        if not m:
            problems.append("cannot parse process summary part %r" % part)
            continue
        kinds[m.group(2)] = int(m.group(1))
    # (Bazel 4.2's total counts actions, not spawns, so only the per-kind
    # counts are compared with the execution log.)
    kinds.pop("internal", None)
    want = "remote" if expect == "remote" else "remote cache hit"
    n = kinds.pop(want, 0)
    if kinds:
        problems.append("processes that were not %s: %r" % (want, kinds))
    if n != len(spawns):
        problems.append("%d '%s' in the summary but %d spawns in the log" % (n, want, len(spawns)))

with open(actions_out, "w", encoding="utf-8") as f:
    for s in sorted(
        "%s %s" % (s.get("mnemonic"), " ".join(sorted(s.get("listedOutputs", []))))
        for s in spawns
    ):
        f.write(s + "\n")
with open(count_out, "w", encoding="utf-8") as f:
    f.write("%d\n" % len(spawns))

print(
    "%d spawns (%s), %d remote cache hits"
    % (
        len(spawns),
        ", ".join("%s %d" % kv for kv in sorted(by_mnemonic.items())),
        sum(1 for s in spawns if s.get("remoteCacheHit") is True),
    )
)
if problems:
    for p in problems[:50]:
        print("  " + p, file=sys.stderr)
    if len(problems) > 50:
        print("  ... and %d more" % (len(problems) - 50), file=sys.stderr)
    sys.exit(1)
PY
}

# run_bazel_failing NAME OUTPUT_BASE TARGET [FLAG...]: `bazel test TARGET`,
# which must fail the way a failing test does (exit code 3), not otherwise.
run_bazel_failing() {
  local name="$1" output_base="$2" target="$3"
  shift 3
  local out="$WORK/logs/$name.log"
  local -a startup common
  mapfile -t startup < <(startup_opts "$output_base")
  mapfile -t common < <(common_opts)
  log "$name: $BAZEL test $* $target (must fail)"
  local t0=$SECONDS rc=0
  timeout --kill-after=30 "$BAZEL_TIMEOUT" \
    "$BAZEL" "${startup[@]}" test "${common[@]}" "$@" \
    "--execution_log_json_file=$WORK/logs/$name.exec.json" \
    "$target" </dev/null >"$out" 2>&1 &
  BAZEL_PID=$!
  wait "$BAZEL_PID" || rc=$?
  BAZEL_PID=""
  log "$name: exit $rc in $((SECONDS - t0))s"
  if [[ $rc -ne 3 ]]; then
    echo "----- bazel output of $name (last 80 lines) -----" >&2
    tail -n 80 "$out" >&2
    fail "$name: bazel test exited with $rc, want 3 (tests failed)"
  fi
  kill -0 "$SERVER_PID" 2>/dev/null || fail "kiln died during $name"
}

# check_failure NAME STATUS: in logs/NAME.exec.json, every spawn ran on Kiln
# or was a remote cache hit, and exactly one failed: a TestRunner spawn with
# Bazel status STATUS that Kiln executed (not a cache hit).
check_failure() {
  python3 - "$WORK/logs/$1.exec.json" "$2" <<'PY'
import json
import sys

exec_log, want_status = sys.argv[1:3]
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
failed = []
for s in spawns:
    what = "%s [%s] runner=%r status=%r exit=%r" % (
        s.get("progressMessage"),
        s.get("mnemonic"),
        s.get("runner"),
        s.get("status"),
        s.get("exitCode"),
    )
    if s.get("runner") not in ("remote", "remote cache hit") or s.get("remotable") is not True:
        problems.append("did not run on kiln: " + what)
    if s.get("status") or s.get("exitCode", 0) != 0:
        failed.append((s, what))
if len(failed) != 1:
    problems.append("%d failed spawns, want exactly 1: %r" % (len(failed), [w for _, w in failed]))
else:
    s, what = failed[0]
    if s.get("mnemonic") != "TestRunner" or s.get("status") != want_status:
        problems.append("want a TestRunner spawn with status %s: %s" % (want_status, what))
    if s.get("runner") != "remote" or s.get("remoteCacheHit") is True:
        problems.append("the failing test was not executed by kiln (a cached failure?): " + what)
print("%d spawns; failed: %s" % (len(spawns), "; ".join(w for _, w in failed)))
for p in problems:
    print("  " + p, file=sys.stderr)
sys.exit(1 if problems else 0)
PY
}

# Digest of every output that must be byte-identical between the runs: all
# files Bazel produced under bin/ and testlogs/ of every configuration, except
# the runfiles manifests (absolute paths into the output base) and
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
  local out="$WORK/logs/$name.log" t n=${#TESTS[@]}
  for t in "${TESTS[@]}"; do
    if [[ "$expect" == "cached" ]]; then
      grep -E "^$t +\(cached\) PASSED" "$out" >/dev/null ||
        fail "$name: $t was not reported '(cached) PASSED'"
    else
      grep -E "^$t +PASSED" "$out" >/dev/null ||
        fail "$name: $t was not reported PASSED"
    fi
  done
  if [[ "$expect" == "cached" ]]; then
    grep -E "Executed 0 out of $n tests: $n tests pass" "$out" >/dev/null ||
      fail "$name: expected 'Executed 0 out of $n tests' (all cached)"
  else
    grep -E "Executed $n out of $n tests: $n tests pass" "$out" >/dev/null ||
      fail "$name: expected all $n tests executed and passing"
  fi
}

# check_outputs OUTPUT_BASE: the genrules' outputs are what the generator
# computed, and the downloaded binaries run here and print the same.
check_outputs() {
  local output_base="$1"
  local bin="$output_base/execroot/$WORKSPACE_NAME/bazel-out/k8-fastbuild/bin"
  local f
  for f in calc_output.txt layers_output.txt summary.txt; do
    [[ -f "$bin/app/$f" ]] || fail "missing output app/$f"
    cmp -s "$bin/app/$f" "$WS/expected/$f" || {
      diff -u "$WS/expected/$f" "$bin/app/$f" >&2 || true
      fail "app/$f differs from what gen-re-workspace.sh computed"
    }
  done
  [[ -x "$bin/app/calc" && -x "$bin/app/layers" ]] ||
    fail "the binaries app/calc and app/layers were not downloaded as executables"
  "$bin/app/calc" 7 | cmp -s - "$WS/expected/calc_output.txt" ||
    fail "the downloaded app/calc does not print expected/calc_output.txt"
  "$bin/app/layers" 3 | cmp -s - "$WS/expected/layers_output.txt" ||
    fail "the downloaded app/layers does not print expected/layers_output.txt"
  grep -q 'int table_at(int i)' "$bin/gen/table.h" ||
    fail "gen/table.h (written by the C++ code generator) is wrong"
}

# Kiln's log must not hold warnings or errors.
check_server_log() {
  local when="$1"
  if grep -E '^[^ ]+ +(WARN|ERROR) ' "$WORK/server.stderr" >/dev/null; then
    echo "----- kiln warnings and errors -----" >&2
    grep -E '^[^ ]+ +(WARN|ERROR) ' "$WORK/server.stderr" | head -n 30 >&2
    fail "kiln logged warnings or errors $when"
  fi
}

cd "$WS"

# Run 1: empty cache; every spawn is executed by Kiln's worker.
OB1="$WORK/ob1"
run_bazel run1-build "$OB1" build
check_spawns run1-build remote CppCompile=60 CppLink=60 Genrule=5 ||
  fail "run1-build: not every spawn was executed remotely by kiln (see above)"
run_bazel run1-test "$OB1" test
check_spawns run1-test remote TestRunner=${#TESTS[@]} ||
  fail "run1-test: not every spawn was executed remotely by kiln (see above)"
check_test_summary run1-test executed
check_outputs "$OB1"
hash_outputs "$OB1" "$WORK/logs/run1.sha256"

executed=$(($(cat "$WORK/logs/run1-build.count") + $(cat "$WORK/logs/run1-test.count")))
ac1="$(ac_entries)" || fail "cannot read kiln's /stats"
# Every executed spawn succeeded, so the Execution service cached each result.
((ac1 == executed)) ||
  fail "kiln's Action Cache holds $ac1 entries after $executed remotely executed spawns"
log "run 1: $executed spawns executed remotely by kiln; $ac1 Action Cache entries"
check_server_log "during run 1"

# Run 2: a brand-new output base; every spawn must come from the cache.
OB2="$WORK/ob2"
run_bazel run2-build "$OB2" build
check_spawns run2-build hit || fail "run2-build: not every spawn was a remote cache hit (see above)"
run_bazel run2-test "$OB2" test
check_spawns run2-test hit || fail "run2-test: not every spawn was a remote cache hit (see above)"
check_test_summary run2-test cached
check_outputs "$OB2"
hash_outputs "$OB2" "$WORK/logs/run2.sha256"

for cmd in build test; do
  if ! diff -u "$WORK/logs/run1-$cmd.actions" "$WORK/logs/run2-$cmd.actions" >&2; then
    fail "$cmd: run 2 ran a different set of spawns than run 1"
  fi
done
n_outputs=$(wc -l <"$WORK/logs/run1.sha256")
((n_outputs >= 200)) || fail "only $n_outputs outputs were hashed; expected the full build"
grep -q ' \./k8-fastbuild/testlogs/tests/golden_test/test.xml$' "$WORK/logs/run1.sha256" ||
  fail "test results are missing from the hashed outputs"
if ! diff -u "$WORK/logs/run1.sha256" "$WORK/logs/run2.sha256" >&2; then
  fail "outputs of run 2 differ from run 1"
fi
ac2="$(ac_entries)" || fail "cannot read kiln's /stats"
((ac2 == ac1)) || fail "run 2 changed the Action Cache ($ac1 -> $ac2 entries)"
log "run 2: every spawn a remote cache hit; $n_outputs outputs byte-identical to run 1"

# Run 3: failures. //tests:fails_test exits 3: twice, and both times the test
# spawn must run on Kiln again (a failure is never cached) and its output
# must reach Bazel. //tests:sleeps_test outlives --test_timeout=3: Kiln must
# report the deadline (Bazel: TIMEOUT) and leave no process of it behind.
for i in 1 2; do
  run_bazel_failing "run3-fails-$i" "$OB1" //tests:fails_test
  check_failure "run3-fails-$i" NON_ZERO_EXIT ||
    fail "run3-fails-$i: unexpected execution log (see above)"
  grep -E '^//tests:fails_test +FAILED' "$WORK/logs/run3-fails-$i.log" >/dev/null ||
    fail "run3-fails-$i: //tests:fails_test was not reported FAILED"
  for stream in stdout stderr; do
    grep -q "kiln-re: fails_test $stream marker" "$WORK/logs/run3-fails-$i.log" ||
      fail "run3-fails-$i: the failing test's $stream did not reach Bazel"
  done
done
run_bazel_failing run3-timeout "$OB1" //tests:sleeps_test --test_timeout=3
check_failure run3-timeout TIMEOUT || fail "run3-timeout: unexpected execution log (see above)"
grep -E '^//tests:sleeps_test +TIMEOUT' "$WORK/logs/run3-timeout.log" >/dev/null ||
  fail "run3-timeout: //tests:sleeps_test was not reported TIMEOUT"
grep -q 'kiln-re: sleeps_test started' "$WORK/logs/run3-timeout.log" ||
  fail "run3-timeout: the output of the timed-out test did not reach Bazel"
leftover="$(procs named sleeps_test)"
[[ -z "$leftover" ]] || fail "run3-timeout: processes of the timed-out test survived: $leftover"
log "run 3: a failing test ran remotely twice (never cached); a test over its timeout was reported TIMEOUT and killed"

# Clean shutdown: SIGTERM, exit 0 in bounded time, no sandbox process left.
mapfile -t children < <(procs child "$SERVER_PID" | cut -d' ' -f1)
kill -TERM "$SERVER_PID"
wait_exit "$SERVER_PID" "$SERVER_STOP_TIMEOUT" ||
  fail "kiln did not exit within ${SERVER_STOP_TIMEOUT}s of SIGTERM"
server_rc=0
wait "$SERVER_PID" || server_rc=$?
SERVER_PID=""
((server_rc == 0)) || fail "kiln exited with status $server_rc after SIGTERM"
for pid in "${children[@]}"; do
  [[ -n "$pid" ]] || continue
  wait_exit "$pid" 5 || fail "kiln's child process $pid ($(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)) outlived it"
done
check_server_log "(whole run)"
log "kiln stopped cleanly (${#children[@]} child processes gone); every action ran through kiln's remote execution"
