#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks to build and test Kiln.
# Idempotent: skips what is already present.
set -euo pipefail

need_apt=()
command -v cc >/dev/null 2>&1 || need_apt+=(build-essential)
command -v bazel-4 >/dev/null 2>&1 || need_apt+=(bazel-bootstrap)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
# The dashboard's browser test drives Debian's chromium with Node.
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
command -v node >/dev/null 2>&1 || need_apt+=(nodejs npm)
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
if [ -x .ci/install-bazel.sh ] || [ -f .ci/install-bazel.sh ]; then
  bash .ci/install-bazel.sh
fi
# playwright-core for the dashboard test (it downloads no browser: the
# test uses /usr/bin/chromium).
if [ ! -d tests/dashboard/node_modules/playwright-core ]; then
  (cd tests/dashboard && npm ci --no-audit --no-fund --loglevel=error)
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install Rust (rustup) first" >&2
  exit 1
fi
