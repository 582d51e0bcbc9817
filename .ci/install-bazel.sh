#!/usr/bin/env bash
# Installs what tests/bazel/run.sh (and crates/kiln/tests/bazel.rs)
# needs: Debian's Bazel 4.2.3 as `bazel-4` (package bazel-bootstrap, which
# brings a JDK, build-essential and python3 with it), plus the few tools the
# driver script uses. Idempotent: does nothing when everything is present.
set -euo pipefail

need=()
command -v bazel-4 >/dev/null 2>&1 || need+=(bazel-bootstrap)
command -v python3 >/dev/null 2>&1 || need+=(python3)
command -v g++ >/dev/null 2>&1 || need+=(build-essential)
command -v timeout >/dev/null 2>&1 || need+=(coreutils)

if [[ ${#need[@]} -eq 0 ]]; then
  echo "install-bazel: bazel-4 already installed (bazel-bootstrap $(dpkg-query -W -f='${Version}' bazel-bootstrap 2>/dev/null || echo '?'))"
  exit 0
fi

SUDO=""
if [[ "$(id -u)" -ne 0 ]]; then
  command -v sudo >/dev/null 2>&1 || {
    echo "install-bazel: need root (or sudo) to install: ${need[*]}" >&2
    exit 1
  }
  SUDO="sudo"
fi

echo "install-bazel: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${need[@]}"
command -v bazel-4 >/dev/null 2>&1 || {
  echo "install-bazel: bazel-4 is still missing after installing bazel-bootstrap" >&2
  exit 1
}
echo "install-bazel: installed bazel-bootstrap $(dpkg-query -W -f='${Version}' bazel-bootstrap 2>/dev/null || echo '?')"
