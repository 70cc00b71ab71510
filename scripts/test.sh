#!/usr/bin/env bash
# Runs every test of the project against the local PostgreSQL, Redis and RabbitMQ (started if
# they are down), then checks the monitoring and compose files. This is the README's test
# command and what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-services.sh
cargo test --workspace --locked "$@"
scripts/check-monitoring.sh
python3 -c "import yaml" 2>/dev/null || pip install -q pyyaml
python3 scripts/check-compose.py
