#!/usr/bin/env python3
"""Checks charts/dedup without a cluster: `helm lint --strict` and rendering through the real Helm
engine (helm-python-sdk) for several value sets, every rendered object validated against the
Kubernetes schemas (kubernetes-validate, strict) and the DedupPipeline against the operator's CRD,
plus invariants: selectors match pod labels, probes and Services target declared ports, no secret
value in a ConfigMap, every image pinned, the chart's CRD is the operator's."""
import copy
import json
import os
import re
import subprocess
import sys

import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
CHART = os.path.join(ROOT, "charts", "dedup")
KUBE_VERSION = "1.33.0"
problems = []
MONITORING_KINDS = ("ServiceMonitor", "PodMonitor", "PrometheusRule")
KEDA_KINDS = ("ScaledObject", "TriggerAuthentication")
# Rendered prometheus-operator and KEDA objects, validated against their CRD schemas below.
crd_objects = []
WORKLOADS = ("Deployment", "StatefulSet", "Job", "Pod")


def check(ok, message):
    if not ok:
        problems.append(message)


def check_operator_rules(role, where):
    """The operator's own rights: Secrets only by name, and patch on what it server-side applies."""
    for rule in role["rules"]:
        if "secrets" in rule["resources"]:
            check(rule["verbs"] == ["get"], f"{where}: the operator may only get Secrets by name, not {rule['verbs']}")
        if {"deployments", "services", "configmaps"} & set(rule["resources"]):
            check("patch" in rule["verbs"], f"{where}: the operator server-side applies {rule['resources']}: it needs patch, has {rule['verbs']}")


def rights(role):
    """A role's rules as (API group, resource, verb) triples, however they are grouped."""
    return {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


# The default render's operator roles, which k8s/rbac.yaml must grant alike.
chart_operator_roles = {}

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
    "external services": {"rabbitmq": {"enabled": False}, "redis": {"enabled": False}, "postgresql": {"enabled": False},
                          "connections": {"databaseUrl": "postgres://u:p@db.example:5432/dedup?sslmode=verify-full",
                                          "tlsCaSecret": "corp-ca"}},
    "monitoring on": {"monitoring": {"prometheusRule": {"enabled": True}, "dashboard": {"enabled": True},
                                     "serviceMonitors": {"enabled": True}}},
    "network policies off, ingress on": {"networkPolicies": {"enabled": False},
                                        "ingress": {"enabled": True, "className": "nginx", "host": "events.example.com", "tlsSecret": "events-tls"}},
    "autoscaling bounds": {"pipeline": {"worker": {"minReplicas": 0, "maxReplicas": 50, "targetMessagesPerWorker": 200}}},
    "no migrations, no pipeline": {"migrations": {"enabled": False}, "pipeline": {"enabled": False}},
    "own write keys, rate limits": {"pipeline": {"ingest": {"writeKeysSecret": "my-keys", "rateLimit": {
        "perKey": 100, "perAddress": 20, "trustedProxies": ["10.0.0.0/8"]}}}},
    "open ingest": {"pipeline": {"ingest": {"auth": "none"}}},
    "namespace-scoped operator": {"operator": {"watchNamespaces": ["prod", "team-b"]}},
    "placed, private registry, kube-prometheus-stack, as a subchart": {
        "global": {"imageRegistry": "registry.example"}, "imagePullSecrets": ["regcred"], "nodeSelector": {"pool": "events"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "events", "effect": "NoSchedule"}],
        "priorityClassName": "high", "redis": {"resources": {"limits": {"cpu": "1", "memory": "512Mi"}}},
        "monitoring": {"labels": {"release": "kps"}, "annotations": {"team": "data"},
        "prometheusRule": {"enabled": True}, "dashboard": {"enabled": True}, "serviceMonitors": {"enabled": True}}},
    "storage class, existing claim": {"postgresql": {"existingClaim": "pg-data",
                                                     "settings": {"shared_buffers": "512MB", "wal_compression": None}},
                                      "redis": {"storageClass": "fast"}},
    "existing credentials and URLs": {"credentials": {"existingSecret": "vault-creds"}, "connections": {"existingSecret": "vault-urls"}},
    "keda autoscaling, extra settings": {"pipeline": {
        "worker": {"minReplicas": 0, "settings": {"BATCH_SIZE": "500", "RETENTION": "30d"},
                   "autoscaling": {"mode": "keda", "activation": 5, "vhost": "events",
                                   "scaleUpLimit": {"pods": 4, "percent": 100, "periodSeconds": 30}}},
        "ingest": {"settings": {"MAX_BODY_BYTES": "65536"}},
        "dedup": {"queueShards": 4}}},
    "operator autoscaling on the publish rate": {"pipeline": {"worker": {"autoscaling": {
        "metric": "messageRate", "targetPublishRatePerWorker": 300, "scaleUpLimit": {"percent": 50}}}}},
    "autoscaling left to the user": {"pipeline": {"worker": {"autoscaling": {"mode": "none"}}}},
    "traces": {"tracing": {"otlpEndpoint": "http://otel-collector.observability:4318"}},
    "given passwords": {"credentials": {"rabbitmqPassword": "rabbit-pw", "postgresPassword": "pg-pw",
                                        "redisPassword": "redis-pw", "redisWorkerPassword": "worker-pw"}},
}
# The values scripts/kind-up.sh and minikube-up.sh install with (scripts/cluster/install.sh,
# MONITORING=1), so the README's path is rendered too; and every repository file those scripts
# name exists (they run from a fresh clone).
for script in ("kind-up.sh", "minikube-up.sh", "cluster/install.sh"):
    text = open(os.path.join(ROOT, "scripts", script)).read()
    for path in set(re.findall(r"(?<![\w/.])((?:samples|k8s|charts|scripts)/[\w./-]+\w)", text)):
        check(os.path.exists(os.path.join(ROOT, path)), f"scripts/{script} uses {path}, which is not in the repository")
