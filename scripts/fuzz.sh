#!/usr/bin/env bash
# Fuzzes the parsers that take untrusted input, each for a set time, with cargo-fuzz
# (libFuzzer): the event validator, the date-time parser, message decoding and batch-body
# splitting. Targets and their committed seeds live in services/fuzz (seeds/<target>); what
# libFuzzer finds goes to services/fuzz/corpus/<target> (not committed: copy an interesting
# input into seeds/ to keep it), crashes to services/fuzz/artifacts/<target>/.
#
#   scripts/fuzz.sh              # every target for 60 s
#   scripts/fuzz.sh 600 event    # one target for 10 minutes
#   scripts/fuzz.sh --replay     # run every target over its seeds once (the test command does)
#
# The machine has a stable toolchain only: RUSTC_BOOTSTRAP lets cargo-fuzz pass its
# instrumentation flags, and no sanitizer is needed (the code forbids unsafe).
set -euo pipefail
cd "$(dirname "$0")/../services/fuzz"
targets=(event datetime message batch_body)
usage() { echo "usage: scripts/fuzz.sh [SECONDS | --replay] [TARGET...]; targets: ${targets[*]}"; }
replay=0
seconds=60
case ${1:-} in
  -h | --help) usage; exit 0 ;;
  --replay) replay=1; shift ;;
  "") ;;
  *)
    [[ $1 =~ ^[1-9][0-9]*$ ]] || { echo "fuzz.sh: '$1' is not a number of seconds" >&2; usage >&2; exit 2; }
    seconds=$1
    shift
    ;;
esac
for t in "$@"; do
  [[ " ${targets[*]} " == *" $t "* ]] || { echo "fuzz.sh: no fuzz target '$t'" >&2; usage >&2; exit 2; }
done
[ $# -gt 0 ] && targets=("$@")
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz from crates.io (a few minutes, once per machine)" >&2
  cargo install --locked --quiet cargo-fuzz
fi
export RUSTC_BOOTSTRAP=1
# Instrumented builds are kept apart from the normal ones, and across fresh clones.
target_dir=${FUZZ_TARGET_DIR:-${CARGO_TARGET_DIR:-$PWD/target}-fuzz}
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "artifacts/$t"
  seeds=$(find "seeds/$t" -type f | wc -l)
  [ "$seeds" -gt 0 ] || { echo "no seeds in services/fuzz/seeds/$t" >&2; exit 1; }
  if [ $replay = 1 ]; then
    echo "== fuzz replay: $t ($seeds seeds)" >&2
    cargo fuzz run --fuzz-dir . --sanitizer none --target-dir "$target_dir" "$t" "seeds/$t" -- -runs=0
  else
    echo "== fuzzing $t for ${seconds}s" >&2
    cargo fuzz run --fuzz-dir . --sanitizer none --target-dir "$target_dir" "$t" "corpus/$t" "seeds/$t" -- \
      -max_total_time="$seconds" -max_len=65536 -timeout=10 -rss_limit_mb=1024 \
      -artifact_prefix="artifacts/$t/"
  fi
done
