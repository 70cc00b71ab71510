#!/usr/bin/env python3
"""Checks docker-compose.dev.yml without a Docker engine: every service has a health check and a
pinned image (or is built here), dependencies wait for health or completion, the worker can be
scaled, and every file it mounts exists in the repository."""
import os
import sys

import yaml

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
compose = yaml.safe_load(open(os.path.join(root, "docker-compose.dev.yml")))
services = compose["services"]
problems = []
required = {"rabbitmq", "redis", "postgres", "migrate", "ingest", "worker", "prometheus", "grafana"}
if missing := required - services.keys():
    problems.append(f"services missing: {sorted(missing)}")
for name, svc in services.items():
    image = svc.get("image", "")
    if "build" not in svc and (":" not in image or image.endswith(":latest")):
        problems.append(f"{name}: image {image!r} is not pinned to a tag")
    if name != "migrate" and "healthcheck" not in svc:
        problems.append(f"{name}: no healthcheck")
    for dep, cond in (svc.get("depends_on") or {}).items():
        if dep not in services:
            problems.append(f"{name}: depends on unknown service {dep}")
        if cond.get("condition") not in ("service_healthy", "service_completed_successfully"):
            problems.append(f"{name}: depends on {dep} without waiting for health or completion")
    for volume in svc.get("volumes", []):
        source = volume.split(":")[0]
        if source.startswith("./") and not os.path.exists(os.path.join(root, source)):
            problems.append(f"{name}: mounts {source}, which does not exist")
    if svc.get("env_file") and not os.path.exists(os.path.join(root, svc["env_file"])):
        problems.append(f"{name}: env_file {svc['env_file']} does not exist")
worker = services.get("worker", {})
if "container_name" in worker or worker.get("ports"):
    problems.append("worker: container_name or host ports prevent --scale")
if services.get("worker", {}).get("depends_on", {}).get("migrate", {}).get("condition") != "service_completed_successfully":
    problems.append("worker must wait for migrate to complete")
# ingest takes events only with a write key, from a mounted key file listing the dev key.
ingest_env = services.get("ingest", {}).get("environment", {})
if ingest_env.get("AUTH") != "keys":
    problems.append("ingest: write keys must be on (AUTH: keys)")
key_path = ingest_env.get("WRITE_KEYS_PATH", "")
mounts = [v.split(":") for v in services.get("ingest", {}).get("volumes", [])]
host_dir = next((src for src, dst, *_ in mounts if key_path.startswith(dst.rstrip("/") + "/")), None)
if host_dir is None:
    problems.append(f"ingest: WRITE_KEYS_PATH {key_path!r} is not in a mounted directory")
else:
    import hashlib, re
    key_file_path = os.path.join(root, host_dir, os.path.basename(key_path))
    text = open(key_file_path).read()
    listed = {k["sha256"] for k in yaml.safe_load(text)["keys"]}
    documented = re.findall(r"dk_[A-Za-z0-9_-]{43}", text)
    if not documented or any(hashlib.sha256(k.encode()).hexdigest() not in listed for k in documented):
        problems.append(f"{key_file_path}: the documented dev key is not one of its keys")
if problems:
    sys.exit("docker-compose.dev.yml:\n  " + "\n  ".join(problems))
print(f"docker-compose.dev.yml OK ({len(services)} services)")
