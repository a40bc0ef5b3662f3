#!/usr/bin/env bash
# Runs every cargo-fuzz target of Capstan's parsers for a short while (CI) or longer (by hand).
#
# Usage: fuzz/run.sh [seconds per target]   (default 20)
#
# Only the stable toolchain is needed: cargo-fuzz passes nightly-only flags to rustc, which
# RUSTC_BOOTSTRAP=1 allows on stable, and `-s none` skips the sanitizers (AddressSanitizer needs
# a nightly standard library); Rust's own checks and the targets' assertions remain, and
# libFuzzer's coverage instrumentation (-Cpasses=sancov-module) is a stable codegen flag.
# The corpora start from the repository's fixtures (engine/tests/fixtures/keptn, examples/) and
# fuzz/seeds/; they grow in fuzz/corpus/ (ignored by git). A crash leaves its input in
# fuzz/artifacts/<target>/ and fails the script; replay it with
# `RUSTC_BOOTSTRAP=1 cargo fuzz run -s none <target> fuzz/artifacts/<target>/<file>`.
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-20}"
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked
fi

targets=(definition slo cloudevent)
for t in "${targets[@]}"; do mkdir -p "corpus/$t"; done
cp ../engine/tests/fixtures/keptn/shipyard-*.yaml ../engine/tests/fixtures/keptn/remediation.yaml corpus/definition/
find ../examples -name '*.yaml' -exec cp {} corpus/definition/ \;
cp ../engine/tests/fixtures/keptn/slo-*.yaml corpus/slo/
for t in "${targets[@]}"; do cp "seeds/$t"/* "corpus/$t/"; done

cargo fuzz build -s none -O
for t in "${targets[@]}"; do
  log="artifacts/$t.log"
  mkdir -p "artifacts/$t"
  # -timeout: one input taking over 10 s is a hang; -rss_limit_mb bounds a runaway allocation.
  if ! cargo fuzz run -s none -O "$t" "corpus/$t" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
    tail -60 "$log" >&2
    echo "error: fuzz target $t failed; the input is in fuzz/artifacts/$t/" >&2
    exit 1
  fi
  runs=$(grep -o 'stat::number_of_executed_units: [0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
  corpus=$(ls "corpus/$t" | wc -l)
  echo "fuzz $t: ${seconds}s, $runs inputs, corpus $corpus, no failure"
done
