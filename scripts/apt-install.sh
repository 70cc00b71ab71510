#!/usr/bin/env bash
# Installs Debian packages that the project's scripts and tests need, on a machine that lacks
# them (ensure-services.sh, check-monitoring.sh, check-image.sh --install):
#   scripts/apt-install.sh WHO PACKAGE...
# WHO names the caller in the messages. Exit status:
#   0  installed (or already there);
#   3  nothing installed: not root, or no apt-get (the message says what to install by hand);
#   1  apt-get failed (the message shows apt's last lines and what to check).
# The package lists are updated only when the install fails without an update first: once per
# new machine, not on every call.
set -euo pipefail

who=${1:?usage: scripts/apt-install.sh WHO PACKAGE...}
shift
(($#)) || { echo "usage: scripts/apt-install.sh WHO PACKAGE..." >&2; exit 2; }
log() { printf '[%s] %s\n' "$who" "$*" >&2; }

if [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null; then
  log "needs $*, and this is not root on Debian: install it (apt-get install $*)"
  exit 3
fi

out=$(mktemp)
trap 'rm -f "$out"' EXIT
# Another apt-get (a second test run installing the same) holds dpkg's lock: wait for it.
apt_get() { apt-get -qq -o DPkg::Lock::Timeout=300 "$@" >"$out" 2>&1; }
# What is installed already stays at its version: this fills gaps, it does not upgrade.
install() {
  DEBIAN_FRONTEND=noninteractive apt_get install -y --no-install-recommends --no-upgrade "$@"
}
log "installing $* from Debian packages"
if ! install "$@"; then
  log "updating the package lists, then trying again"
  if ! apt_get update || ! install "$@"; then
    tail -15 "$out" >&2
    log "ERROR: installing $* failed (above: apt-get's last lines). Check the package sources" \
      "(/etc/apt/sources.list*) and that this machine reaches them, or install it by hand."
    exit 1
  fi
fi
