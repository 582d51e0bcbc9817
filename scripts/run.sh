#!/usr/bin/env bash
# Builds Kiln and runs it on its embedded default configuration: an
# all-in-one cache on 127.0.0.1:50051 with a disk CAS and Action Cache
# under the data directory it prints. Extra arguments go to `kiln`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo build --release -p kiln
exec "${CARGO_TARGET_DIR:-target}/release/kiln" "$@"
