#!/usr/bin/env bash
# Runs every test of the project against the local PostgreSQL, Redis and RabbitMQ (started if
# they are down), checks the monitoring, compose and Helm chart files, and builds the release
# images and runs the pipeline from them (installing podman as root on Debian). This is the
# README's test command and what CI runs. Each part's start is printed with the seconds since
# the start.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
part() { printf '\n--- test.sh: %s (%ss)\n' "$*" "$(( $(date +%s) - start ))" >&2; }
# Runs "${@:3}", which must exit with status $1 and say something matching $2; otherwise the
# tests fail.
expect_exit() {
  local expected=$1 want=$2 status=0 out
  shift 2
  out=$("$@" 2>&1) || status=$?
  if [ "$status" != "$expected" ] || ! grep -q -- "$want" <<<"$out"; then
    echo "!!! $* exited $status, expected $expected and '$want'; it said: $out" >&2
    exit 1
  fi
}
part "services"
scripts/ensure-services.sh
# What the shared services hold before the tests: whatever is new at the end was left behind.
snapshot=$(mktemp)
# The image check runs beside the tests (below); a run that ends early stops it, and its
# cleanup removes what its build and pipeline had made.
image_check=
on_exit() {
  if [ -n "$image_check" ] && kill -0 "$image_check" 2>/dev/null; then
    kill -TERM "$image_check"
    wait "$image_check" || true
  fi
  rm -f "$snapshot" "$snapshot".*
}
trap on_exit EXIT
scripts/check-leftovers.sh snapshot "$snapshot"
part "the leftover check"
# The check itself: it names what was left, and a service it cannot read (a closed port, or
# one that never answers) fails it rather than hiding that service's objects.
probe="check-leftovers-probe-$$"
redis-cli set "$probe" 1 >/dev/null
status=0
(expect_exit 1 "redis key $probe" scripts/check-leftovers.sh since "$snapshot") || status=$?
redis-cli del "$probe" >/dev/null
[ "$status" = 0 ] || exit "$status"
# The benchmark's database stays by design, also where it was made after the snapshot, as on
# a new machine's first run (made here when missing; otherwise the snapshot is taken as if
# from before it).
if [ -z "$(psql -X -At postgres://postgres@127.0.0.1:5432/postgres \
  -c "SELECT 1 FROM pg_database WHERE datname = 'dedup_bench'")" ]; then
  psql -X -q postgres://postgres@127.0.0.1:5432/postgres -c "CREATE DATABASE dedup_bench"
fi
grep -vxF -e "postgres database dedup_bench" -e "postgres schema dedup_bench.public" \
  "$snapshot" >"$snapshot.new" || true
scripts/check-leftovers.sh since "$snapshot.new"
rm "$snapshot.new"
for closed in CHECK_LEFTOVERS_POSTGRES=postgres://postgres@127.0.0.1:1 \
  CHECK_LEFTOVERS_REDIS=redis://127.0.0.1:1 CHECK_LEFTOVERS_RABBITMQ_API=http://127.0.0.1:1/api; do
  expect_exit 1 "could not list" env "$closed" scripts/check-leftovers.sh since "$snapshot"
  expect_exit 1 "could not list" env "$closed" scripts/check-leftovers.sh snapshot "$snapshot.new"
  [ ! -e "$snapshot.new" ] || { echo "!!! a failed snapshot wrote $snapshot.new" >&2; exit 1; }
done
python3 -c 'import socket, time; s = socket.create_server(("127.0.0.1", 0)); print(s.getsockname()[1], flush=True); time.sleep(60)' >"$snapshot.port" &
silent=$!
for _ in $(seq 100); do [ -s "$snapshot.port" ] && break; sleep 0.1; done
status=0
(expect_exit 1 "no answer within 2 s" env CHECK_LEFTOVERS_WAIT=2 \
  CHECK_LEFTOVERS_REDIS="redis://127.0.0.1:$(cat "$snapshot.port")" \
  scripts/check-leftovers.sh since "$snapshot") || status=$?
kill "$silent"
[ "$status" = 0 ] || exit "$status"
part "the scripts' arguments"
# The scripts that take no arguments refuse one before they start anything (kind-up.sh would
# make a cluster), and answer --help with their opening comment.
for script in run-local kind-up minikube-up ensure-services check-monitoring check-apt-install; do
  expect_exit 2 "takes no arguments, got '--dry-run'" "scripts/$script.sh" --dry-run
