#!/usr/bin/env bash
# Makes sure the local PostgreSQL, Redis and RabbitMQ the pipeline and its tests use are up,
# starting (or, on a bare Debian machine, installing) whichever is not. Idempotent.
set -euo pipefail
# shellcheck source=scripts/lib/no-arguments.sh
. "$(dirname "$0")/lib/no-arguments.sh"

log() { printf '[ensure-services] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() { # name port seconds
  local name=$1 port=$2 seconds=$3
  for _ in $(seq 1 "$((seconds * 4))"); do
    port_open "$port" && return 0
    sleep 0.25
  done
  die "$name did not open 127.0.0.1:$port within ${seconds}s"
}

# The servers come from Debian's packages where missing; without them nothing can be tested.
apt_install() { "$(dirname "$0")/apt-install.sh" ensure-services "$@" || exit 1; }

# PostgreSQL (trust auth on 127.0.0.1, as this machine kind is set up).
if ! port_open 5432; then
  command -v pg_ctlcluster >/dev/null || apt_install postgresql
  version=$(find /etc/postgresql -mindepth 1 -maxdepth 1 -type d -printf '%f\n' | sort -V | tail -1)
  log "starting PostgreSQL $version"
  pg_ctlcluster --skip-systemctl-redirect "$version" main start || pg_ctlcluster "$version" main start
  wait_for PostgreSQL 5432 60
fi

# Redis (no persistence: it is a cache).
if ! port_open 6379; then
  command -v redis-server >/dev/null || apt_install redis-server
  log "starting Redis"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
  wait_for Redis 6379 30
fi

# RabbitMQ, with the management API (queue depth for the operator and the metrics).
if ! port_open 5672; then
  command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
  log "starting RabbitMQ"
  rabbitmq-server -detached
  wait_for RabbitMQ 5672 120
fi
if ! port_open 15672; then
  log "enabling the RabbitMQ management plugin"
  rabbitmq-plugins enable --quiet rabbitmq_management >/dev/null
  wait_for "RabbitMQ management API" 15672 60
fi
log "PostgreSQL, Redis and RabbitMQ are up"
