#!/usr/bin/env bash
# From a machine with Docker, kind, kubectl and helm to a running pipeline: builds the image,
# creates a kind cluster (host port 8000 → the ingest node port), loads the image, installs the
# chart with the bundled RabbitMQ, Redis Stack and PostgreSQL, sends a sample event and shows
# the stored row.
set -euo pipefail
cd "$(dirname "$0")/.."
cluster=${CLUSTER:-dedup}
version=$(sed -n 's/^appVersion: "\(.*\)"/\1/p' charts/dedup/Chart.yaml)
image=dedup/dedup:$version

docker build -t "$image" --target dedup .
kind get clusters | grep -qx "$cluster" || kind create cluster --name "$cluster" --config k8s/kind.yaml
kind load docker-image "$image" --name "$cluster"
helm upgrade --install dedup charts/dedup -n dedup --create-namespace --wait --timeout 10m \
  --set pipeline.ingest.serviceType=NodePort --set pipeline.ingest.serviceNodePort=30800
kubectl -n dedup rollout status deployment/events-ingest --timeout=5m
kubectl -n dedup rollout status deployment/events-worker --timeout=5m

sample=${SAMPLE:-../shared/samples/app_list.json}
for _ in 1 2; do
  curl -fsS -H 'Content-Type: application/json' --data-binary @"$sample" http://127.0.0.1:8000/product_events/; echo
done
sleep 2
kubectl -n dedup exec statefulset/dedup-dedup-postgresql -- \
  psql -U dedup -d dedup -c 'SELECT event_date, event_name, r, received_at FROM product_events'
kubectl get dedup -n dedup
