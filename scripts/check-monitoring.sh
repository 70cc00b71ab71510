#!/usr/bin/env bash
# Checks the monitoring files the chart and docker compose ship: the alert rules parse and
# pass their promtool unit tests, and every PromQL expression of the Grafana dashboard parses.
# Installs promtool and prometheus (Debian package `prometheus`) when either is missing; the
# system tests run the server.
set -euo pipefail
# shellcheck source=scripts/lib/no-arguments.sh
. "$(dirname "$0")/lib/no-arguments.sh"
cd "$(dirname "$0")/.."
files=charts/dedup/files

if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
  scripts/apt-install.sh check-monitoring prometheus || exit 1
fi

promtool check rules "$files/prometheus/alerts.yaml"
(cd "$files/prometheus" && promtool test rules alerts_test.yaml)

# promtool has no parse-only command: check the dashboard's queries as recording rules.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 - "$files/grafana/dedup-dashboard.json" "$tmp/dashboard-rules.yaml" <<'PY'
import json, sys
dashboard = json.load(open(sys.argv[1]))
exprs = []
def walk(panels):
    for p in panels:
        walk(p.get("panels", []))
        for t in p.get("targets", []):
            exprs.append((p["title"], t["expr"]))
walk(dashboard["panels"])
if not exprs:
    sys.exit("the dashboard has no queries")
with open(sys.argv[2], "w") as out:
    out.write("groups:\n  - name: dashboard\n    rules:\n")
    for i, (title, expr) in enumerate(exprs):
        expr = expr.replace("$__rate_interval", "5m").replace("${datasource}", "prometheus")
        out.write(f"      - record: dashboard:query_{i}\n        expr: {json.dumps(expr)}\n")
print(f"{len(exprs)} dashboard queries", file=sys.stderr)
PY
promtool check rules "$tmp/dashboard-rules.yaml"
echo "monitoring files OK"
