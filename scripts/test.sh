#!/usr/bin/env bash
# Runs the whole test suite: unit tests, gRPC integration tests over
# loopback, crash/eviction tests and the real-Bazel end-to-end test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo test --workspace --all-targets --no-fail-fast "$@"
