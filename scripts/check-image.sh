#!/usr/bin/env bash
# Builds the image from the Dockerfile with podman and runs the pipeline from it: the migrations,
# ingest and a worker, each read-only, as uid 65532, on the host network against this machine's
# PostgreSQL, Redis and RabbitMQ (isolated: their own database, queue and Redis prefix). Posts
# an event with a write key, finds it stored, and checks the `probe` health-check subcommands.
#
# Bases cannot be pulled here, so the script makes them once with debootstrap (Debian bookworm,
# as the Dockerfile's defaults are) and `podman import`: a build base holding this machine's
# Rust toolchain and a runtime base in distroless's place. They stay in podman's storage for
# the next run. `scripts/test.sh` calls this when podman can run; run it alone with
#   scripts/check-image.sh            (images built as localhost/dedup-check/*:<version>)
#   scripts/check-image.sh --interrupted   (a check stopped mid-build leaves nothing behind)
set -euo pipefail
cd "$(dirname "$0")/.."
usage="usage: scripts/check-image.sh [--interrupted | --can-run | --install]"
case ${1:-} in
  "" | --interrupted | --can-run | --install) ;;
  -h | --help) echo "$usage"; exit 0 ;;
  *) echo "check-image.sh: unknown argument '$1'; $usage" >&2; exit 2 ;;
esac

