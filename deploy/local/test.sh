#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it: starts the services the tests need, then runs every
# test of the workspace with all features in one build.
set -euo pipefail
cd "$(dirname "$0")/../.."

deploy/local/services.sh postgres nats rabbitmq kafka

export CAPSTAN_TEST_POSTGRES_URL="${CAPSTAN_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/test?sslmode=disable}"

if command -v cargo-nextest >/dev/null 2>&1; then
  cargo nextest run --workspace --all-features --locked --no-fail-fast
  # nextest does not run doc tests.
  cargo test --workspace --all-features --locked --doc
else
  cargo test --workspace --all-features --locked --no-fail-fast
fi
fuzz/run.sh 20 # every fuzz target for 20 s (cargo-fuzz on the stable toolchain)
