#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks to build and test Kiln.
# Idempotent: skips what is already present.
set -euo pipefail

need_apt=()
command -v cc >/dev/null 2>&1 || need_apt+=(build-essential)
command -v bazel-4 >/dev/null 2>&1 || need_apt+=(bazel-bootstrap)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
if [ -x .ci/install-bazel.sh ] || [ -f .ci/install-bazel.sh ]; then
  bash .ci/install-bazel.sh
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install Rust (rustup) first" >&2
  exit 1
fi
