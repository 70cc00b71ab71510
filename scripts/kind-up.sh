#!/usr/bin/env bash
# From a machine with Docker, kind, kubectl and helm to a running pipeline: builds the image,
# creates a kind cluster (host port 8000 → the ingest node port), loads the image, installs the
# chart with the bundled RabbitMQ, Redis Stack and PostgreSQL, sends a sample event and shows
# the stored row.
#   MONITORING=1 scripts/kind-up.sh   # also kube-prometheus-stack, with the chart's
#                                     # ServiceMonitor/PodMonitors, alert rules and dashboard on
#   KPS_VERSION=<chart version>       # pin kube-prometheus-stack (default: the repo's latest)
set -euo pipefail
cd "$(dirname "$0")/.."
cluster=${CLUSTER:-dedup}
version=$(sed -n 's/^appVersion: "\(.*\)"/\1/p' charts/dedup/Chart.yaml)
image=dedup/dedup:$version

docker build -t "$image" --target dedup .
kind get clusters | grep -qx "$cluster" || kind create cluster --name "$cluster" --config k8s/kind.yaml
kind load docker-image "$image" --name "$cluster"

monitoring=()
if [[ ${MONITORING:-0} == 1 ]]; then
  # Prometheus picks up every ServiceMonitor, PodMonitor and PrometheusRule, and Grafana's
  # sidecar every ConfigMap labelled grafana_dashboard=1, whatever their namespace or labels.
  helm repo add prometheus-community https://prometheus-community.github.io/helm-charts >/dev/null
  helm repo update prometheus-community >/dev/null
  helm upgrade --install kps prometheus-community/kube-prometheus-stack -n monitoring \
    --create-namespace --wait --timeout 10m ${KPS_VERSION:+--version "$KPS_VERSION"} \
    --set prometheus.prometheusSpec.serviceMonitorSelectorNilUsesHelmValues=false \
    --set prometheus.prometheusSpec.podMonitorSelectorNilUsesHelmValues=false \
    --set prometheus.prometheusSpec.ruleSelectorNilUsesHelmValues=false \
    --set grafana.sidecar.dashboards.searchNamespace=ALL
  monitoring=(--set monitoring.serviceMonitors.enabled=true --set monitoring.prometheusRule.enabled=true
              --set monitoring.dashboard.enabled=true)
fi

helm upgrade --install dedup charts/dedup -n dedup --create-namespace --wait --timeout 10m \
  --set pipeline.ingest.serviceType=NodePort --set pipeline.ingest.serviceNodePort=30800 "${monitoring[@]}"
kubectl -n dedup rollout status deployment/events-ingest --timeout=5m
kubectl -n dedup rollout status deployment/events-worker --timeout=5m

sample=${SAMPLE:-samples/app_list.json}
key=$(kubectl -n dedup get secret dedup-dedup-first-write-key -o jsonpath='{.data.key}' | base64 -d)
for _ in 1 2; do
  # Dated now: ingest accepts event dates inside its window only.
  jq -c --arg now "$(date -u +%FT%TZ)" '.event_datetime = $now' "$sample" |
    curl -fsS -H 'Content-Type: application/json' -H "Authorization: Bearer $key" \
      --data-binary @- http://127.0.0.1:8000/product_events/; echo
done
sleep 2
kubectl -n dedup exec statefulset/dedup-dedup-postgresql -- \
  psql -U dedup -d dedup -c 'SELECT event_date, event_name, r, received_at FROM product_events'
kubectl get dedup -n dedup
if [[ ${MONITORING:-0} == 1 ]]; then
  echo "Grafana: kubectl -n monitoring port-forward svc/kps-grafana 3000:80, then http://localhost:3000"
  echo "  user admin, password: kubectl -n monitoring get secret kps-grafana -o jsonpath='{.data.admin-password}' | base64 -d"
  echo "  dashboard: Dashboards → dedup pipeline"
fi
