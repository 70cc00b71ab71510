#!/usr/bin/env bash
# What the tests made on the shared local services must go with them: every test works in its
# own PostgreSQL schema, Redis key prefix and queues and removes them afterwards.
#   scripts/check-leftovers.sh snapshot FILE   lists what the services hold now into FILE
#   scripts/check-leftovers.sh since FILE      fails, naming them, if objects are there now
#                                              that FILE did not list
# The listing covers RabbitMQ's vhosts, users, queues and exchanges, Redis's keys and ACL
# users, and PostgreSQL's roles, databases, schemas and tables. Objects that were there before
# are not looked at, nor those that went away (keys expire). A service that cannot be read
# fails either mode: a partial listing would hide what that service holds.
# The services are the shared local ones; CHECK_LEFTOVERS_POSTGRES (a URL without database),
# CHECK_LEFTOVERS_REDIS (a URL) and CHECK_LEFTOVERS_RABBITMQ_API (the management API's URL)
# point the check elsewhere, as its own test does; CHECK_LEFTOVERS_WAIT (seconds, 30) is how
# long a service may take to answer.
set -euo pipefail

PG=${CHECK_LEFTOVERS_POSTGRES:-postgres://postgres@127.0.0.1:5432}
REDIS=${CHECK_LEFTOVERS_REDIS:-redis://127.0.0.1:6379}
MANAGEMENT=${CHECK_LEFTOVERS_RABBITMQ_API:-http://127.0.0.1:15672/api}
WAIT=${CHECK_LEFTOVERS_WAIT:-30}

die() { echo "check-leftovers: $*" >&2; exit 1; }

# Prints each line the command "${@:2}" prints, after the tag $1; ends the script (or the
# command substitution it runs in) when the command fails, so nothing is silently left out.
listed() {
  local tag=$1 out status=0
  shift
  out=$("$@") || status=$?
  case $status in
    0) ;;
    124) die "could not list the ${tag}s: no answer within $WAIT s (is the service hung?)" ;;
    *) die "could not list the ${tag}s (is the service running? scripts/ensure-services.sh)" ;;
  esac
  if [[ -n $out ]]; then
    printf '%s\n' "$out" | sed "s/^/$tag /"
  fi
}

# The names in the management API's list at $1 ('name' and, with $2 set, 'vhost|name').
rabbitmq_names() {
  local json
  json=$(timeout "$WAIT" curl -sSf -u guest:guest "$MANAGEMENT/$1") || return
  python3 -c '
import json, sys
for item in json.load(sys.stdin):
    print((item["vhost"] + "|" if len(sys.argv) > 1 else "") + item["name"])' ${2:+vhost} <<<"$json"
}

psql_rows() { timeout "$WAIT" psql -X -w -At "$PG/$1" -c "$2"; }
redis() { timeout "$WAIT" redis-cli -u "$REDIS" "$@"; }

listing() {
  listed "rabbitmq vhost" rabbitmq_names vhosts
  listed "rabbitmq user" rabbitmq_names users
  listed "rabbitmq queue" rabbitmq_names queues vhost
  listed "rabbitmq exchange" rabbitmq_names exchanges vhost
  listed "redis key" redis --scan
  listed "redis acl-user" redis acl users
  listed "postgres role" psql_rows postgres "SELECT rolname FROM pg_roles WHERE rolname NOT LIKE 'pg\_%'"
  local databases db
  databases=$(listed database psql_rows postgres \
    "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY 1") ||
    exit 1
  while read -r _ db; do
    echo "postgres database $db"
    listed postgres psql_rows "$db" "
      SELECT 'schema $db.' || nspname FROM pg_namespace
      WHERE nspname NOT LIKE 'pg\_%' AND nspname <> 'information_schema'
      UNION ALL
      SELECT 'table $db.' || n.nspname || '.' || c.relname
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
      WHERE n.nspname NOT LIKE 'pg\_%' AND n.nspname <> 'information_schema'
        AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')"
  done <<<"$databases"
}

# What stays by design: the benchmark's database (it makes it when missing), with the schema
# every new database has. The schemas of its runs go.
kept=("postgres database dedup_bench" "postgres schema dedup_bench.public")

# The listing, sorted, without what stays by design; ends the script when a service fails it.
current() {
  local now
  now=$(listing) || exit 1
  # grep's status 1 only says that every line was kept.
  grep -vxF -f <(printf '%s\n' "${kept[@]}") <<<"$now" | sort -u || (($? == 1))
}

case ${1:-} in
  snapshot)
    [[ -n ${2:-} ]] || die "usage: $0 snapshot FILE"
    now=$(current) || exit 1
    printf '%s\n' "$now" >"$2"
    ;;
  since)
    [[ -f ${2:-} ]] || die "usage: $0 since FILE (a snapshot taken before)"
    now=$(current) || exit 1
    left=$(comm -13 "$2" <(printf '%s\n' "$now"))
    [[ -z $left ]] || die "left behind on the shared services since the snapshot:
$left"
    echo "check-leftovers: nothing new on the shared services since the snapshot" >&2
    ;;
  *) die "usage: $0 snapshot FILE | since FILE" ;;
esac
