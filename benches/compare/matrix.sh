#!/usr/bin/env bash
# Runs `capstan bench` over stores x dispatch x shape, REPEAT times each, and prints a markdown
# table of medians (the table in docs/performance.md). PostgreSQL gets a fresh database per run.
#
#   benches/compare/matrix.sh [--duration SECS] [--repeat N] [--stores "sqlite postgres"]
#
# Env: CAPSTAN (the binary; default target/release/capstan), PG_ADMIN_URL (a database to issue
# CREATE/DROP DATABASE from; default the local server's `postgres` database).
set -euo pipefail
cd "$(dirname "$0")/../.."

DURATION=10
REPEAT=3
STORES="sqlite postgres"
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) DURATION="$2"; shift 2 ;;
    --repeat) REPEAT="$2"; shift 2 ;;
    --stores) STORES="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

CAPSTAN="${CAPSTAN:-target/release/capstan}"
[ -x "$CAPSTAN" ] || cargo build --release -p capstan
PG_ADMIN_URL="${PG_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable}"
PG_BENCH_DB="${PG_BENCH_DB:-capstan_bench}"
PG_BENCH_URL="postgres://postgres@127.0.0.1:5432/${PG_BENCH_DB}?sslmode=disable"
OUT="$(mktemp -d)/matrix.jsonl"

fresh_pg() {
  psql -q "$PG_ADMIN_URL" -c "DROP DATABASE IF EXISTS ${PG_BENCH_DB} WITH (FORCE)" -c "CREATE DATABASE ${PG_BENCH_DB}"
}

for store in $STORES; do
  for dispatch in queue auction; do
    for shape in chain fanout; do
      for i in $(seq "$REPEAT"); do
        args=(bench --duration "$DURATION" --dispatch "$dispatch" --shape "$shape" --json)
        if [ "$store" = postgres ]; then
          fresh_pg
          args+=(--store "$PG_BENCH_URL")
        fi
        echo "== $store $dispatch $shape #$i" >&2
        "$CAPSTAN" "${args[@]}" 2>/dev/null | tail -n 1 >>"$OUT"
      done
    done
  done
done
echo "results: $OUT" >&2
python3 benches/compare/table.py "$OUT"
