#!/usr/bin/env bash
# Runs a command with a deadline, as `timeout --signal=KILL` does, but past the deadline it
# first prints where every thread of the command's processes waits (gdb's backtraces), then
# kills them all. The test runs use it: a test that hangs then says where it hung, instead of
# only being killed.
#
#   scripts/with-deadline.sh DURATION COMMAND [ARG...]
#
# DURATION is a whole number of seconds, minutes or hours: 90s, 20m, 1h. The exit status is
# the command's, or 124 past the deadline (as timeout's). Without gdb it says so and how to
# install it, and still kills the command.
set -euo pipefail
usage="usage: $(basename "$0") DURATION COMMAND [ARG...] (DURATION like 90s, 20m or 1h)"
if [ $# -lt 2 ]; then
  echo "$usage" >&2
  exit 2
fi
limit=$1
shift
if ! [[ $limit =~ ^[0-9]+[smh]$ ]]; then
  echo "$(basename "$0"): '$limit' is not a duration; $usage" >&2
  exit 2
fi

# The process $1 and every process descending from it, parents first.
tree() {
  local child
  echo "$1"
  for child in $(pgrep -P "$1" || true); do tree "$child"; done
}

# The watchdog runs beside the command, which runs in the foreground (so a terminal's Ctrl-C
# reaches it as usual). Past the deadline it finds the command as this script's other child.
marks=$(mktemp -d)
main=$$
(
  trap 'kill "$sleeper" 2>/dev/null; exit 0' TERM
  sleep "$limit" &
  sleeper=$!
  wait "$sleeper"
  touch "$marks/expired"
  pids=()
  for child in $(pgrep -P "$main"); do
    if [ "$child" != "$BASHPID" ]; then mapfile -t -O "${#pids[@]}" pids < <(tree "$child"); fi
  done
  echo "!!! $(basename "$0"): '$*' did not finish within $limit; where its processes wait:" >&2
  for pid in "${pids[@]}"; do
    echo "--- process $pid: $(ps -o args= -p "$pid" 2>/dev/null || echo '(gone)')" >&2
    if command -v gdb >/dev/null; then
      gdb -p "$pid" -batch -nx -ex 'thread apply all bt 25' 2>&1 | grep -E '^(Thread|#)' >&2 || true
    else
      echo "(no backtraces: gdb is not installed; apt-get install gdb)" >&2
    fi
  done
  kill -KILL "${pids[@]}" 2>/dev/null || true
) &
watchdog=$!
# However this script ends, the watchdog (and its sleep) goes with it.
trap 'kill "$watchdog" 2>/dev/null || true; rm -rf "$marks"' EXIT

status=0
"$@" || status=$?
if [ -e "$marks/expired" ]; then
  exit 124
fi
exit "$status"
