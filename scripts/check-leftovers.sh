#!/usr/bin/env bash
# What the tests made on the shared local services must go with them: every test works in its
# own PostgreSQL schema, Redis key prefix and queues and removes them afterwards.
#   scripts/check-leftovers.sh snapshot FILE   lists what the services hold now into FILE
#   scripts/check-leftovers.sh since FILE      fails, naming them, if objects are there now
#                                              that FILE did not list
# The listing covers RabbitMQ's vhosts, users, queues and exchanges, Redis's keys and ACL
# users, and PostgreSQL's roles, databases, schemas and tables. Objects that were there before
# are not looked at, nor those that went away (keys expire).
set -euo pipefail

PG=postgres://postgres@127.0.0.1:5432
MANAGEMENT=http://127.0.0.1:15672/api

die() { echo "check-leftovers: $*" >&2; exit 1; }

# The names of the management API's list at $1 ('name' and, with $2 set, 'vhost' too).
rabbitmq_names() {
  curl -sf -u guest:guest "$MANAGEMENT/$1" | python3 -c '
import json, sys
for item in json.load(sys.stdin):
    print((item["vhost"] + "|" if len(sys.argv) > 1 else "") + item["name"])' ${2:+vhost} ||
    die "RabbitMQ's management API did not list $1 (is RabbitMQ running? scripts/ensure-services.sh)"
}

listing() {
  rabbitmq_names vhosts | sed 's/^/rabbitmq vhost /'
  rabbitmq_names users | sed 's/^/rabbitmq user /'
  rabbitmq_names queues vhost | sed 's/^/rabbitmq queue /'
  rabbitmq_names exchanges vhost | sed 's/^/rabbitmq exchange /'
  redis-cli --scan | sed 's/^/redis key /'
  redis-cli acl users | sed 's/^/redis acl-user /'
  psql -At "$PG/postgres" -c "SELECT rolname FROM pg_roles WHERE rolname NOT LIKE 'pg\_%'" |
    sed 's/^/postgres role /'
  local databases
  # The benchmark keeps its database (it makes it when missing); its runs' schemas go.
  databases=$(psql -At "$PG/postgres" -c \
    "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY 1")
  for db in $databases; do
    echo "postgres database $db"
    psql -At "$PG/$db" -c "
      SELECT 'postgres schema $db.' || nspname FROM pg_namespace
      WHERE nspname NOT LIKE 'pg\_%' AND nspname <> 'information_schema'
      UNION ALL
      SELECT 'postgres table $db.' || n.nspname || '.' || c.relname
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
      WHERE n.nspname NOT LIKE 'pg\_%' AND n.nspname <> 'information_schema'
        AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')"
  done | grep -v '^postgres database dedup_bench$' || true
}

case ${1:-} in
  snapshot)
    [[ -n ${2:-} ]] || die "usage: $0 snapshot FILE"
    listing | sort -u >"$2"
    ;;
  since)
    [[ -f ${2:-} ]] || die "usage: $0 since FILE (a snapshot taken before)"
    left=$(comm -13 "$2" <(listing | sort -u))
    [[ -z $left ]] || die "left behind on the shared services since the snapshot:
$left"
    echo "check-leftovers: nothing new on the shared services since the snapshot" >&2
    ;;
  *) die "usage: $0 snapshot FILE | since FILE" ;;
esac
