#!/usr/bin/env bash
# From a machine with Docker, kind, kubectl, helm and jq to a running pipeline: builds the image,
# creates a kind cluster (host port 8000 → the ingest node port), loads the image, installs the
# chart with the bundled RabbitMQ, Redis Stack and PostgreSQL, sends a sample event and shows
# the stored row (scripts/cluster/install.sh). Only files of this repository are used.
#   MONITORING=1 scripts/kind-up.sh   # also kube-prometheus-stack, with the chart's
#                                     # ServiceMonitor/PodMonitors, alert rules and dashboard on
#   KPS_VERSION=<chart version>       # pin kube-prometheus-stack (default: the repo's latest)
set -euo pipefail
# shellcheck source=scripts/lib/no-arguments.sh
. "$(dirname "$0")/lib/no-arguments.sh"
cd "$(dirname "$0")/.."
command -v kind >/dev/null || { echo "kind is not installed: https://kind.sigs.k8s.io/" >&2; exit 1; }
cluster=${CLUSTER:-dedup}
version=$(sed -n 's/^appVersion: "\(.*\)"/\1/p' charts/dedup/Chart.yaml)
image=dedup/dedup:$version

docker build -t "$image" --target dedup .
kind get clusters | grep -qx "$cluster" || kind create cluster --name "$cluster" --config k8s/kind.yaml
kind load docker-image "$image" --name "$cluster"
scripts/cluster/install.sh http://127.0.0.1:8000
