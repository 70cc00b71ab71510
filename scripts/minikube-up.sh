#!/usr/bin/env bash
# From a machine with minikube, kubectl, helm and jq to a running pipeline: starts minikube,
# builds the image inside it (`minikube image build`, no registry needed), installs the chart
# with the bundled services, sends a sample event to the ingest node port and shows the stored
# row (scripts/cluster/install.sh). Only files of this repository are used.
#   MONITORING=1 scripts/minikube-up.sh   # also kube-prometheus-stack and the chart's monitoring
#   PROFILE=<name>                        # the minikube profile (default: dedup)
set -euo pipefail
# shellcheck source=scripts/lib/no-arguments.sh
. "$(dirname "$0")/lib/no-arguments.sh"
cd "$(dirname "$0")/.."
command -v minikube >/dev/null || { echo "minikube is not installed: https://minikube.sigs.k8s.io/docs/start/" >&2; exit 1; }
profile=${PROFILE:-dedup}
version=$(sed -n 's/^appVersion: "\(.*\)"/\1/p' charts/dedup/Chart.yaml)
image=dedup/dedup:$version

minikube status -p "$profile" >/dev/null 2>&1 || minikube start -p "$profile" --cpus 4 --memory 8g
kubectl config use-context "$profile" >/dev/null
minikube -p "$profile" image build -t "$image" --build-opt target=dedup .
scripts/cluster/install.sh "http://$(minikube -p "$profile" ip):30800"
