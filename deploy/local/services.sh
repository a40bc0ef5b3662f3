#!/usr/bin/env bash
# Makes sure the services Capstan's tests need are up on this machine: starts PostgreSQL, NATS
# (JetStream) and RabbitMQ when they are installed but stopped, and fails loudly when one is
# missing; Kafka (Tansu) it installs and starts through deploy/local/kafka.sh.
# Usage: deploy/local/services.sh [postgres] [nats] [rabbitmq] [kafka]  (default: postgres)
set -euo pipefail

want=("$@")
[ ${#want[@]} -eq 0 ] && want=(postgres)

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  local name=$1 port=$2
  for _ in $(seq 1 60); do
    port_open "$port" && return 0
    sleep 0.5
  done
  echo "error: $name did not come up on 127.0.0.1:$port" >&2
  exit 1
}

for svc in "${want[@]}"; do
  case "$svc" in
    postgres)
      if ! port_open 5432; then
        command -v pg_ctlcluster >/dev/null || { echo "error: PostgreSQL is not installed (apt-get install postgresql)" >&2; exit 1; }
        echo "starting PostgreSQL" >&2
        pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start
        wait_port PostgreSQL 5432
      fi
      ;;
    nats)
      if ! port_open 4222; then
        [ -x /usr/sbin/nats-server ] || { echo "error: nats-server is not installed (apt-get install nats-server)" >&2; exit 1; }
        echo "starting NATS with JetStream" >&2
        mkdir -p /var/lib/nats-server
        # Matched by pid file, not executable: a private nats-server of a test must not make
        # this start a no-op.
        start-stop-daemon --start --oknodo --background --make-pidfile --pidfile /tmp/capstan-shared-nats.pid \
          --startas /usr/sbin/nats-server -- \
          -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log
        wait_port NATS 4222
      fi
      ;;
    rabbitmq)
      if ! port_open 5672; then
        command -v rabbitmq-server >/dev/null || { echo "error: RabbitMQ is not installed (apt-get install rabbitmq-server)" >&2; exit 1; }
        echo "starting RabbitMQ" >&2
        rabbitmq-server -detached
        wait_port RabbitMQ 5672
      fi
      ;;
    kafka)
      "$(dirname "$0")/kafka.sh" start
      ;;
    *) echo "error: unknown service $svc" >&2; exit 1 ;;
  esac
done
