#!/usr/bin/env bash
# Tests scripts/apt-install.sh, through which the test command installs what a new machine
# lacks (the servers, Prometheus, podman): its three outcomes against the real apt-get.
#   - not root, or no apt-get: exit 3, nothing tried, the command to run by hand;
#   - a package Debian does not have: the lists updated once, then exit 1 with apt's own error;
#   - a package already installed: exit 0, also while another apt-get holds dpkg's lock.
# The last two need root; elsewhere they are reported as not run.
set -euo pipefail
# shellcheck source=scripts/lib/no-arguments.sh
. "$(dirname "$0")/lib/no-arguments.sh"
cd "$(dirname "$0")/.."

log() { printf '[check-apt-install] %s\n' "$*" >&2; }
fail() { log "FAILED: $*"; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
missing=dedup-no-such-package-$$

expect() { # name expected-status pattern-in-output command...
  local name=$1 want=$2 pattern=$3 status=0
  shift 3
  "$@" >"$tmp/out" 2>&1 || status=$?
  [[ $status == "$want" ]] || { cat "$tmp/out" >&2; fail "$name: exit status $status, not $want"; }
  grep -q -- "$pattern" "$tmp/out" || { cat "$tmp/out" >&2; fail "$name: no '$pattern' in its output"; }
  log "ok: $name (exit $status)"
}

expect "without packages: usage" 2 "usage: scripts/apt-install.sh" scripts/apt-install.sh test

# A copy anyone may run, for the user nobody.
chmod 755 "$tmp"
install -m 755 scripts/apt-install.sh "$tmp/apt-install.sh"
if [[ $(id -u) == 0 ]]; then
  expect "as nobody: exit 3" 3 "not root on Debian: install it (apt-get install $missing)" \
    setpriv --reuid=65534 --regid=65534 --clear-groups "$tmp/apt-install.sh" test "$missing"
  # As root, but apt-get is not on the PATH: only `id` is.
  mkdir "$tmp/bin" && ln -s "$(command -v id)" "$tmp/bin/id"
  expect "without apt-get: exit 3" 3 "apt-get install $missing" \
    env PATH="$tmp/bin" "$BASH" "$tmp/apt-install.sh" test "$missing"
  expect "a package Debian lacks: exit 1" 1 "ERROR: installing $missing failed" \
    scripts/apt-install.sh test "$missing"
  grep -q "updating the package lists, then trying again" "$tmp/out" ||
    fail "the failed install did not update the lists and try again"
  # apt's own reason is shown: that it has no such package, or why the update failed (a
  # mirror out of reach fails the update, and that is what the user must see then).
  grep -q -e "Unable to locate package $missing" -e "^[EW]: " "$tmp/out" ||
    fail "apt-get's error is not shown"
  expect "an installed package: exit 0" 0 "installing bash" scripts/apt-install.sh test bash
  # Another apt-get holding dpkg's lock (fcntl, as apt takes it) for 3 s: waited for, not failed.
  python3 -c 'import fcntl, sys, time
f = open("/var/lib/dpkg/lock-frontend", "w"); fcntl.lockf(f, fcntl.LOCK_EX)
print("locked", flush=True); time.sleep(3)' >"$tmp/lock" &
  holder=$!
  for _ in $(seq 1 50); do [[ -s $tmp/lock ]] && break; sleep 0.1; done
  [[ -s $tmp/lock ]] || fail "could not take dpkg's lock for the test"
  started=$SECONDS
  expect "with dpkg's lock held for 3 s: waits, exit 0" 0 "installing bash" \
    scripts/apt-install.sh test bash
  wait "$holder"
  ((SECONDS - started >= 2)) || fail "the install did not wait for dpkg's lock"
else
  expect "not root: exit 3" 3 "not root on Debian: install it (apt-get install $missing)" \
    "$tmp/apt-install.sh" test "$missing"
  echo "!!! not root: apt-get's failure and success paths were NOT tested" >&2
fi
