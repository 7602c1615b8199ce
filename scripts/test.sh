#!/usr/bin/env bash
# The whole test suite, as CI runs it (`.ci/run` calls this script).
# Fetches what the tests need from the package registries into .cache/ first.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --locked "$@"
