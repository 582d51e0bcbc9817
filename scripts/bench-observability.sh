#!/usr/bin/env bash
# Measures what metrics and logging cost on the cache-hit Execute path
# (docs/benchmarks.md, "Metrics and logging overhead").
#
#   scripts/bench-observability.sh MODE SERVER...
#
# SERVER is one of
#   on     the embedded default: metrics on, info logs, human format
#   off    the same config with [server] metrics = false, --log-level off
#   spans  metrics on, --log-level info,kiln::grpc=debug (per-call spans on)
# All servers start at once (fresh data directories, ephemeral ports).
# MODE "together" runs `kiln-bench --scenario exec-cache-hit` against every
# server at the same time, ROUNDS times, so they share the same machine
# load; MODE "rotate" runs them one after the other, rotating the order
# every round. Prints one line per run: round, server, Executes/s, server
# CPU µs per Execute, errors, 1-minute load average.
#
# Environment: ROUNDS (5), DUR (15s), K (directory of release `kiln` and
# `kiln-bench`, default ${CARGO_TARGET_DIR:-target}/release).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:?usage: $0 together|rotate SERVER...}
shift
[ $# -ge 1 ] || { echo "usage: $0 together|rotate SERVER..." >&2; exit 2; }
ROUNDS=${ROUNDS:-5}
DUR=${DUR:-15s}
K=${K:-${CARGO_TARGET_DIR:-target}/release}
WORK=$(mktemp -d)
"$K/kiln" default-config > "$WORK/on.toml"
sed 's/^\[server\]$/[server]\nmetrics = false/' "$WORK/on.toml" > "$WORK/off.toml"
grep -q '^metrics = false' "$WORK/off.toml"

declare -A PID PORT
cleanup() {
  for n in "${!PID[@]}"; do kill "${PID[$n]}" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

start() {
  local name=$1 cfg args=()
  case $name in
    on) cfg=on.toml ;;
    off) cfg=off.toml; args=(--log-level off) ;;
    spans) cfg=on.toml; args=(--log-level info,kiln::grpc=debug) ;;
    *) echo "unknown server $name" >&2; exit 2 ;;
  esac
  mkdir -p "$WORK/data-$name"
  "$K/kiln" serve --config "$WORK/$cfg" --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 \
    --data-dir "$WORK/data-$name" "${args[@]}" > "$WORK/$name.out" 2> "$WORK/$name.err" &
  PID[$name]=$!
}
for n in "$@"; do start "$n"; done
for n in "$@"; do
  for _ in $(seq 1 150); do grep -q 'grpc listening' "$WORK/$n.out" && break; sleep 0.2; done
  PORT[$n]=$(grep -o 'grpc listening on 127.0.0.1:[0-9]*' "$WORK/$n.out" | cut -d: -f2)
done

bench() {
  local n=$1 round=$2 out rate cpu err
  out=$("$K/kiln-bench" --endpoint "http://127.0.0.1:${PORT[$n]}" --server-pid "${PID[$n]}" \
    --scenario exec-cache-hit --duration "$DUR" --request-metadata --markdown 2>&1)
  rate=$(echo "$out" | grep 'cache-hit Executes' | awk -F'|' '{print $4}' | tr -d ' ,' | sed 's|Executes/s||')
  cpu=$(echo "$out" | grep 'server CPU per Execute' | awk -F'|' '{print $4}' | tr -d ' ' | sed 's/µs//')
  err=$(echo "$out" | grep '| errors' | awk -F'|' '{print $4}' | tr -d ' ')
  echo "$round $n $rate $cpu $err $(cut -d' ' -f1 /proc/loadavg)"
}

echo "round server executes_per_s cpu_us_per_execute errors loadavg1"
servers=("$@")
for r in $(seq 1 "$ROUNDS"); do
  if [ "$MODE" = together ]; then
    pids=()
    for n in "${servers[@]}"; do bench "$n" "$r" > "$WORK/row-$n" & pids+=($!); done
    wait "${pids[@]}"
    for n in "${servers[@]}"; do cat "$WORK/row-$n"; done
  else
    k=$(( (r - 1) % ${#servers[@]} ))
    for n in "${servers[@]:$k}" "${servers[@]:0:$k}"; do bench "$n" "$r"; done
  fi
done
