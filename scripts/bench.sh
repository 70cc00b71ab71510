#!/usr/bin/env bash
# Builds the release binaries and runs the benchmark harness against the local services.
#   scripts/bench.sh                          # ceilings, then 60 s closed-loop single events
#   scripts/bench.sh run --batch 100          # batch requests only
#   scripts/bench.sh run --rate 3000          # open loop at a fixed arrival rate
#   scripts/bench.sh run --hostile 2          # hostile requests beside the load, all refused
#   scripts/bench.sh chaos                    # worker killed, services restarted under load
#   scripts/bench.sh compare --baseline-ingest-bin A/ingest --baseline-worker-bin A/dedup-worker
#                                             # A/B: that build against this one, alternately
#   scripts/bench.sh --smoke                  # a few seconds, correctness only (CI)
# All flags: scripts/bench.sh --help
set -euo pipefail
cd "$(dirname "$0")/.."
# Help needs neither the services nor the binaries under test.
case " $* " in
  *" -h "* | *" --help "* | " help "*) cargo build --release --locked -p dedup-bench >&2 ;;
  *)
    scripts/ensure-services.sh >&2
    cargo build --release --locked -p ingest -p dedup-worker -p dedup-bench >&2
    ;;
esac
bin=${CARGO_TARGET_DIR:-target}/release
export DEDUP_BENCH_INGEST_BIN=$bin/ingest DEDUP_BENCH_WORKER_BIN=$bin/dedup-worker
exec "$bin/dedup-bench" "$@"
