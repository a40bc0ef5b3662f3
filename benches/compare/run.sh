#!/usr/bin/env bash
# Capstan against a peer users would pick instead, on the same PostgreSQL: procrastinate (PyPI),
# N no-op jobs with C clients in a closed loop, versus `capstan bench` with PostgreSQL + the
# in-memory broker, queue dispatch and a 1-task chain, N runs with --concurrency C. Each side gets
# a fresh database per repetition; the medians and the ratio are printed as a markdown table.
#
#   benches/compare/run.sh [--jobs N] [--concurrency C] [--repeat R]
#
# The peer is installed by this script into a venv under ${XDG_CACHE_HOME:-~/.cache}/capstan-compare.
set -euo pipefail
cd "$(dirname "$0")/../.."

JOBS=2000
CONCURRENCY=64
REPEAT=3
while [ $# -gt 0 ]; do
  case "$1" in
    --jobs) JOBS="$2"; shift 2 ;;
    --concurrency) CONCURRENCY="$2"; shift 2 ;;
    --repeat) REPEAT="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

CAPSTAN="${CAPSTAN:-target/release/capstan}"
[ -x "$CAPSTAN" ] || cargo build --release -p capstan
PG="${PG_SERVER_URL:-postgres://postgres@127.0.0.1:5432}"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/capstan-compare"
VENV="$CACHE/venv"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import procrastinate, psycopg_pool" 2>/dev/null; then
  echo "installing procrastinate into $VENV" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "procrastinate>=3,<4" "psycopg[pool]>=3.1"
fi

fresh_db() {
  psql -q "$PG/postgres" -c "DROP DATABASE IF EXISTS $1 WITH (FORCE)" -c "CREATE DATABASE $1"
}

OUT="$(mktemp -d)"
for i in $(seq "$REPEAT"); do
  echo "== capstan #$i" >&2
  fresh_db capstan_cmp
  "$CAPSTAN" bench --store "$PG/capstan_cmp?sslmode=disable" --broker memory --dispatch queue --shape chain \
    --tasks 1 --runs "$JOBS" --concurrency "$CONCURRENCY" --json 2>/dev/null | tail -n 1 >>"$OUT/capstan.jsonl"
  echo "== procrastinate #$i" >&2
  fresh_db capstan_peer
  "$VENV/bin/python" benches/compare/procrastinate_peer.py --dsn "$PG/capstan_peer" --jobs "$JOBS" \
    --concurrency "$CONCURRENCY" 2>/dev/null | tail -n 1 >>"$OUT/peer.jsonl"
done
psql -q "$PG/postgres" -c "DROP DATABASE IF EXISTS capstan_cmp WITH (FORCE)" -c "DROP DATABASE IF EXISTS capstan_peer WITH (FORCE)"

python3 - "$OUT" <<'PY'
import json, statistics, sys
out = sys.argv[1]
load = lambda name: [json.loads(l) for l in open(f"{out}/{name}.jsonl") if l.strip()]
cap, peer = load("capstan"), load("peer")
med = lambda rows, key: statistics.median(r[key] for r in rows if r.get(key) is not None)
rows = [
    ("capstan (PostgreSQL + memory broker, queue, 1 task)", med(cap, "tasks_per_s"), med(cap, "run_p50_ms"),
     med(cap, "run_p99_ms"), med(cap, "server_cpu_s"), med(cap, "postgres_cpu_s")),
    (f"procrastinate {peer[0]['version']}", med(peer, "jobs_per_s"), med(peer, "p50_ms"), med(peer, "p99_ms"),
     med(peer, "client_cpu_s"), med(peer, "postgres_cpu_s")),
]
print(f"{len(cap)} x {cap[0]['runs']} jobs, concurrency {cap[0]['config']['concurrency']}, medians")
print("| system | jobs/s | p50 ms (submit -> done) | p99 ms | process CPU s | PostgreSQL CPU s |")
print("|---|---|---|---|---|---|")
for name, rate, p50, p99, cpu, pg in rows:
    print(f"| {name} | {rate:,.0f} | {p50:.0f} | {p99:.0f} | {cpu:.2f} | {pg:.2f} |")
print(f"\nratio capstan / procrastinate: {rows[0][1] / rows[1][1]:.2f}x")
PY
