#!/usr/bin/env bash
# Runs every test of the project against the local PostgreSQL, Redis and RabbitMQ (started if
# they are down). This is the README's test command and what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-services.sh
cargo test --workspace --locked "$@"
