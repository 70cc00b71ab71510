# Sourced by the scripts that take no arguments (their settings come from the environment):
# `--help` prints the script's opening comment, and any other argument is refused before the
# script does anything, so a mistyped option never starts a cluster, a pipeline or an install.
# shellcheck shell=bash
case ${1:-} in
  "") ;;
  -h | --help)
    sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"
    exit 0
    ;;
  *)
    echo "$(basename "$0"): takes no arguments, got '$*' (settings come from the environment: $(basename "$0") --help)" >&2
    exit 2
    ;;
esac
