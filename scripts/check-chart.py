#!/usr/bin/env python3
"""Checks charts/dedup without a cluster: `helm lint --strict` and rendering through the real Helm
engine (helm-python-sdk) for several value sets, every rendered object validated against the
Kubernetes schemas (kubernetes-validate, strict) and the DedupPipeline against the operator's CRD,
plus invariants: selectors match pod labels, probes and Services target declared ports, no secret
value in a ConfigMap, every image pinned, the chart's CRD is the operator's."""
import copy
import os
import sys

import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
CHART = os.path.join(ROOT, "charts", "dedup")
KUBE_VERSION = "1.33.0"
problems = []


def check(ok, message):
    if not ok:
        problems.append(message)


crd_text = open(os.path.join(CHART, "crds", "dedup-pipeline.yaml")).read()
check(crd_text == open(os.path.join(ROOT, "k8s", "crd", "dedup-pipeline.yaml")).read(),
      "charts/dedup/crds/dedup-pipeline.yaml differs from k8s/crd/dedup-pipeline.yaml (copy the generated CRD)")
crd = yaml.safe_load(crd_text)
pipeline_schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]

report = helm.lint(CHART, strict=True)
for m in report["messages"]:
    check(m["severity"] < 2, f"helm lint: {m['path']}: {m['error']}")
check(not report["errors"], f"helm lint errors: {report['errors']}")

value_sets = {
    "defaults": {},
    "existing secret": {"connections": {"existingSecret": "my-urls"}},
    "monitoring on": {"monitoring": {"prometheusRule": {"enabled": True}, "dashboard": {"enabled": True}}},
    "autoscaling bounds": {"pipeline": {"worker": {"minReplicas": 0, "maxReplicas": 50, "targetMessagesPerWorker": 200}}},
    "no migrations, no pipeline": {"migrations": {"enabled": False}, "pipeline": {"enabled": False}},
}
chart = helm.Chart.load(CHART)
for label, values in value_sets.items():
    rendered = chart.render(values, name="rel", namespace="prod", is_install=True)
    docs = [d for path, text in rendered.items() if path.endswith(".yaml") for d in yaml.safe_load_all(text) if d]
    kinds = [d["kind"] for d in docs]
    for doc in docs:
        where = f"[{label}] {doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] == "DedupPipeline":
            try:
                jsonschema.validate(doc, pipeline_schema)
            except jsonschema.ValidationError as e:
                problems.append(f"{where}: not valid against the CRD: {e.message}")
        elif doc["kind"] == "PrometheusRule":
            groups = doc["spec"].get("groups", [])
            check(groups and all(r.get("alert") and r.get("expr") for g in groups for r in g["rules"]), f"{where}: empty or malformed rules")
        else:
            try:
                kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                problems.append(f"{where}: {e.message}")
        if doc["kind"] == "ConfigMap":
            for key, value in (doc.get("data") or {}).items():
                check("://" not in value or "@" not in value.split("://", 1)[1].split("/", 1)[0], f"{where}: {key} looks like a URL with credentials")
        pod = doc.get("spec", {}).get("template", {}).get("spec") if doc["kind"] in ("Deployment", "Job") else None
        if pod:
            labels = doc["spec"]["template"]["metadata"].get("labels", {})
            if doc["kind"] == "Deployment":
                for k, v in doc["spec"]["selector"]["matchLabels"].items():
                    check(labels.get(k) == v, f"{where}: selector {k}={v} does not match the pod labels")
            check(pod.get("securityContext", {}).get("runAsNonRoot") is True, f"{where}: pod may run as root")
            for c in pod["containers"]:
                image = c["image"]
                check(":" in image and not image.endswith(":latest"), f"{where}: image {image} is not pinned")
                check(c.get("securityContext", {}).get("readOnlyRootFilesystem") is True, f"{where}: writable root filesystem")
                ports = {p.get("name") for p in c.get("ports", [])} | {p["containerPort"] for p in c.get("ports", [])}
                for probe in ("livenessProbe", "readinessProbe"):
                    if probe in c:
                        check(c[probe]["httpGet"]["port"] in ports, f"{where}: {probe} targets an undeclared port")
    for svc in (d for d in docs if d["kind"] == "Service"):
        targets = [d for d in docs if d["kind"] == "Deployment"
                   and all(d["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in svc["spec"]["selector"].items())]
        check(targets, f"[{label}] Service {svc['metadata']['name']} selects no pods")
        for port in svc["spec"]["ports"]:
            declared = {p.get("name") for t in targets for c in t["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
            check(port["targetPort"] in declared, f"[{label}] Service {svc['metadata']['name']} targets undeclared port {port['targetPort']}")
    if label == "existing secret":
        check("Secret" not in kinds, "an existing Secret is used, the chart must not create one")
    if label == "monitoring on":
        check("PrometheusRule" in kinds and any(d["kind"] == "ConfigMap" and d["metadata"]["labels"].get("grafana_dashboard") == "1" for d in docs),
              "monitoring on: PrometheusRule and dashboard ConfigMap expected")
    if label == "defaults":
        check({"Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Service", "Secret", "Job", "DedupPipeline"} <= set(kinds),
              f"defaults: missing kinds, got {sorted(set(kinds))}")

# Wrong values are refused by the chart's schema with a clear message.
for wrong in ({"pipeline": {"worker": {"minReplicas": -1}}}, {"image": {"pullPolicy": "Sometimes"}}):
    try:
        chart.render(wrong, name="rel", namespace="prod")
        problems.append(f"values {wrong} were accepted")
    except Exception as e:  # the SDK raises its own error types
        check("minReplicas" in str(e) or "pullPolicy" in str(e), f"unclear error for {wrong}: {e}")

if problems:
    sys.exit("charts/dedup:\n  " + "\n  ".join(problems))
print(f"charts/dedup OK ({len(value_sets)} value sets rendered and validated)")