done
expect_exit 0 "creates a kind cluster" scripts/kind-up.sh --help
expect_exit 2 "'--dry-run' is not a URL" scripts/cluster/install.sh --dry-run
# The test runs' deadline (scripts/with-deadline.sh): a command's own status before it; past
# it, where each of its processes waits (gdb, from Debian where it is missing), then it and
# every process under it are killed and the status is 124.
command -v gdb >/dev/null || scripts/apt-install.sh test gdb
expect_exit 2 "'soon' is not a duration" scripts/with-deadline.sh soon true
expect_exit 3 "three" scripts/with-deadline.sh 1m sh -c 'echo three; exit 3'
status=0
out=$(scripts/with-deadline.sh 2s sh -c 'sleep 31.5; echo woke' 2>&1) || status=$?
if [ "$status" != 124 ] || ! grep -q "did not finish within 2s" <<<"$out" ||
  ! grep -q "^#0 .*sleep" <<<"$out" || pgrep -f "sleep 31.5" >/dev/null; then
  echo "!!! with-deadline.sh past its deadline exited $status, and said: $out" >&2
  exit 1
fi
# What a new machine lacks comes from Debian's packages through scripts/apt-install.sh: its
# outcomes (not root, a package apt cannot find, dpkg's lock held) against the real apt-get.
part "the package installer"
scripts/check-apt-install.sh
part "monitoring files"
# The monitoring files first: quick, and it installs Prometheus, which a system test runs.
scripts/check-monitoring.sh
# The binaries first: services/system-tests runs them as processes (target/debug/ingest, …).
part "build"
cargo build --workspace --locked --bins --tests
# The image, built from the Dockerfile and run (scripts/check-image.sh), with podman installed
# first where it is missing (as root on Debian; a failed install fails the tests). Its release
# build is most of its time, and the tests below leave much of the CPU idle (they wait on
# timeouts and on the services), so it runs beside them, its build at the lowest priority.
# Its lines come in between, marked [check-image]; "the image" below waits for its result.
part "the image check, started beside the tests"
# A mistyped mode is refused, not taken for a full check of many minutes.
expect_exit 2 "unknown argument '--interupted'" scripts/check-image.sh --interupted
installed=0
scripts/check-image.sh --can-run || scripts/check-image.sh --install || installed=$?
[ "$installed" = 0 ] || [ "$installed" = 3 ] || exit "$installed"
if scripts/check-image.sh --can-run; then
  scripts/check-image.sh &
  image_check=$!
fi
# A hung test fails loudly after 20 minutes, showing where it waits, instead of running into
# CI's limit (each of the two test runs takes four to five minutes once built, on two cores,
# with the image's build beside).
part "tests of the workspace"
scripts/with-deadline.sh 20m cargo test --workspace --locked --exclude ingest --exclude dedup-worker "$@"
# ingest's and the worker's own tests live inside their crates (their modules are private), so
# each crate's tests share one process, and with it the broker client's global runtime: a test
# that hangs or cuts a link must not overlap the others. One test at a time there.
part "tests of ingest and dedup-worker, one at a time"
scripts/with-deadline.sh 20m cargo test --locked -p ingest -p dedup-worker "$@" -- --test-threads=1
# The benchmark's smoke run: a few seconds of load through the real binaries, correctness only.
# It takes well under a minute; a hang fails loudly after 10, showing where the bench and the
# ingest and workers it started wait, and killing them all.
part "benchmark smoke run"
target=${CARGO_TARGET_DIR:-target}
cargo build --locked -p ingest -p dedup-worker -p dedup-bench
DEDUP_BENCH_INGEST_BIN=$target/debug/ingest DEDUP_BENCH_WORKER_BIN=$target/debug/dedup-worker \
  scripts/with-deadline.sh 10m "$target/debug/dedup-bench" --smoke --out "$target/bench-smoke" >/dev/null
# The README's run command, as its "Run it" section uses it: the sample event posted twice
# with the made write key is stored once; Ctrl-C (here SIGTERM) stops both binaries. In a
# database, queues and Redis prefix of its own, removed afterwards; a dev build, as the
# release build of the same sources is the image's test.
part "the README's run command (scripts/run-local.sh)"
answering() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for port in 8000 9100 9101; do
  if answering "$port"; then
    echo "!!! port $port is in use: stop what holds it (another scripts/run-local.sh?)" >&2
    exit 1
  fi
done
command -v jq >/dev/null || scripts/apt-install.sh test jq
run=run-local-test-$$
run_db=dedup_run_local_test
remove_run() {
  psql -X -q postgres://postgres@127.0.0.1:5432/postgres -c "DROP DATABASE IF EXISTS $run_db WITH (FORCE)"
  for api in "queues/%2F/$run" "queues/%2F/$run.dlq" "exchanges/%2F/$run" "exchanges/%2F/$run.dlx"; do
    curl -s -o /dev/null -u guest:guest -X DELETE "http://127.0.0.1:15672/api/$api"
  done
  redis-cli --scan --pattern "{${run}[:}]*" | xargs -r redis-cli del >/dev/null
}
BUILD_PROFILE=dev DATABASE_URL=postgres://postgres@127.0.0.1:5432/$run_db AMQP_EXCHANGE=$run \
  AMQP_QUEUE=$run REDIS_PREFIX=$run scripts/run-local.sh >"$snapshot.run" 2>&1 &
