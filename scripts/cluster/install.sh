#!/usr/bin/env bash
# The part of scripts/kind-up.sh and scripts/minikube-up.sh after the image is in the cluster:
# (with MONITORING=1) kube-prometheus-stack, then this chart with ingest on NodePort 30800,
# a sample event posted twice with the release's first write key, and the one stored row.
# Called with the URL ingest answers on from this machine, e.g. http://127.0.0.1:8000.
set -euo pipefail
cd "$(dirname "$0")/../.."
usage="usage: scripts/cluster/install.sh http://<node>:<port> (where ingest answers from this machine)"
case ${1:-} in
  http://* | https://*) url=$1 ;;
  -h | --help) echo "$usage"; exit 0 ;;
  "") echo "$usage" >&2; exit 2 ;;
  *) echo "'$1' is not a URL; $usage" >&2; exit 2 ;;
esac
need() { command -v "$1" >/dev/null || { echo "$1 is not installed: $2" >&2; exit 1; }; }
need helm "https://helm.sh/docs/intro/install/"
need kubectl "https://kubernetes.io/docs/tasks/tools/"
need jq "apt-get install jq"

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
      --data-binary @- "$url/product_events/"; echo
done
sleep 2
kubectl -n dedup exec statefulset/dedup-dedup-postgresql -- \
  psql -U dedup -d dedup -c 'SELECT event_date, event_name, r, received_at FROM product_events'
kubectl get dedup -n dedup
echo "ingest: $url/product_events/ (write key: kubectl -n dedup get secret dedup-dedup-first-write-key -o jsonpath='{.data.key}' | base64 -d)"
if [[ ${MONITORING:-0} == 1 ]]; then
  echo "Grafana: kubectl -n monitoring port-forward svc/kps-grafana 3000:80, then http://localhost:3000"
  echo "  user admin, password: kubectl -n monitoring get secret kps-grafana -o jsonpath='{.data.admin-password}' | base64 -d"
  echo "  dashboard: Dashboards → dedup pipeline"
fi
