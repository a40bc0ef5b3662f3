#!/usr/bin/env bash
# Runs every libFuzzer target of Capstan's parsers for a short while (CI) or longer (by hand).
#
# Usage: fuzz/run.sh [seconds per target]   (default 20)
#
# The targets are cargo-fuzz targets (fuzz/Cargo.toml, libfuzzer-sys), built here with plain
# cargo and the coverage flags cargo-fuzz passes, so CI does not compile cargo-fuzz itself on
# every clean run. Only the stable toolchain is needed: libFuzzer's coverage instrumentation
# (-Cpasses=sancov-module and the sanitizer-coverage LLVM options) is stable codegen, and no
# sanitizer is used (AddressSanitizer needs a nightly standard library); Rust's own checks and
# the targets' assertions remain. The corpora start from the repository's fixtures
# (engine/tests/fixtures/keptn, examples/) and fuzz/seeds/; they grow in fuzz/corpus/ (ignored
# by git). A crash leaves its input in fuzz/artifacts/<target>/ and fails the script; replay it
# with `fuzz/run.sh --replay <target> fuzz/artifacts/<target>/<file>` (or, with cargo-fuzz
# installed, `cargo fuzz run -s none <target> <file>`).
set -euo pipefail
if [ "${1:-}" = "--replay" ]; then
  [ $# -eq 3 ] || { echo "usage: fuzz/run.sh --replay <target> <input file>" >&2; exit 2; }
  replay_target=$2
  replay_input=$(realpath "$3")
fi
cd "$(dirname "$0")"

host=$(rustc -vV | sed -n 's/^host: //p')
# The flags cargo-fuzz 0.13 passes for `cargo fuzz build -s none -O` (read off its --verbose
# output): coverage, trace-compares, no branch folding, the stack depth on Linux, one codegen
# unit so that the instrumented code still inlines.
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cllvm-args=-simplifycfg-branch-fold-threshold=0 \
-Cllvm-args=-sanitizer-coverage-stack-depth -Ccodegen-units=1 --cfg fuzzing ${RUSTFLAGS:-}"
# --target keeps these flags away from build scripts and proc macros.
build() {
  cargo build --locked --release --bins --target "$host" --config profile.release.debug=true
}
bin_dir="target/$host/release"

if [ -n "${replay_target:-}" ]; then
  build
  exec "$bin_dir/$replay_target" "$replay_input"
fi
seconds="${1:-20}"

targets=(definition slo cloudevent)
for t in "${targets[@]}"; do mkdir -p "corpus/$t"; done
cp ../engine/tests/fixtures/keptn/shipyard-*.yaml ../engine/tests/fixtures/keptn/remediation.yaml corpus/definition/
find ../examples -name '*.yaml' -exec cp {} corpus/definition/ \;
cp ../engine/tests/fixtures/keptn/slo-*.yaml corpus/slo/
for t in "${targets[@]}"; do cp "seeds/$t"/* "corpus/$t/"; done

build
for t in "${targets[@]}"; do
  log="artifacts/$t.log"
  mkdir -p "artifacts/$t"
  # -timeout: one input taking over 10 s is a hang; -rss_limit_mb bounds a runaway allocation.
  if ! "$bin_dir/$t" -artifact_prefix="artifacts/$t/" "corpus/$t" \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
    tail -60 "$log" >&2
    echo "error: fuzz target $t failed; the input is in fuzz/artifacts/$t/ (fuzz/run.sh --replay $t <file>)" >&2
    exit 1
  fi
  runs=$(grep -o 'stat::number_of_executed_units: [0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
  corpus=$(ls "corpus/$t" | wc -l)
  echo "fuzz $t: ${seconds}s, $runs inputs, corpus $corpus, no failure"
done