runner=$!
for _ in $(seq 600); do
  grep -q "^Pipeline running" "$snapshot.run" && break
  kill -0 "$runner" 2>/dev/null || break
  sleep 0.5
done
if ! grep -q "^Pipeline running" "$snapshot.run"; then
  kill -TERM "$runner" 2>/dev/null || true
  cat "$snapshot.run" >&2
  remove_run
  echo "!!! scripts/run-local.sh did not start the pipeline" >&2
  exit 1
fi
DEDUP_WRITE_KEY=$(cat target/run-local/write-key)
jq -c --arg now "$(date -u +%FT%TZ)" '.event_datetime = $now' samples/app_list.json >"$snapshot.event"
answers=()
for _ in 1 2; do
  answers+=("$(curl -s -o /dev/null -w '%{http_code}' -H 'Content-Type: application/json' \
    -H "Authorization: Bearer $DEDUP_WRITE_KEY" --data-binary @"$snapshot.event" \
    http://127.0.0.1:8000/product_events/)")
done
stored=
for _ in $(seq 100); do
  stored=$(psql -X -tA "postgres://postgres@127.0.0.1:5432/$run_db" \
    -c "SELECT count(*) || ' ' || string_agg(source, ',') FROM product_events")
  [ "$stored" = "1 local" ] && break
  sleep 0.2
done
# Two seconds more: a second row would come by then.
sleep 2
stored=$(psql -X -tA "postgres://postgres@127.0.0.1:5432/$run_db" \
  -c "SELECT count(*) || ' ' || string_agg(source, ',') FROM product_events")
kill -TERM "$runner"
status=0
timeout 30 tail --pid="$runner" -f /dev/null || status=$?
stopped=yes
for port in 8000 9100 9101; do
  if answering "$port"; then stopped="no: port $port still answers"; fi
done
remove_run
if [ "${answers[*]}" != "202 202" ] || [ "$stored" != "1 local" ] || [ "$status" != 0 ] ||
  [ "$stopped" != yes ]; then
  cat "$snapshot.run" >&2
  echo "!!! run-local.sh: answers ${answers[*]} (want 202 202), stored '$stored' (want '1 local')," \
    "stopped within 30 s of SIGTERM: $([ "$status" = 0 ] && echo yes || echo no), ports closed: $stopped" >&2
  exit 1
fi
# The fuzz targets over their committed seeds (the hostile inputs that once stalled the
# pipeline among them): a regression check, not a fuzzing run (scripts/fuzz.sh is that).
part "fuzz targets over their seeds"
# A mistyped argument is refused before anything is built or fuzzed.
expect_exit 2 "'event' is not a number of seconds" scripts/fuzz.sh event
expect_exit 2 "no fuzz target 'nosuch'" scripts/fuzz.sh 5 nosuch
scripts/fuzz.sh --replay
part "compose and chart files"
python3 -c "import yaml" 2>/dev/null || pip install -q pyyaml
python3 scripts/check-compose.py
python3 -c "import helm_python, kubernetes_validate" 2>/dev/null || pip install -q helm-python-sdk kubernetes-validate
python3 scripts/check-chart.py
# Where podman cannot start containers (not root, or a kernel that refuses), say so, loudly.
part "the image"
if [ -n "$image_check" ]; then
  status=0
  wait "$image_check" || status=$?
  image_check=
  if [ "$status" != 0 ]; then
    echo "!!! the image check failed ($status): its lines above, marked [check-image], say why" >&2
    exit 1
  fi
  # From inside scripts/, as a user may run it: the check must find its way to the root.
  (cd scripts && ./check-image.sh --interrupted)
  # Without the bases a full check makes (here: for a toolchain no base was made for), it
  # refuses at once and says what to run first, instead of timing out minutes later.
  fake=$(mktemp -d)
  printf '#!/bin/sh\necho "rustc 0.0.0-nobase (a stand-in)"\n' >"$fake/rustc"
  chmod +x "$fake/rustc"
  expect_exit 1 "run scripts/check-image.sh first" \
    env PATH="$fake:$PATH" timeout 60 scripts/check-image.sh --interrupted
  rm -rf "$fake"
else
  echo "!!! podman cannot run here: the image was NOT built or run (apt-get install podman runc debootstrap)" >&2
fi
part "what the tests left on the shared services"
scripts/check-leftovers.sh since "$snapshot"
part "done"
