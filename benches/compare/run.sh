#!/usr/bin/env bash
# Capstan against the systems users would pick instead, on the same machine and PostgreSQL, in
# one invocation: N no-op jobs with C clients in a closed loop (each submits one job and waits
# until it has run before submitting the next).
#   - capstan: `capstan bench` with PostgreSQL, queue dispatch (or --dispatch claim-free: queue
#     offers that carry their token, at-least-once like the job queues), a 1-task chain, N runs
#     with --concurrency C; once with the in-memory broker, once with RabbitMQ (the broker Celery
#     uses);
#   - procrastinate (PyPI), a PostgreSQL job queue;
#   - Celery (PyPI) on RabbitMQ, `rpc://` result backend, a threads-pool worker with C threads;
#   - Graphile Worker (npm), a PostgreSQL job queue, worker concurrency C, with its defaults
#     (`graphile`) and with the batching options of its performance page (`graphile-batched`:
#     a local queue of C + 1 jobs, job completions flushed in batches).
# Every PostgreSQL-backed system gets a fresh database per repetition; the medians and the ratio
# Capstan / best peer are printed as a markdown table.
#
#   benches/compare/run.sh [--jobs N] [--concurrency C] [--repeat R] [--dispatch queue|claim-free]
#                          [--peers "procrastinate celery graphile graphile-batched"]
#
# The peers are installed by this script under ${XDG_CACHE_HOME:-~/.cache}/capstan-compare: a
# Python venv (procrastinate, celery) and an npm folder (graphile-worker).
# Env: CAPSTAN (the binary), PG_SERVER_URL (postgres://user@host:port, no database),
# AMQP_URL (default amqp://guest:guest@127.0.0.1:5672/%2f).
set -euo pipefail
cd "$(dirname "$0")/../.."

JOBS=2000
CONCURRENCY=64
REPEAT=3
DISPATCH=queue
PEERS="procrastinate celery graphile graphile-batched"
while [ $# -gt 0 ]; do
  case "$1" in
    --jobs) JOBS="$2"; shift 2 ;;
    --concurrency) CONCURRENCY="$2"; shift 2 ;;
    --repeat) REPEAT="$2"; shift 2 ;;
    --peers) PEERS="$2"; shift 2 ;;
    --dispatch) DISPATCH="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
has_peer() { [[ " $PEERS " == *" $1 "* ]]; }

CAPSTAN="${CAPSTAN:-target/release/capstan}"
[ -x "$CAPSTAN" ] || cargo build --release -p capstan
PG="${PG_SERVER_URL:-postgres://postgres@127.0.0.1:5432}"
AMQP="${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/capstan-compare"
VENV="$CACHE/venv"
NODE_DIR="$CACHE/graphile"
if ! "$VENV/bin/python" -c "import procrastinate, psycopg_pool, celery" 2>/dev/null; then
  echo "installing procrastinate and celery into $VENV" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "procrastinate>=3,<4" "psycopg[pool]>=3.1" "celery>=5.3,<6"
fi
GRAPHILE_VERSION=0.18.0
if { has_peer graphile || has_peer graphile-batched; } && [ "$(node -p "require('$NODE_DIR/node_modules/graphile-worker/package.json').version" 2>/dev/null)" != "$GRAPHILE_VERSION" ]; then
  echo "installing graphile-worker $GRAPHILE_VERSION into $NODE_DIR" >&2
  mkdir -p "$NODE_DIR"
  (cd "$NODE_DIR" && { [ -f package.json ] || npm init -y >/dev/null; } && npm install --silent "graphile-worker@$GRAPHILE_VERSION")
fi

fresh_db() {
  psql -q "$PG/postgres" -c "DROP DATABASE IF EXISTS $1 WITH (FORCE)" -c "CREATE DATABASE $1" 2>/dev/null
}

OUT="$(mktemp -d)"
for i in $(seq "$REPEAT"); do
  for broker in memory rabbitmq; do
    echo "== capstan ($broker broker) #$i" >&2
    fresh_db capstan_cmp
    "$CAPSTAN" bench --store "$PG/capstan_cmp?sslmode=disable" --broker "$broker" --broker-url "$([ "$broker" = rabbitmq ] && echo "$AMQP")" \
      --dispatch "$DISPATCH" --shape chain --tasks 1 --runs "$JOBS" --concurrency "$CONCURRENCY" --json 2>/dev/null \
      | tail -n 1 >>"$OUT/capstan-$broker.jsonl"
  done
  if has_peer procrastinate; then
    echo "== procrastinate #$i" >&2
    fresh_db capstan_peer
    "$VENV/bin/python" benches/compare/procrastinate_peer.py --dsn "$PG/capstan_peer" --jobs "$JOBS" \
      --concurrency "$CONCURRENCY" 2>/dev/null | tail -n 1 >>"$OUT/procrastinate.jsonl"
  fi
  if has_peer celery; then
    echo "== celery #$i" >&2
    CELERY_PEER_BROKER="$AMQP" "$VENV/bin/python" benches/compare/celery_peer.py --jobs "$JOBS" \
      --concurrency "$CONCURRENCY" 2>/dev/null | tail -n 1 >>"$OUT/celery.jsonl"
  fi
  if has_peer graphile; then
    echo "== graphile-worker #$i" >&2
    fresh_db capstan_peer
    NODE_PATH="$NODE_DIR/node_modules" node benches/compare/graphile_peer.cjs --dsn "$PG/capstan_peer" \
      --jobs "$JOBS" --concurrency "$CONCURRENCY" 2>/dev/null | tail -n 1 >>"$OUT/graphile.jsonl"
  fi
  if has_peer graphile-batched; then
    echo "== graphile-worker, batched #$i" >&2
    fresh_db capstan_peer
    NODE_PATH="$NODE_DIR/node_modules" node benches/compare/graphile_peer.cjs --dsn "$PG/capstan_peer" \
      --jobs "$JOBS" --concurrency "$CONCURRENCY" --batched 2>/dev/null | tail -n 1 >>"$OUT/graphile-batched.jsonl"
  fi
done
psql -q "$PG/postgres" -c "DROP DATABASE IF EXISTS capstan_cmp WITH (FORCE)" -c "DROP DATABASE IF EXISTS capstan_peer WITH (FORCE)"
echo "results: $OUT" >&2
python3 benches/compare/peers_table.py "$OUT"