kind_values = {}
for key, value in re.findall(r"--set ((?:pipeline|monitoring)\.[\w.]+)=([^\s)]+)", open(os.path.join(ROOT, "scripts", "cluster", "install.sh")).read()):
    *parents, leaf = key.split(".")
    node = kind_values
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = True if value == "true" else int(value) if value.isdigit() else value
check(kind_values.get("monitoring") and kind_values.get("pipeline"), "scripts/cluster/install.sh: its --set values were not found")
value_sets["scripts/cluster/install.sh with MONITORING=1"] = kind_values
# What dedup-operator applies for each rendered DedupPipeline, from `dedup-operator render`
# (the binary the test command built): validated like the chart's own objects, KEDA's kinds
# against KEDA's CRD schemas.
target_dir = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
operator_bin = os.path.join(target_dir, "debug", "dedup-operator")
if not os.path.exists(operator_bin):
    subprocess.run(["cargo", "build", "-q", "--locked", "-p", "dedup-operator"], cwd=ROOT, check=True)


def check_postgres_takes(args):
    """Starts nothing: asks the machine's PostgreSQL server binary (`postgres -C`, on a scratch
    data directory) to read each `-c name=value` of `args`, so a name or value it does not take
    fails here instead of in a cluster's crash-looping pod."""
    import glob
    import pwd
    import shutil
    import tempfile
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    if not bins:
        check(False, "no PostgreSQL server binary under /usr/lib/postgresql: install postgresql")
        return
    postgres, initdb = bins[-1], os.path.join(os.path.dirname(bins[-1]), "initdb")
    # The server refuses to run as root: run it as the postgres user where this is root.
    as_user = [] if os.geteuid() != 0 else ["runuser", "-u", "postgres", "--"]
    scratch = tempfile.mkdtemp(prefix="dedup-pg-settings-")
    try:
        if as_user:
            user = pwd.getpwnam("postgres")
            os.chown(scratch, user.pw_uid, user.pw_gid)
        data = os.path.join(scratch, "data")
        subprocess.run(as_user + [initdb, "-D", data, "-A", "trust", "-U", "postgres"],
                       check=True, capture_output=True)
        for name_value in args[1::2]:
            name, value = name_value.split("=", 1)
            done = subprocess.run(as_user + [postgres, "-D", data, "-c", name_value, "-C", name],
                                  capture_output=True, text=True)
            check(done.returncode == 0 and done.stdout.strip() != "",
                  f"postgresql.settings: PostgreSQL ({postgres}) does not take {name_value}: {done.stderr.strip()}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def operator_objects(pipeline):
    result = subprocess.run([operator_bin, "render", "-"], input=yaml.safe_dump(pipeline), capture_output=True, text=True)
    check(result.returncode == 0, f"dedup-operator render failed: {result.stderr.strip()}")
    return [d for d in yaml.safe_load_all(result.stdout) if d] if result.returncode == 0 else []


chart = helm.Chart.load(CHART)
chart_meta_version = yaml.safe_load(open(os.path.join(CHART, "Chart.yaml")))["version"]
for label, values in value_sets.items():
    rendered = chart.render(values, name="rel", namespace="prod", is_install=True)
    docs = [d for path, text in rendered.items() if path.endswith(".yaml") for d in yaml.safe_load_all(text) if d]
    check(any(path.endswith("NOTES.txt") and "product_events" in text for path, text in rendered.items()), f"[{label}] NOTES.txt should say how to send an event")
    kinds = [d["kind"] for d in docs]
    pipeline = next((d for d in docs if d["kind"] == "DedupPipeline"), None)
    notes = next(text for path, text in rendered.items() if path.endswith("NOTES.txt"))
    applied = operator_objects(pipeline) if pipeline else []
    for doc in applied:
        where = f"[{label}] operator's {doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in KEDA_KINDS:
            crd_objects.append((where, doc))
        else:
            try:
                kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                problems.append(f"{where}: {e.message}")
    applied_kinds = [d["kind"] for d in applied]
    if pipeline:
        keda = pipeline["spec"]["worker"].get("autoscaling", {}).get("mode") == "keda"
        check(("ScaledObject" in applied_kinds) == keda and ("TriggerAuthentication" in applied_kinds) == keda,
              f"[{label}] the operator makes KEDA's objects exactly in keda mode, got {applied_kinds}")
    for doc in docs:
        where = f"[{label}] {doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] == "DedupPipeline":
            try:
                jsonschema.validate(doc, pipeline_schema)
            except jsonschema.ValidationError as e:
                problems.append(f"{where}: not valid against the CRD: {e.message}")
        elif doc["kind"] in MONITORING_KINDS:
            crd_objects.append((where, doc))
            if doc["kind"] == "PrometheusRule":
                groups = doc["spec"].get("groups", [])
                check(groups and all(r.get("alert") and r.get("expr") for g in groups for r in g["rules"]), f"{where}: empty or malformed rules")
            else:
                endpoints = doc["spec"].get("endpoints") or doc["spec"].get("podMetricsEndpoints") or []
                check(endpoints and all(e.get("port") for e in endpoints), f"{where}: no named metrics port")
        else:
            try:
                kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                problems.append(f"{where}: {e.message}")
        if doc["kind"] == "ConfigMap":
            for key, value in (doc.get("data") or {}).items():
                check("://" not in value or "@" not in value.split("://", 1)[1].split("/", 1)[0], f"{where}: {key} looks like a URL with credentials")
        pod = None
        if doc["kind"] in WORKLOADS:
            pod = doc["spec"] if doc["kind"] == "Pod" else doc["spec"]["template"]["spec"]
        if pod:
            if doc["kind"] in ("Deployment", "StatefulSet"):
                labels = doc["spec"]["template"]["metadata"].get("labels", {})
                for k, v in doc["spec"]["selector"]["matchLabels"].items():
                    check(labels.get(k) == v, f"{where}: selector {k}={v} does not match the pod labels")
            psc = pod.get("securityContext", {})
            for c in pod["containers"] + pod.get("initContainers", []):
                image = c["image"]
                check(":" in image and not image.endswith(":latest"), f"{where}: image {image} is not pinned")
                csc = c.get("securityContext", {})
                # Every container, ours and the bundled services': non-root, read-only root
                # filesystem, no privilege escalation, no capabilities, seccomp RuntimeDefault.
                check(csc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, f"{where}: container {c['name']} may run as root")
                check(csc.get("readOnlyRootFilesystem") is True, f"{where}: container {c['name']} has a writable root filesystem")
                check(csc.get("allowPrivilegeEscalation") is False, f"{where}: container {c['name']} allows privilege escalation")
                check(csc.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: container {c['name']} keeps capabilities")
                seccomp = csc.get("seccompProfile", psc.get("seccompProfile", {})).get("type")
                check(seccomp == "RuntimeDefault", f"{where}: container {c['name']} has seccomp {seccomp}, not RuntimeDefault")
                ports = {p.get("name") for p in c.get("ports", [])} | {p["containerPort"] for p in c.get("ports", [])}
                for probe in ("livenessProbe", "readinessProbe"):
                    action = c.get(probe, {}).get("httpGet") or c.get(probe, {}).get("tcpSocket")
                    if action:
                        check(action["port"] in ports, f"{where}: {probe} targets an undeclared port")
                    elif doc["kind"] not in ("Job", "Pod"):  # run-to-completion: no probes
                        check("exec" in c.get(probe, {}), f"{where}: no {probe}")
    for svc in (d for d in docs if d["kind"] == "Service"):
        targets = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")
                   and all(d["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in svc["spec"]["selector"].items())]
        check(targets, f"[{label}] Service {svc['metadata']['name']} selects no pods")
        for port in svc["spec"]["ports"]:
            declared = {p.get("name") for t in targets for c in t["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
            check(port["targetPort"] in declared, f"[{label}] Service {svc['metadata']['name']} targets undeclared port {port['targetPort']}")
    if label == "existing secret":
        check(not any(d["kind"] == "Secret" and d["metadata"]["name"].endswith("-urls") for d in docs),
              "an existing URL Secret is named: the chart must not create one")
        pipeline_secrets = next(d for d in docs if d["kind"] == "DedupPipeline")["spec"]["secrets"]
        check(all(ref["name"] == "my-urls" for ref in pipeline_secrets.values()), "the pipeline must use the existing Secret")
    if label.startswith("monitoring on") or "MONITORING=1" in label:
        check({"ServiceMonitor", "PodMonitor"} <= set(kinds), "monitoring on: ServiceMonitor and PodMonitors expected")
        check("PrometheusRule" in kinds and any(d["kind"] == "ConfigMap" and d["metadata"]["labels"].get("grafana_dashboard") == "1" for d in docs),
              "monitoring on: PrometheusRule and dashboard ConfigMap expected")
    job = next((d for d in docs if d["kind"] == "Job"), None)
    if job:
        hooks = job["metadata"]["annotations"]["helm.sh/hook"].split(",")
        bundled_db = label not in ("external services",)
        check(("post-install" if bundled_db else "pre-install") in hooks and "pre-upgrade" in hooks,
              f"[{label}] migrations must run before install (external database) or right after it (bundled), and before upgrades: {hooks}")
    if label == "external services":
        check(not any(d["kind"] == "StatefulSet" for d in docs), "external services: no StatefulSet expected")
        urls = next(d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"].endswith("-urls"))["stringData"]
        check(urls["postgres"] == "postgres://u:p@db.example:5432/dedup?sslmode=verify-full", "external services: the given database URL is used")
        check(pipeline["spec"]["secrets"]["tlsCa"] == {"name": "corp-ca", "key": "ca.crt"}, "external services: the pipeline names the CA Secret")
        migrate = next(d for d in docs if d["kind"] == "Job")["spec"]["template"]["spec"]
        env = {e["name"]: e.get("value") for e in migrate["containers"][0]["env"]}
        check(env.get("TLS_CA_FILE") == "/etc/dedup/tls-ca/ca.pem" and migrate["volumes"][0]["secret"]["secretName"] == "corp-ca",
              "external services: the migrations trust the CA too")
    if label == "network policies off, ingress on":
        check(not any(d["kind"] == "NetworkPolicy" for d in docs), "networkPolicies.enabled=false: no NetworkPolicy")
        ingress = next((d for d in docs if d["kind"] == "Ingress"), None)
        check(ingress is not None and ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"] == "events-ingest",
              "the Ingress routes to the pipeline's ingest Service")
    if label == "own write keys, rate limits":
        check(pipeline["spec"]["ingest"]["writeKeysSecret"] == "my-keys" and pipeline["spec"]["ingest"]["rateLimit"]["perKey"] == 100,
              "own write keys: the pipeline names the given Secret and carries the limits")
        check(not any(d["kind"] == "Secret" and "write-key" in d["metadata"]["name"] for d in docs),
              "own write keys: the chart must not make key Secrets")
        check("my-keys" in notes and "write-key --source" in notes, "own write keys: NOTES names the Secret and how to make keys")
    if label.startswith("placed, private registry"):
        for doc in (d for d in docs if d["kind"] in ("Deployment", "StatefulSet", "Job")):
            pod = doc["spec"]["template"]["spec"]
            check(pod.get("imagePullSecrets") == [{"name": "regcred"}] and pod.get("nodeSelector") == {"pool": "events"}
                  and pod.get("tolerations", [{}])[0].get("key") == "dedicated" and pod.get("priorityClassName") == "high",
                  f"placed: {doc['kind']}/{doc['metadata']['name']} is not placed as the values say")
        images = {c["image"] for d in docs if d["kind"] in ("Deployment", "StatefulSet", "Job", "Pod")
                  for c in (d["spec"] if d["kind"] == "Pod" else d["spec"]["template"]["spec"])["containers"]}
        images.add(pipeline["spec"]["image"])
        check(all(i.startswith("registry.example/") for i in images), f"global.imageRegistry: every image from it, got {images}")
        check(pipeline["spec"]["pods"] == {"imagePullSecrets": ["regcred"], "nodeSelector": {"pool": "events"},
                                           "tolerations": values["tolerations"], "priorityClassName": "high"},
              f"placed: the pipeline's pods carry the placement, got {pipeline['spec'].get('pods')}")
        redis_args = next(e["value"] for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "rel-dedup-redis"
                          for e in d["spec"]["template"]["spec"]["containers"][0]["env"] if e["name"] == "REDIS_ARGS")
        check("--maxmemory 409mb " in redis_args, f"placed: maxmemory follows a 512Mi limit: {redis_args}")
        monitors = [d for d in docs if d["kind"] in MONITORING_KINDS or d["metadata"].get("labels", {}).get("grafana_dashboard")]
        check(len(monitors) >= 5 and all(d["metadata"]["labels"].get("release") == "kps" and d["metadata"].get("annotations") == {"team": "data"}
                                         for d in monitors), "monitoring.labels and annotations on every monitoring object")
    if label == "storage class, existing claim":
        sts = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "StatefulSet"}
        pg = sts["rel-dedup-postgresql"]
        args = pg["template"]["spec"]["containers"][0].get("args")
        check(args == ["-c", "checkpoint_timeout=15min", "-c", "max_wal_size=2GB", "-c", "shared_buffers=512MB"],
              f"postgresql.settings: a setting added and a default dropped with null, got {args}")
        check("volumeClaimTemplates" not in pg and {"name": "data", "persistentVolumeClaim": {"claimName": "pg-data"}} in pg["template"]["spec"]["volumes"],
              "existingClaim: PostgreSQL uses the given claim and makes none")
        check(sts["rel-dedup-redis"]["volumeClaimTemplates"][0]["spec"].get("storageClassName") == "fast"
              and "storageClassName" not in sts["rel-dedup-rabbitmq"]["volumeClaimTemplates"][0]["spec"],
              "storageClass: on Redis's claim only")
    if label == "existing credentials and URLs":
        check(not any(d["kind"] == "Secret" and d["metadata"]["name"].endswith(("-credentials", "-urls")) for d in docs),
              "existing credentials: the chart must make neither the credentials nor the URL Secret")
        refs = {e["valueFrom"]["secretKeyRef"]["name"] for d in docs if d["kind"] == "StatefulSet"
                for c in d["spec"]["template"]["spec"]["containers"] for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
        check(refs == {"vault-creds"}, f"existing credentials: the bundled services read their passwords from it, got {refs}")
    if label == "keda autoscaling, extra settings":
        scaled = next(d for d in applied if d["kind"] == "ScaledObject")
        trigger = scaled["spec"]["triggers"][0]["metadata"]
        check(trigger["vhostName"] == "events" and trigger["activationValue"] == "5" and trigger["protocol"] == "http"
              and scaled["spec"]["minReplicaCount"] == 0, f"keda: the ScaledObject follows the values, got {scaled['spec']}")
        check(trigger.get("useRegex") == "true" and trigger.get("operation") == "sum"
              and trigger["queueName"] == r"(?-i)^(product_events|product_events\.1|product_events\.2|product_events\.3)$",
              f"keda: four queue shards are summed by an exact pattern, got {trigger}")
        config = next(d for d in applied if d["kind"] == "ConfigMap")
        check(config["data"].get("AMQP_QUEUE_SHARDS") == "4", f"keda: the shards reach both binaries, got {config['data']}")
        worker = next(d for d in applied if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-worker"))
        env = {e["name"]: e.get("value") for e in worker["spec"]["template"]["spec"]["containers"][0]["env"]}
        check(env.get("BATCH_SIZE") == "500" and env.get("RETENTION") == "30d",
              f"keda: the worker Deployment carries the settings, got {env}")
        ingest = next(d for d in applied if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-ingest"))
        check(any(e["name"] == "MAX_BODY_BYTES" for e in ingest["spec"]["template"]["spec"]["containers"][0]["env"]),
              "ingest.settings reach ingest")
    if label == "traces":
        operator = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "rel-dedup-operator")
        env = {e["name"]: e.get("value") for e in operator["spec"]["template"]["spec"]["containers"][0]["env"]}
        config = next(d for d in applied if d["kind"] == "ConfigMap")["data"]
        check(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") == "http://otel-collector.observability:4318"
              and config.get("OTEL_EXPORTER_OTLP_ENDPOINT") == "http://otel-collector.observability:4318",
              f"traces: the endpoint reaches the operator and, through the pipeline, ingest and the workers: {env} {config}")
    if label == "given passwords":
        # Stable under `helm template`: a second render makes the same Secrets.
        again = chart.render(values, name="rel", namespace="prod", is_install=True)
        secrets = lambda r: [d for p, t in r.items() if p.endswith("secret.yaml") for d in yaml.safe_load_all(t) if d]
        check(secrets(rendered) == secrets(again), "given passwords: two renders must make the same Secrets")
        urls = next(d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"].endswith("-urls"))["stringData"]
        check(urls["postgres"] == "postgres://dedup:pg-pw@rel-dedup-postgresql:5432/dedup"
              and urls["redis"] == "redis://dedup-worker:worker-pw@rel-dedup-redis:6379" and ":rabbit-pw@" in urls["rabbitmq"],
              f"given passwords: the URLs use them, got {urls}")
    if label == "namespace-scoped operator":
        check(not any(d["kind"] in ("ClusterRole", "ClusterRoleBinding") for d in docs), "namespace-scoped: nothing cluster-wide")
        roles = {(d["kind"], d["metadata"]["namespace"]) for d in docs if d["kind"] in ("Role", "RoleBinding")
                 and not d["metadata"]["name"].endswith("-leader")}
        check(roles == {(k, ns) for k in ("Role", "RoleBinding") for ns in ("prod", "team-b")}, f"namespace-scoped: a Role and RoleBinding per namespace, got {roles}")
        operator = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-operator"))
        env = {e["name"]: e.get("value") for e in operator["spec"]["template"]["spec"]["containers"][0]["env"]}
        check(env.get("WATCH_NAMESPACES") == "prod,team-b", f"namespace-scoped: WATCH_NAMESPACES, got {env}")
    for role in (d for d in docs if d["kind"] in ("Role", "ClusterRole") and d["metadata"]["name"].endswith("-operator")):
        check_operator_rules(role, f"[{label}] {role['kind']}/{role['metadata']['name']}")
    if label == "defaults":
        chart_operator_roles = {d["kind"]: d for d in docs if d["kind"] in ("Role", "ClusterRole")
                                and d["metadata"]["name"].endswith(("-operator", "-operator-leader"))}
    if label == "open ingest":
        check(pipeline["spec"]["ingest"]["auth"] == "none" and "writeKeysSecret" not in pipeline["spec"]["ingest"],
              "auth none: no key Secret named")
        check(not any(d["kind"] == "Secret" and "write-key" in d["metadata"]["name"] for d in docs), "auth none: no key Secrets")
        check("anyone" in notes and "Authorization" not in notes, "auth none: NOTES says the endpoint is open")
    if label == "defaults":
        import base64, hashlib
        keys = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "Secret" and "write-key" in d["metadata"]["name"]}
        first = base64.b64decode(keys["rel-dedup-first-write-key"]["key"]).decode()
        key_file = yaml.safe_load(base64.b64decode(keys["rel-dedup-write-keys"]["write-keys.yaml"]))
        check(first.startswith("dk_") and len(first) == 46, "defaults: a generated first write key")
        check(key_file == {"keys": [{"source": "default", "sha256": hashlib.sha256(first.encode()).hexdigest()}]},
              f"defaults: the key file lists the first key's SHA-256 only: {key_file}")
        check(pipeline["spec"]["ingest"]["auth"] == "keys" and pipeline["spec"]["ingest"]["writeKeysSecret"] == "rel-dedup-write-keys",
              "defaults: write keys on, from the chart's Secret")
        check("rel-dedup-first-write-key" in notes and "Bearer $DEDUP_WRITE_KEY" in notes, "defaults: NOTES tells how to read and send the key")
        check(not any(d["kind"] == "Ingress" for d in docs), "defaults: no Ingress")
        policies = {d["metadata"]["name"] for d in docs if d["kind"] == "NetworkPolicy"}
        check(policies == {"rel-dedup-rabbitmq", "rel-dedup-redis", "rel-dedup-postgresql"},
              f"defaults: a NetworkPolicy for each bundled service, got {policies}")
        sts = {d["metadata"]["name"] for d in docs if d["kind"] == "StatefulSet"}
        check(sts == {"rel-dedup-rabbitmq", "rel-dedup-redis", "rel-dedup-postgresql"}, f"defaults: bundled services expected, got {sts}")
        pg = next(d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "rel-dedup-postgresql")
        pg_args = pg["spec"]["template"]["spec"]["containers"][0].get("args")
        check(pg_args == ["-c", "checkpoint_timeout=15min", "-c", "max_wal_size=2GB", "-c", "wal_compression=lz4"],
              f"defaults: the bundled PostgreSQL's settings, got {pg_args}")
        check_postgres_takes(pg_args)
        urls = next(d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"].endswith("-urls"))["stringData"]
        creds = next(d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"].endswith("-credentials"))["data"]
        import base64
        pw = base64.b64decode(creds["postgres-password"]).decode()
        check(urls["postgres"] == f"postgres://dedup:{pw}@rel-dedup-postgresql:5432/dedup", "defaults: the URL uses the generated password")
        redis_pw = base64.b64decode(creds["redis-worker-password"]).decode()
        check(urls["redis"] == f"redis://dedup-worker:{redis_pw}@rel-dedup-redis:6379",
              "defaults: the workers reach Redis as their ACL user with the generated password")
        redis = next(d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "rel-dedup-redis")
        args = next(e["value"] for e in redis["spec"]["template"]["spec"]["containers"][0]["env"] if e["name"] == "REDIS_ARGS")
        check("--requirepass $(REDIS_PASSWORD)" in args and "--user dedup-worker on >$(REDIS_WORKER_PASSWORD)" in args,
              f"defaults: the bundled Redis requires a password and has the workers' ACL user: {args}")
        limit = redis["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
        check(limit == "1Gi" and "--maxmemory 819mb --maxmemory-policy volatile-ttl" in args,
              f"defaults: Redis's maxmemory is 80 % of its 1Gi limit, evicting by TTL: {args}")
        pdbs = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "PodDisruptionBudget"}
        check(pdbs.get("rel-dedup-worker", {}).get("maxUnavailable") == 1
              and pdbs["rel-dedup-worker"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "worker",
              f"defaults: a PodDisruptionBudget for the workers, got {pdbs}")
        check(pdbs.get("rel-dedup-operator", {}).get("maxUnavailable") == 1,
              f"defaults: a PodDisruptionBudget keeps one of the two operator replicas, got {pdbs}")
        for claim in (c for d in docs if d["kind"] == "StatefulSet" for c in d["spec"]["volumeClaimTemplates"]):
            check(claim["spec"]["resources"]["requests"]["storage"], "every bundled service has a persistent volume")
        operator = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "rel-dedup-operator")
        env = {e["name"]: e.get("value") for e in operator["spec"]["template"]["spec"]["containers"][0]["env"]}
        check(operator["spec"]["replicas"] == 2 and env.get("LEADER_ELECTION") == "true"
              and env.get("LEASE_NAME") == "rel-dedup-operator" and env.get("LEASE_NAMESPACE") == "prod",
              f"defaults: two operator replicas electing a leader on a Lease in the release namespace, got {env}")
        lease_role = next((d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == "rel-dedup-operator-leader"), None)
        check(lease_role is not None and lease_role["rules"] == [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                                                                  "verbs": ["get", "create", "update"]}]
              and any(d["kind"] == "RoleBinding" and d["roleRef"]["name"] == "rel-dedup-operator-leader" for d in docs),
              "defaults: the operator may get, create and update its Lease")
        check({"Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Service", "Secret", "Job", "DedupPipeline"} <= set(kinds),
              f"defaults: missing kinds, got {sorted(set(kinds))}")

# The chart as a subchart of an umbrella chart, with global values and its own under `dedup`.
import shutil
import tempfile
with tempfile.TemporaryDirectory() as umbrella:
    os.makedirs(os.path.join(umbrella, "charts"))
    shutil.copytree(CHART, os.path.join(umbrella, "charts", "dedup"))
    with open(os.path.join(umbrella, "Chart.yaml"), "w") as f:
        yaml.safe_dump({"apiVersion": "v2", "name": "platform", "version": "1.0.0",
                        "dependencies": [{"name": "dedup", "version": chart_meta_version, "repository": "file://charts/dedup"}]}, f)
    with open(os.path.join(umbrella, "values.yaml"), "w") as f:
        yaml.safe_dump({"global": {"imageRegistry": "registry.example", "storageClass": "fast"},
                        "dedup": {"pipeline": {"name": "platform-events"}, "monitoring": {"serviceMonitors": {"enabled": True}}}}, f)
    rendered = helm.Chart.load(umbrella).render({}, name="platform", namespace="data", is_install=True)
    docs = [d for path, text in rendered.items() if path.endswith(".yaml") for d in yaml.safe_load_all(text) if d]
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    check(("Deployment", "platform-dedup-operator") in names and ("DedupPipeline", "platform-events") in names
          and any(k == "ServiceMonitor" for k, _ in names), f"as a subchart: the operator, the pipeline and the monitors are rendered, got {sorted(names)}")
    for doc in docs:
        if doc["kind"] in MONITORING_KINDS or doc["kind"] == "DedupPipeline":
            continue
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            problems.append(f"[as a subchart] {doc['kind']}/{doc['metadata']['name']}: {e.message}")

# An existing credentials Secret that cannot be read (helm template) without the URLs given:
# the render fails and says what to do.
try:
    chart.render({"credentials": {"existingSecret": "vault-creds"}}, name="rel", namespace="prod", is_install=True)
    problems.append("credentials.existingSecret without a readable Secret or connections.existingSecret must fail the render")
except Exception as e:  # the SDK raises the template's fail message
    check("connections.existingSecret" in str(e), f"the failed render should say to set connections.existingSecret: {e}")

# Two operators without leader election would scale the same workers: refused.
try:
    chart.render({"operator": {"replicas": 2, "leaderElection": False}}, name="rel", namespace="prod", is_install=True)
    problems.append("operator.replicas 2 without leader election must fail the render")
except Exception as e:
    check("leaderElection" in str(e), f"the failed render should name operator.leaderElection: {e}")

# The prometheus-operator's and KEDA's objects against their CRD schemas (npm packages of
# validators generated from them, pinned in scripts/chart-check/package-lock.json).
check(any(d["kind"] in MONITORING_KINDS for _, d in crd_objects), "no ServiceMonitor, PodMonitor or PrometheusRule was rendered by any value set")
check(any(d["kind"] == "ScaledObject" for _, d in crd_objects), "no ScaledObject was made for any value set")
checker = os.path.join(ROOT, "scripts", "chart-check")
if not os.path.isdir(os.path.join(checker, "node_modules")):
    subprocess.run(["npm", "ci", "--silent", "--no-audit", "--no-fund"], cwd=checker, check=True)
result = subprocess.run(["node", "validate-crd-objects.mjs"], cwd=checker, capture_output=True, text=True,
                        input=json.dumps([{"where": where, "object": doc} for where, doc in crd_objects]))
problems.extend(line for line in result.stdout.splitlines() if line)
check(result.returncode in (0, 1) and (result.returncode == 0) == (not result.stdout.strip()),
      f"the CRD object validator failed: {result.stderr.strip()}")

# The plain manifests in k8s/ validate too, and the example pipeline against the CRD.
for manifest in ("operator.yaml", "rbac.yaml", "example-pipeline.yaml"):
    for doc in yaml.safe_load_all(open(os.path.join(ROOT, "k8s", manifest))):
        where = f"k8s/{manifest}: {doc['kind']}/{doc['metadata']['name']}"
        try:
            if doc["kind"] == "DedupPipeline":
                jsonschema.validate(doc, pipeline_schema)
            else:
                kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except (jsonschema.ValidationError, kubernetes_validate.ValidationError) as e:
            problems.append(f"{where}: {e.message}")
# k8s/rbac.yaml grants the operator what the chart's default render grants it: the same rights
# in its ClusterRole and in its leader-election Role.
plain_roles = {d["kind"]: d for d in yaml.safe_load_all(open(os.path.join(ROOT, "k8s", "rbac.yaml")))
               if d["kind"] in ("Role", "ClusterRole")}
check(set(plain_roles) == {"Role", "ClusterRole"} == set(chart_operator_roles),
      f"k8s/rbac.yaml and the chart's defaults each have the operator's ClusterRole and leader Role: "
      f"{sorted(plain_roles)} / {sorted(chart_operator_roles)}")
for kind, role in plain_roles.items():
    check_operator_rules(role, f"k8s/rbac.yaml: {kind}/{role['metadata']['name']}")
    if kind in chart_operator_roles:
        plain, charted = rights(role), rights(chart_operator_roles[kind])
        check(plain == charted, f"k8s/rbac.yaml: {kind}/{role['metadata']['name']} differs from the chart's: "
                                f"only in k8s/ {sorted(plain - charted)}, only in the chart {sorted(charted - plain)}")
kustomization = yaml.safe_load(open(os.path.join(ROOT, "k8s", "kustomization.yaml")))
for resource in kustomization["resources"]:
    check(os.path.exists(os.path.join(ROOT, "k8s", resource)), f"k8s/kustomization.yaml lists missing {resource}")

# Wrong values are refused by the chart's schema with a clear message.
for wrong in ({"pipeline": {"worker": {"minReplicas": -1}}}, {"image": {"pullPolicy": "Sometimes"}}):
    try:
        chart.render(wrong, name="rel", namespace="prod")
        problems.append(f"values {wrong} were accepted")
    except Exception as e:  # the SDK raises its own error types
        check("minReplicas" in str(e) or "pullPolicy" in str(e), f"unclear error for {wrong}: {e}")

if problems:
    sys.exit("charts/dedup:\n  " + "\n  ".join(problems))
print(f"charts/dedup OK ({len(value_sets)} value sets rendered and validated with what the operator makes of each, "
      f"{len(crd_objects)} prometheus-operator and KEDA objects against their CRDs)")
