#!/usr/bin/env bash
# Starts the whole pipeline on this machine's services: builds the binaries, creates the
# `dedup` database and applies migrations, then runs ingest (:8000, admin :9100) and one
# worker (admin :9101) until Ctrl-C. Logs go to target/run-local/.
#   DATABASE_URL    the database (default postgres://postgres@127.0.0.1:5432/dedup), made
#                   when missing
#   BUILD_PROFILE   cargo's profile for the binaries (default release; dev builds faster)
# Every other setting of the two binaries (README, Configuration) is read from the
# environment as they run, e.g. AMQP_QUEUE or REDIS_PREFIX.
set -euo pipefail
# shellcheck source=scripts/lib/no-arguments.sh
. "$(dirname "$0")/lib/no-arguments.sh"
cd "$(dirname "$0")/.."
scripts/ensure-services.sh

export DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/dedup}
export LOG_FORMAT=${LOG_FORMAT:-text}
# The database's name is the URL's path; its query (TLS options, say) may hold slashes too,
# and goes with the server's address to reach the postgres database.
base=${DATABASE_URL%%\?*}
query=${DATABASE_URL#"$base"}
database=${base##*/}
admin_url=${base%/*}/postgres$query
if [[ -z $(psql -X "$admin_url" -tAc "SELECT 1 FROM pg_database WHERE datname = '$database'") ]]; then
  echo "creating database $database"
  psql -X "$admin_url" -qc "CREATE DATABASE \"$database\""
fi

profile=${BUILD_PROFILE:-release}
cargo build --profile "$profile" --locked -p ingest -p dedup-worker
# Cargo's dev profile builds into target/debug, every other into target/<profile>.
bin=${CARGO_TARGET_DIR:-target}/$([[ $profile == dev ]] && echo debug || echo "$profile")
logs=target/run-local
mkdir -p "$logs"
"$bin/dedup-worker" migrate

# Write keys on, as deployed: one key for the source "local", kept across runs in $logs.
keys=$logs/write-keys.yaml
if [[ ! -s $logs/write-key || ! -s $keys ]]; then
  "$bin/ingest" write-key --source local 2>"$logs/write-key.entry" >"$logs/write-key"
  { echo "keys:"; sed -n '/^  - source:/,$p' "$logs/write-key.entry"; } >"$keys"
fi
key=$(cat "$logs/write-key")
export AUTH=keys WRITE_KEYS_PATH=$PWD/$keys

"$bin/dedup-worker" >"$logs/worker.log" 2>&1 &
worker=$!
# As the image sets it: large buffers go back to the system at once (README, Memory bounds).
MALLOC_MMAP_THRESHOLD_=1048576 "$bin/ingest" >"$logs/ingest.log" 2>&1 &
ingest=$!
trap 'kill -TERM $ingest $worker 2>/dev/null; wait $ingest $worker 2>/dev/null; echo stopped' EXIT INT TERM

for _ in $(seq 1 50); do
  curl -fs http://127.0.0.1:9100/readyz >/dev/null && curl -fs http://127.0.0.1:9101/readyz >/dev/null && break
  sleep 0.2
done
curl -fs http://127.0.0.1:9100/readyz >/dev/null || { echo "ingest is not ready; see $logs/ingest.log"; exit 1; }
curl -fs http://127.0.0.1:9101/readyz >/dev/null || { echo "the worker is not ready; see $logs/worker.log"; exit 1; }
cat <<MSG
Pipeline running: ingest on http://127.0.0.1:8000, metrics on :9100 (ingest) and :9101 (worker).
Logs: $logs/ingest.log, $logs/worker.log. Write keys: $keys. Try:

  export DEDUP_WRITE_KEY=$key
  jq -c --arg now "\$(date -u +%FT%TZ)" '.event_datetime = \$now' samples/app_list.json |
    curl -i -H 'Content-Type: application/json' -H "Authorization: Bearer \$DEDUP_WRITE_KEY" \\
      --data-binary @- http://127.0.0.1:8000/product_events/
  psql $DATABASE_URL -c 'SELECT event_date, event_name, r, received_at FROM product_events'

Ctrl-C stops both.
MSG
wait $ingest $worker