log() { printf '[check-image] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

suffix=$$
db=dedup_image_check_$suffix
queue=dedup_image_check_$suffix
containers=()
# podman as it runs on this machine kind: vfs storage, runc, no cgroup manager or ulimits to set.
conf_dir=$(mktemp -d)
work=$(mktemp -d)
# The ids `podman "${@:2}"` lists now that are not in $1 (an earlier such listing, sorted).
# A listing that fails ends it with status 1 rather than reading as "nothing new".
new_since() {
  local now
  now=$(pm "${@:2}") || { log "ERROR: podman ${*:2} failed"; return 1; }
  comm -13 <(echo "$1") <(sort -u <<<"$now")
}
# The runc containers (a build's RUN steps) running now that are not in $1 (an earlier listing).
new_runc() { comm -13 <(echo "$1") <(runc list -q 2>/dev/null | sort -u); }
# The runc containers whose process descends from one of the processes $@ (podman runs a RUN
# step as podman -> buildah-oci-runtime -> the step's process).
runc_under() {
  local c pid a
  for c in $(runc list -q 2>/dev/null); do
    pid=$(runc state "$c" 2>/dev/null | sed -n 's/^ *"pid": \([0-9]*\),$/\1/p')
    while [[ -n $pid ]] && ((pid > 1)); do
      for a in "$@"; do
        if ((pid == a)); then echo "$c"; break 2; fi
      done
      pid=$(ps -o ppid= -p "$pid" 2>/dev/null | tr -d ' ')
    done
  done
  # A process gone mid-walk ends its walk; it must not fail the cleanup that calls this.
  return 0
}
# The pipeline's slice of the local services (its containers, database, queues, exchanges
# and Redis keys), removed on every exit once it has started; the successful run checks that
# nothing of it is left.
redis_keys() { redis-cli --scan --pattern "{dedup-image-check-${suffix}[:}]*"; }
# Its queues and exchanges, as paths of RabbitMQ's management API.
broker_objects=("queues/%2F/$queue" "queues/%2F/$queue.dead" "exchanges/%2F/$queue" "exchanges/%2F/$queue.dlx")
broker() { # method path: the HTTP status the management API answers
  curl -s -o /dev/null -w '%{http_code}' -u guest:guest -X "$1" "http://127.0.0.1:15672/api/$2" || true
}
remove_pipeline() {
  for c in "${containers[@]}"; do pm rm -f "$c" >/dev/null 2>&1 || true; done
  psql -q postgres://postgres@127.0.0.1:5432/postgres -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" \
    >/dev/null 2>&1 || true
  for api in "${broker_objects[@]}"; do broker DELETE "$api" >/dev/null; done
  redis_keys | xargs -r redis-cli del >/dev/null 2>&1 || true
}
cleanup() {
  # Interrupted while building: stop the build (podman, under release-image.sh) too, and
  # remove the working containers it left (a layer each, ~1 GB apiece in vfs storage). Only
  # its own: a build running beside this one keeps its containers. Its step images go with
  # the built images below (`built` is set before the build starts).
  if [[ ${build:-} ]] && kill -0 "$build" 2>/dev/null; then
    # podman itself, not only the script that started it: killed, release-image.sh ends at
    # once, while podman may still be committing a step image. Removing images before podman
    # has exited would miss the image it commits last.
    mapfile -t builders < <(pgrep -P "$build")
    # A RUN step's process (cargo) runs in a runc container of its own, which outlives podman:
    # found now, while it still descends from podman, and stopped below.
    steps=$(runc_under "${builders[@]}")
    kill -TERM "${builders[@]}" "$build" 2>/dev/null || true
    wait "$build" 2>/dev/null || true
    for pid in "${builders[@]}"; do
      for _ in $(seq 1 600); do kill -0 "$pid" 2>/dev/null && sleep 0.1; done
      kill -KILL "$pid" 2>/dev/null || true
    done
    for c in $(new_since "$build_containers" ps -a --external -q); do
      pm rm -f "$c" >/dev/null 2>&1 || true
    done
    # The RUN step, with the bundle directory podman made for it.
    for c in $steps; do
      bundle=$(runc state "$c" 2>/dev/null | sed -n 's/^ *"bundle": "\(.*\)",$/\1/p')
      runc delete --force "$c" >/dev/null 2>&1 || true
      if [[ $bundle == /var/tmp/buildah* ]]; then rm -rf "$bundle"; fi
    done
  fi
  [[ -z ${started:-} ]] || remove_pipeline
  # vfs storage copies the whole file system for every layer (~1 GB each for the build
  # stage): keep only the bases, so repeated runs do not fill the disk.
  if [[ ${built:-} ]]; then
    for target in dedup ingest dedup-worker dedup-operator; do
      pm rmi -f "$registry/$target:$version" >/dev/null 2>&1 || true
    done
    # Until a prune removes nothing, rather than a fixed number of rounds: a round may leave
    # a step image that only an image it removed was built on.
    for _ in $(seq 1 30); do
      [[ -n $(pm image prune -f 2>/dev/null) ]] || break
    done
  fi
  rm -rf "$conf_dir" "$work"
}
trap 'cleanup' EXIT
cat >"$conf_dir/containers.conf" <<'CONF'
[containers]
default_ulimits = []
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
export CONTAINERS_CONF=$conf_dir/containers.conf
pm() { podman --storage-driver vfs --runtime runc "$@"; }
# Containers started without podman's health-check timers (they need systemd, absent here);
# the health check itself is checked below by running `probe` in the container.
run_image() { pm run --no-healthcheck "$@"; }

if [[ ${1:-} == --can-run ]]; then
  # Exit status only: whether podman is installed and can start a container here.
  command -v podman >/dev/null && command -v runc >/dev/null && pm info >/dev/null 2>&1
  exit $?
fi
if [[ ${1:-} == --install ]]; then
  # What this script needs, from Debian's packages, as scripts/ensure-services.sh installs the
  # services: so that a new machine (and CI on it) builds and runs the image instead of skipping.
  tools=(podman runc debootstrap uidmap)
  missing=()
  for t in podman runc debootstrap newuidmap; do command -v "$t" >/dev/null || missing+=("$t"); done
  ((${#missing[@]})) || exit 0
  # Its exit status: 3 when nothing may be installed here (scripts/test.sh then skips,
  # loudly), 1 when apt-get failed (the tests fail).
  status=0
  scripts/apt-install.sh check-image "${tools[@]}" || status=$?
  exit "$status"
fi
command -v podman >/dev/null || die "podman is not installed (apt-get install podman runc debootstrap)"
command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"
# The bases, made below where missing; tagged by what goes into them, so a new toolchain makes
# a new build base.
sysroot=$(rustc --print sysroot)
rust_version=$(rustc --version | cut -d' ' -f2)
build_base=localhost/dedup-build-base:rust-$rust_version
runtime_base=localhost/dedup-runtime-base:bookworm
if [[ ${1:-} == --interrupted ]]; then
  # Tests the cleanup above: a check sent SIGTERM while its release build has a working
  # container, has committed step images and is running cargo (a RUN step, in a runc
  # container of its own) must stop the build, leave none of them behind, and fail. It needs
  # the bases a full check makes, so that its run goes straight to its build.
  for base in "$build_base" "$runtime_base"; do
    pm image exists "$base" ||
      die "no $base in podman's storage: run scripts/check-image.sh first (it makes the bases in a few minutes), then --interrupted"
  done
  containers_before=$(pm ps -a --external -q | sort -u)
  images_before=$(pm images -a -q | sort -u)
  runc_before=$(runc list -q 2>/dev/null | sort -u)
  # By its path from the repository root, where the script has moved (so not "$0").
  scripts/check-image.sh 2>"$work/interrupted.log" &
  run=$!
  deadline=$((SECONDS + 300))
  # Listing images can fail while the build is committing one ("locating item named
  # manifest"): here that is only a poll to repeat, so quietly.
  until grep -qs "building the release images" "$work/interrupted.log" &&
    [[ -n $(new_since "$containers_before" ps -a --external -q 2>/dev/null) ]] &&
    [[ -n $(new_since "$images_before" images -a -q 2>/dev/null) ]] &&
    [[ -n $(new_runc "$runc_before") ]]; do
    kill -0 "$run" 2>/dev/null || { cat "$work/interrupted.log" >&2; die "the check ended before its build had a container, a step image and a RUN step"; }
    ((SECONDS < deadline)) || { kill "$run"; tail -20 "$work/interrupted.log" >&2; die "no build container, step image and RUN step within 5 minutes"; }
    sleep 1
  done
  kill -TERM "$run"
  deadline=$((SECONDS + 120))
  while kill -0 "$run" 2>/dev/null; do
    ((SECONDS < deadline)) || { kill -KILL "$run"; die "still running 2 minutes after SIGTERM"; }
    sleep 1
  done
  status=0
  wait "$run" || status=$?
  ((status != 0)) || die "the interrupted check exited 0"
  left=$(new_since "$containers_before" ps -a --external -q | xargs)
  [[ -z $left ]] || die "the interrupted build left containers behind: $left"
  left=$(new_since "$images_before" images -a -q | xargs)
  [[ -z $left ]] || die "the interrupted build left images behind: $left"
  left=$(new_runc "$runc_before" | xargs)
  [[ -z $left ]] || die "the interrupted build left a build step running: runc containers $left"
  log "ok: interrupted during its build (exit $status), it left no container, image or build step behind"
  exit 0
fi

# --- bases ---------------------------------------------------------------------------------
debootstrap_base() { # dir packages
  local dir=$1 include=$2
  log "debootstrap bookworm into $dir (+ $include)"
  debootstrap --variant=minbase --include="$include" bookworm "$dir" http://deb.debian.org/debian \
    >"$work/debootstrap.log" 2>&1 || { tail -20 "$work/debootstrap.log" >&2; die "debootstrap failed"; }
  rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/*
}

if ! pm image exists "$runtime_base"; then
  debootstrap_base "$work/runtime" ca-certificates
  # distroless's nonroot user, so that `USER 65532` has a name and a home.
  echo 'nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin' >>"$work/runtime/etc/passwd"
  echo 'nonroot:x:65532:' >>"$work/runtime/etc/group"
  mkdir -p "$work/runtime/home/nonroot" && chown 65532:65532 "$work/runtime/home/nonroot"
  tar -C "$work/runtime" -c . | pm import - "$runtime_base" >/dev/null
  rm -rf "$work/runtime"
  log "made $runtime_base"
fi
if ! pm image exists "$build_base"; then
  debootstrap_base "$work/build" ca-certificates,gcc,libc6-dev
  # The toolchain as the official rust image lays it out: rustc and cargo on PATH, the
  # registry under CARGO_HOME (the Dockerfile's cache mount).
  tar -C "$sysroot" --exclude=./share/doc -c . | tar -C "$work/build/usr/local" -x
  mkdir -p "$work/build/usr/local/cargo"
  tar -C "$work/build" -c . | pm import \
    --change 'ENV CARGO_HOME=/usr/local/cargo' \
    --change 'ENV PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    - "$build_base" >/dev/null
  rm -rf "$work/build"
  log "made $build_base"
fi

# --- the images ---------------------------------------------------------------------------
# Built as a release is (scripts/release-image.sh): the all-in-one image and one per binary.
# The build trusts what this machine trusts, so cargo reaches crates.io the way the host does
# (through an intercepting egress proxy, if the host has one).
version=$(sed -n 's/^appVersion: "\(.*\)"/\1/p' charts/dedup/Chart.yaml)
registry=${REGISTRY:-localhost/dedup-check}
image=$registry/dedup:$version
log "building the release images as $registry/*:$version (a release build: minutes, more on a new machine)"
built=1
build_containers=$(pm ps -a --external -q | sort -u)
# At the lowest CPU priority, which podman's RUN steps (cargo) inherit: scripts/test.sh runs
# this check beside the tests, whose work comes first. Alone, the build gets the idle machine.
REGISTRY=$registry BUILDER="podman --storage-driver vfs --runtime runc" \
  BUILD_OPTS="--format docker --network host --build-arg BUILD_IMAGE=$build_base --build-arg RUNTIME_IMAGE=$runtime_base --volume /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro" \
  nice -n 19 scripts/release-image.sh >"$work/build.log" 2>&1 &
build=$!
# Progress every 30 s: which image, its build step, and the crates cargo has compiled so far.
build_started=$SECONDS
while kill -0 "$build" 2>/dev/null; do
  for _ in $(seq 1 30); do kill -0 "$build" 2>/dev/null && sleep 1; done
  kill -0 "$build" 2>/dev/null || break
  building=$(sed -n 's/^building \([^ ]*\) .*/\1/p' "$work/build.log" | tail -1)
  step=$(grep -o '^\[[0-9]*/[0-9]*\] STEP [0-9]*/[0-9]*: [A-Z]*' "$work/build.log" | tail -1 || true)
  log "... $((SECONDS - build_started)) s: ${building:-the first image}, ${step:-starting}," \
    "$(grep -c '^ *Compiling ' "$work/build.log" || true) crates compiled"
done
wait "$build" || { tail -40 "$work/build.log" >&2; die "the images did not build"; }
for target in dedup ingest dedup-worker dedup-operator; do
  user=$(pm image inspect --format '{{.Config.User}}' "$registry/$target:$version")
  [[ $user == 65532:65532 ]] || die "$target runs as '$user', not 65532:65532"
done
# Each single-binary image runs its binary as the entrypoint, and ingest's and the worker's
# health checks are their probe subcommands.
for target in ingest dedup-worker dedup-operator; do
  out=$(run_image --rm --read-only --user 65532:65532 "$registry/$target:$version" --version 2>"$work/run.err") ||
    die "$target's image does not run its binary: $(cat "$work/run.err")"
  [[ $out == "$target $version" ]] || die "$target's image printed '$out', not '$target $version'"
done
for target in ingest dedup-worker; do
  check=$(pm image inspect --format '{{json .Config.Healthcheck.Test}}' "$registry/$target:$version")
  [[ $check == "[\"CMD\",\"/usr/local/bin/$target\",\"probe\"]" ]] ||
    die "$target's health check is $check, not its probe"
done

# --- the pipeline from the image -------------------------------------------------------------
# Three distinct free ports below the kernel's ephemeral range, as the system tests pick theirs
# (test_support::process::free_port): the containers bind them tens of seconds after the pick,
# and with the tests running beside this check, an outgoing connection could meanwhile take a
# port from the ephemeral range, where binding port 0 would pick.
read -r http_port ingest_admin worker_admin < <(python3 - <<'EOF'
import random, socket
first = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
low = min(10000, first // 2)
ports = []
for port in random.sample(range(low, first), first - low):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
    ports.append(port)
    if len(ports) == 3:
        break
print(*ports)
EOF
)
[[ -n $worker_admin ]] || die "no three free ports below the ephemeral range"
started=1
psql -q postgres://postgres@127.0.0.1:5432/postgres -c "CREATE DATABASE $db"
database_url=postgres://postgres@127.0.0.1:5432/$db

# Write keys as deployed: one key for the source "image-check".
key=$(run_image --rm "$image" ingest write-key --source image-check 2>"$work/key.entry")
{ echo "keys:"; sed -n '/^  - source:/,$p' "$work/key.entry"; } >"$work/write-keys.yaml"
chmod 644 "$work/write-keys.yaml"

common=(--network host --read-only --user 65532:65532 --cap-drop ALL
  -e LOG_FORMAT=json -e RABBITMQ_URL=amqp://guest:guest@127.0.0.1:5672/%2f
  -e AMQP_EXCHANGE="$queue" -e AMQP_QUEUE="$queue" -e AMQP_DEAD_LETTER_QUEUE="$queue.dead")
run() { # name args...
  local name=$1; shift
  run_image -d --name "$name" "${common[@]}" "$@" >/dev/null
  containers+=("$name")
}

log "migrations, then ingest and a worker from the image"
run_image --rm "${common[@]}" -e DATABASE_URL="$database_url" "$image" dedup-worker migrate \
  >"$work/migrate.log" 2>&1 || { cat "$work/migrate.log" >&2; die "migrations failed in the image"; }
run "dedup-check-worker-$suffix" -e DATABASE_URL="$database_url" \
  -e REDIS_URL=redis://127.0.0.1:6379 -e REDIS_PREFIX="dedup-image-check-$suffix" \
  -e RABBITMQ_MANAGEMENT_URL=http://guest:guest@127.0.0.1:15672 \
  -e ADMIN_LISTEN_ADDR="127.0.0.1:$worker_admin" "$image" dedup-worker
run "dedup-check-ingest-$suffix" -v "$work/write-keys.yaml:/etc/dedup/write-keys.yaml:ro" \
  -e AUTH=keys -e WRITE_KEYS_PATH=/etc/dedup/write-keys.yaml \
  -e LISTEN_ADDR="127.0.0.1:$http_port" -e ADMIN_LISTEN_ADDR="127.0.0.1:$ingest_admin" "$image" ingest

logs() { for c in "${containers[@]}"; do echo "--- $c" >&2; pm logs "$c" 2>&1 | tail -20 >&2; done; }
ready=
for _ in $(seq 1 100); do
  if pm exec "dedup-check-ingest-$suffix" ingest probe >/dev/null 2>&1 &&
    pm exec "dedup-check-worker-$suffix" dedup-worker probe >/dev/null 2>&1; then
    ready=1; break
  fi
  sleep 0.3
done
[[ -n $ready ]] || { logs; die "ingest and the worker did not become ready (probe) within 30 s"; }

# A probe against a port nothing listens on must fail, or the health check proves nothing.
if pm exec -e ADMIN_LISTEN_ADDR=127.0.0.1:1 "dedup-check-ingest-$suffix" ingest probe >/dev/null 2>&1; then
  die "ingest probe succeeded against a closed port"
fi

now=$(date -u +%FT%TZ)
event=$(sed "s/\"event_datetime\": *\"[^\"]*\"/\"event_datetime\": \"$now\"/" samples/app_list.json)
status=$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 -H 'Content-Type: application/json' \
  -H "Authorization: Bearer $key" --data-binary "$event" "http://127.0.0.1:$http_port/product_events/")
[[ $status == 202 ]] || { logs; die "POST with the write key answered $status, not 202"; }
status=$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 -H 'Content-Type: application/json' \
  --data-binary "$event" "http://127.0.0.1:$http_port/product_events/")
[[ $status == 401 ]] || die "POST without a key answered $status, not 401"

stored=
for _ in $(seq 1 100); do
  stored=$(psql -tAq "$database_url" -c "SELECT source FROM product_events" 2>/dev/null || true)
  [[ -n $stored ]] && break
  sleep 0.2
done
[[ $stored == image-check ]] || { logs; die "the event was not stored (found '$stored')"; }

log "ok: the release images built; from $image ingest and a worker ran read-only as 65532, took an event with a key and stored it"

# What the pipeline made on the local services goes with it: the worker declared the queues
# and exchanges, and remembers the event's key in Redis (after its commit, so it may come a
# moment after the row).
for _ in $(seq 1 50); do [[ -n $(redis_keys) ]] && break; sleep 0.2; done
[[ -n $(redis_keys) ]] || die "the worker left no key under its Redis prefix: the check below would prove nothing"
for api in "${broker_objects[@]}"; do
  status=$(broker GET "$api")
  [[ $status == 200 ]] || die "${api#*/%2F/} was not declared (the management API answered $status)"
done
remove_pipeline
started=
for c in "${containers[@]}"; do ! pm container exists "$c" || die "the cleanup left the container $c behind"; done
left=$(redis_keys | xargs) || die "Redis did not list what the cleanup left under the pipeline's prefix"
[[ -z $left ]] || die "the cleanup left Redis keys behind: $left"
databases=$(psql -tAq postgres://postgres@127.0.0.1:5432/postgres \
  -c "SELECT count(*) FROM pg_database WHERE datname = '$db'") ||
  die "PostgreSQL did not say whether the cleanup removed the database $db"
[[ $databases == 0 ]] || die "the cleanup left the database $db behind"
for api in "${broker_objects[@]}"; do
  status=$(broker GET "$api")
  [[ $status == 404 ]] || die "the cleanup left ${api#*/%2F/} behind (the management API answered $status)"
done
log "ok: the pipeline's containers, database, queues, exchanges and Redis keys are gone"
