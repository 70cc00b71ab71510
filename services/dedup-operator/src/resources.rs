//! The Kubernetes objects a `DedupPipeline` becomes: a ConfigMap of settings, the ingest
//! Deployment and Service, and the worker Deployment. Pure builders: the controller applies
//! them with server-side apply; tests check every field that matters.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapEnvSource, Container, ContainerPort, EnvFromSource, EnvVar,
    EnvVarSource, HTTPGetAction, KeyToPath, LocalObjectReference, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, SeccompProfile, SecretKeySelector, SecretVolumeSource, SecurityContext,
    Service, ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;

use crate::crd::{AuthMode, AutoscalingMode, DedupPipeline, IngestSpec, ScaleMetric, SecretKey};

/// Ports the binaries listen on (fixed in the image's defaults).
pub const INGEST_PORT: i32 = 8000;
pub const INGEST_ADMIN_PORT: i32 = 9100;
pub const WORKER_ADMIN_PORT: i32 = 9101;
/// Seconds Kubernetes gives a worker pod between SIGTERM and SIGKILL.
pub const WORKER_TERMINATION_GRACE_SECONDS: i64 = 30;
/// The binaries' SHUTDOWN_GRACE: finish and ack the batch in hand 5 s before the SIGKILL.
pub const SHUTDOWN_GRACE_SECONDS: i64 = WORKER_TERMINATION_GRACE_SECONDS - 5;

/// Names and labels derived from the pipeline's name.
pub struct Names {
    pub pipeline: String,
    pub namespace: Option<String>,
}

impl Names {
    pub fn of(pipeline: &DedupPipeline) -> Self {
        Self {
            pipeline: pipeline.metadata.name.clone().unwrap_or_default(),
            namespace: pipeline.metadata.namespace.clone(),
        }
    }

    pub fn config(&self) -> String {
        format!("{}-config", self.pipeline)
    }

    pub fn ingest(&self) -> String {
        format!("{}-ingest", self.pipeline)
    }

    pub fn worker(&self) -> String {
        format!("{}-worker", self.pipeline)
    }

    /// Labels of one component's pods (also its selector).
    pub fn labels(&self, component: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("app.kubernetes.io/name".to_owned(), "dedup".to_owned()),
            (
                "app.kubernetes.io/instance".to_owned(),
                self.pipeline.clone(),
            ),
            (
                "app.kubernetes.io/component".to_owned(),
                component.to_owned(),
            ),
            (
                "app.kubernetes.io/managed-by".to_owned(),
                "dedup-operator".to_owned(),
            ),
        ])
    }

    fn meta(&self, name: String, component: &str, owner: &OwnerReference) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: self.namespace.clone(),
            labels: Some(self.labels(component)),
            owner_references: Some(vec![owner.clone()]),
            ..Default::default()
        }
    }
}

/// The owner reference that makes every object go when the pipeline is deleted.
pub fn owner(pipeline: &DedupPipeline) -> OwnerReference {
    pipeline
        .controller_owner_ref(&())
        .unwrap_or_else(|| OwnerReference {
            api_version: DedupPipeline::api_version(&()).into_owned(),
            kind: DedupPipeline::kind(&()).into_owned(),
            name: pipeline.metadata.name.clone().unwrap_or_default(),
            uid: pipeline.metadata.uid.clone().unwrap_or_default(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        })
}

/// The non-secret settings both components read (`envFrom`).
pub fn config_map(pipeline: &DedupPipeline) -> ConfigMap {
    let names = Names::of(pipeline);
    let spec = &pipeline.spec;
    let mut data = BTreeMap::from([
        ("AMQP_QUEUE".to_owned(), spec.dedup.queue.clone()),
        ("AMQP_EXCHANGE".to_owned(), spec.dedup.queue.clone()),
        (
            "AMQP_QUEUE_SHARDS".to_owned(),
            spec.dedup.queue_shards.to_string(),
        ),
        (
            "DEDUP_KEY_FIELDS".to_owned(),
            spec.dedup.key_fields.join(","),
        ),
        ("DEDUP_WINDOW".to_owned(), spec.dedup.window.clone()),
        (
            "LOG_FORMAT".to_owned(),
            spec.observability
                .log_format
                .clone()
                .unwrap_or_else(|| "json".into()),
        ),
        (
            "SHUTDOWN_GRACE".to_owned(),
            format!("{SHUTDOWN_GRACE_SECONDS}s"),
        ),
    ]);
    if let Some(endpoint) = &spec.observability.otlp_endpoint {
        data.insert(
            dedup_runtime::telemetry::OTLP_ENDPOINT.to_owned(),
            endpoint.clone(),
        );
    }
    ConfigMap {
        metadata: names.meta(names.config(), "config", &owner(pipeline)),
        data: Some(data),
        ..Default::default()
    }
}

/// A checksum of the settings: put on the pod templates so a settings change rolls the pods.
pub fn config_checksum(config: &ConfigMap) -> String {
    let text = serde_json::to_string(&config.data).unwrap_or_default();
    // FNV-1a, 64 bits: stable across releases, enough to notice a change.
    let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{hash:016x}")
}

fn secret_env(name: &str, key: &SecretKey) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: key.name.clone(),
                key: key.key.clone(),
                optional: Some(false),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn http_probe(path: &str, port: i32, period: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::Int(port),
            ..Default::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(3),
        failure_threshold: Some(3),
        ..Default::default()
    }
}

fn hardened() -> SecurityContext {
    SecurityContext {
        run_as_non_root: Some(true),
        read_only_root_filesystem: Some(true),
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_owned()]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[allow(
    clippy::too_many_arguments,
    reason = "one private helper building both deployments"
)]
fn deployment(
    pipeline: &DedupPipeline,
    name: String,
    component: &str,
    replicas: Option<i32>,
    container: Container,
    admin_port: i32,
    checksum: &str,
    grace: Option<i64>,
) -> Deployment {
    let names = Names::of(pipeline);
    let labels = names.labels(component);
    let placement = &pipeline.spec.pods;
    let annotations = BTreeMap::from([
        ("prometheus.io/scrape".to_owned(), "true".to_owned()),
        ("prometheus.io/port".to_owned(), admin_port.to_string()),
        ("prometheus.io/path".to_owned(), "/metrics".to_owned()),
        ("dedup.io/config-checksum".to_owned(), checksum.to_owned()),
    ]);
    Deployment {
        metadata: names.meta(name, component, &owner(pipeline)),
        spec: Some(DeploymentSpec {
            replicas,
            selector: LabelSelector {
                match_labels: Some(labels.clone()),
                ..Default::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    annotations: Some(annotations),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    termination_grace_period_seconds: grace,
                    image_pull_secrets: Some(
                        placement
                            .image_pull_secrets
                            .iter()
                            .map(|name| LocalObjectReference { name: name.clone() })
                            .collect(),
                    )
                    .filter(|s: &Vec<_>| !s.is_empty()),
                    node_selector: Some(placement.node_selector.clone()).filter(|n| !n.is_empty()),
                    tolerations: Some(placement.tolerations.clone()).filter(|t| !t.is_empty()),
                    affinity: placement.affinity.clone(),
                    priority_class_name: placement.priority_class_name.clone(),
                    automount_service_account_token: Some(false),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(65532),
                        run_as_group: Some(65532),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".to_owned(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn container(
    pipeline: &DedupPipeline,
    name: &str,
    binary: &str,
    env: Vec<EnvVar>,
    ports: Vec<ContainerPort>,
) -> Container {
    Container {
        name: name.to_owned(),
        image: Some(pipeline.spec.image.clone()),
        image_pull_policy: Some(pipeline.spec.image_pull_policy.clone()),
        command: Some(vec![format!("/usr/local/bin/{binary}")]),
        env: Some(env),
        env_from: Some(vec![EnvFromSource {
            config_map_ref: Some(ConfigMapEnvSource {
                name: Names::of(pipeline).config(),
                optional: Some(false),
            }),
            ..Default::default()
        }]),
        ports: Some(ports),
        security_context: Some(hardened()),
        ..Default::default()
    }
}

fn port(name: &str, number: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.to_owned()),
        container_port: number,
        protocol: Some("TCP".to_owned()),
        ..Default::default()
    }
}

/// Where ingest finds the write key file (the `writeKeysSecret` volume).
pub const WRITE_KEYS_DIR: &str = "/etc/dedup/write-keys";
/// The key of the write key file in `writeKeysSecret`.
pub const WRITE_KEYS_FILE: &str = "write-keys.yaml";

/// ingest's own settings: who may send, how fast.
fn ingest_env(spec: &IngestSpec) -> Vec<EnvVar> {
    let value = |name: &str, value: String| EnvVar {
        name: name.to_owned(),
        value: Some(value),
        ..Default::default()
    };
    let limits = &spec.rate_limit;
    let mut env = vec![
        value("AUTH", spec.auth.as_env().to_owned()),
        value("RATE_LIMIT", limits.per_key.to_string()),
        value("RATE_LIMIT_BURST", limits.per_key_burst.to_string()),
        value("ADDRESS_RATE_LIMIT", limits.per_address.to_string()),
        value(
            "ADDRESS_RATE_LIMIT_BURST",
            limits.per_address_burst.to_string(),
        ),
    ];
    if !limits.trusted_proxies.is_empty() {
        env.push(value("TRUSTED_PROXIES", limits.trusted_proxies.join(",")));
    }
    if spec.auth == AuthMode::Keys && spec.write_keys_secret.is_some() {
        env.push(value(
            "WRITE_KEYS_PATH",
            format!("{WRITE_KEYS_DIR}/{WRITE_KEYS_FILE}"),
        ));
    }
    env
}

/// A Secret key as the read-only file `dir/file`. The volume is mounted whole (not with
/// subPath), so the kubelet's updates of the Secret reach running pods (ingest reloads its
/// write keys; a renewed CA is read at the next connection).
fn secret_file(
    volume: &str,
    secret: &str,
    key: &str,
    dir: &str,
    file: &str,
) -> (Volume, VolumeMount) {
    let volume_spec = Volume {
        name: volume.to_owned(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret.to_owned()),
            items: Some(vec![KeyToPath {
                key: key.to_owned(),
                path: file.to_owned(),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mount = VolumeMount {
        name: volume.to_owned(),
        mount_path: dir.to_owned(),
        read_only: Some(true),
        ..Default::default()
    };
    (volume_spec, mount)
}

/// The write key Secret, with `auth: keys`.
fn write_keys_file(spec: &IngestSpec) -> Option<(Volume, VolumeMount)> {
    let secret = spec
        .write_keys_secret
        .as_ref()
        .filter(|_| spec.auth == AuthMode::Keys)?;
    Some(secret_file(
        "write-keys",
        secret,
        WRITE_KEYS_FILE,
        WRITE_KEYS_DIR,
        WRITE_KEYS_FILE,
    ))
}

/// Where the backends' CA bundle is mounted (`secrets.tlsCa`).
pub const TLS_CA_DIR: &str = "/etc/dedup/tls-ca";

/// The backends' CA bundle and the `TLS_CA_FILE` naming it, when the pipeline names one.
fn tls_ca_file(pipeline: &DedupPipeline) -> Option<((Volume, VolumeMount), EnvVar)> {
    let key = pipeline.spec.secrets.tls_ca.as_ref()?;
    let file = secret_file("tls-ca", &key.name, &key.key, TLS_CA_DIR, "ca.pem");
    let env = EnvVar {
        name: "TLS_CA_FILE".to_owned(),
        value: Some(format!("{TLS_CA_DIR}/ca.pem")),
        ..Default::default()
    };
    Some((file, env))
}

/// Adds `files` to the Deployment's pod and mounts them in its container.
fn mount(deployment: &mut Deployment, files: Vec<(Volume, VolumeMount)>) {
    if files.is_empty() {
        return;
    }
    let Some(pod) = deployment
        .spec
        .as_mut()
        .and_then(|s| s.template.spec.as_mut())
    else {
        return;
    };
    let (volumes, mounts): (Vec<Volume>, Vec<VolumeMount>) = files.into_iter().unzip();
    pod.volumes = Some(volumes);
    if let Some(container) = pod.containers.first_mut() {
        container.volume_mounts = Some(mounts);
    }
}

/// The ingest Deployment.
pub fn ingest_deployment(pipeline: &DedupPipeline, checksum: &str) -> Deployment {
    let secrets = &pipeline.spec.secrets;
    let mut env = vec![secret_env("RABBITMQ_URL", &secrets.rabbitmq_url)];
    env.extend(ingest_env(&pipeline.spec.ingest));
    let mut files: Vec<_> = write_keys_file(&pipeline.spec.ingest).into_iter().collect();
    if let Some((file, ca)) = tls_ca_file(pipeline) {
        files.push(file);
        env.push(ca);
    }
    let mut c = container(
        pipeline,
        "ingest",
        "ingest",
        env,
        vec![port("http", INGEST_PORT), port("admin", INGEST_ADMIN_PORT)],
    );
    c.liveness_probe = Some(http_probe("/healthz", INGEST_ADMIN_PORT, 10));
    c.readiness_probe = Some(http_probe("/readyz", INGEST_ADMIN_PORT, 5));
    c.resources.clone_from(&pipeline.spec.ingest.resources);
    let names = Names::of(pipeline);
    let mut deployment = deployment(
        pipeline,
        names.ingest(),
        "ingest",
        Some(pipeline.spec.ingest.replicas),
        c,
        INGEST_ADMIN_PORT,
        checksum,
        None,
    );
    add_settings(
        &mut deployment,
        &config_keys(pipeline),
        &pipeline.spec.ingest.settings,
    );
    mount(&mut deployment, files);
    deployment
}

/// The ingest Service (the public API).
pub fn ingest_service(pipeline: &DedupPipeline) -> Service {
    let names = Names::of(pipeline);
    Service {
        metadata: names.meta(names.ingest(), "ingest", &owner(pipeline)),
        spec: Some(ServiceSpec {
            type_: Some(pipeline.spec.ingest.service_type.clone()),
            selector: Some(names.labels("ingest")),
            ports: Some(vec![ServicePort {
                name: Some("http".to_owned()),
                port: pipeline.spec.ingest.service_port,
                target_port: Some(IntOrString::String("http".to_owned())),
                node_port: pipeline
                    .spec
                    .ingest
                    .service_node_port
                    .filter(|_| pipeline.spec.ingest.service_type == "NodePort"),
                protocol: Some("TCP".to_owned()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The worker Deployment with `replicas` decided by the scaler; `None` leaves them to
/// whoever else sets them (KEDA, an HPA, `kubectl scale`).
pub fn worker_deployment(
    pipeline: &DedupPipeline,
    checksum: &str,
    replicas: Option<i32>,
) -> Deployment {
    let s = &pipeline.spec.secrets;
    let mut env = vec![
        secret_env("RABBITMQ_URL", &s.rabbitmq_url),
        secret_env("RABBITMQ_MANAGEMENT_URL", &s.rabbitmq_management_url),
        secret_env("REDIS_URL", &s.redis_url),
        secret_env("DATABASE_URL", &s.database_url),
    ];
    let mut files = Vec::new();
    if let Some((file, ca)) = tls_ca_file(pipeline) {
        files.push(file);
        env.push(ca);
    }
    let mut c = container(
        pipeline,
        "worker",
        "dedup-worker",
        env,
        vec![port("admin", WORKER_ADMIN_PORT)],
    );
    c.liveness_probe = Some(http_probe("/healthz", WORKER_ADMIN_PORT, 10));
    c.readiness_probe = Some(http_probe("/readyz", WORKER_ADMIN_PORT, 5));
    c.resources.clone_from(&pipeline.spec.worker.resources);
    let names = Names::of(pipeline);
    let mut deployment = deployment(
        pipeline,
        names.worker(),
        "worker",
        replicas,
        c,
        WORKER_ADMIN_PORT,
        checksum,
        Some(WORKER_TERMINATION_GRACE_SECONDS),
    );
    add_settings(
        &mut deployment,
        &config_keys(pipeline),
        &pipeline.spec.worker.settings,
    );
    mount(&mut deployment, files);
    deployment
}

/// Variables every container gets from the ConfigMap, and those fixed by the pod spec (ports
/// the probes and Service target): a `settings` entry may not set them.
fn config_keys(pipeline: &DedupPipeline) -> Vec<String> {
    let mut keys: Vec<String> = config_map(pipeline)
        .data
        .unwrap_or_default()
        .into_keys()
        .collect();
    keys.extend(["LISTEN_ADDR", "ADMIN_LISTEN_ADDR"].map(String::from));
    keys
}

/// Whether `name` may be set through `settings`: a variable name the container does not
/// already get (nor its `_FILE` form).
fn settable(name: &str, taken: &[String]) -> bool {
    let stem = name.strip_suffix("_FILE").unwrap_or(name);
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
        && !name.as_bytes()[0].is_ascii_digit()
        && !taken.iter().any(|t| t == name || t == stem)
}

/// Appends the settable `settings` to the container's environment.
fn add_settings(
    deployment: &mut Deployment,
    config: &[String],
    settings: &BTreeMap<String, String>,
) {
    let Some(c) = deployment
        .spec
        .as_mut()
        .and_then(|s| s.template.spec.as_mut())
        .and_then(|p| p.containers.first_mut())
    else {
        return;
    };
    let env = c.env.get_or_insert_with(Vec::new);
    let mut taken: Vec<String> = env.iter().map(|e| e.name.clone()).collect();
    taken.extend_from_slice(config);
    for (name, value) in settings {
        if settable(name, &taken) {
            env.push(EnvVar {
                name: name.clone(),
                value: Some(value.clone()),
                ..Default::default()
            });
        }
    }
}

/// The `settings` entries the operator refuses, each with why: the pipeline is Degraded
/// until they are removed.
pub fn refused_settings(pipeline: &DedupPipeline) -> Vec<String> {
    let mut bare = pipeline.clone();
    bare.spec.ingest.settings.clear();
    bare.spec.worker.settings.clear();
    let config = config_keys(pipeline);
    let mut refused = Vec::new();
    for (component, settings, deployment) in [
        (
            "ingest",
            &pipeline.spec.ingest.settings,
            ingest_deployment(&bare, ""),
        ),
        (
            "worker",
            &pipeline.spec.worker.settings,
            worker_deployment(&bare, "", None),
        ),
    ] {
        let mut taken: Vec<String> = deployment
            .spec
            .iter()
            .flat_map(|s| s.template.spec.iter())
            .flat_map(|p| p.containers.iter())
            .flat_map(|c| c.env.iter().flatten())
            .map(|e| e.name.clone())
            .collect();
        taken.extend_from_slice(&config);
        refused.extend(
            settings
                .keys()
                .filter(|name| !settable(name, &taken))
                .map(|name| {
                    format!(
                        "{component}.settings.{name} is refused: not a variable name, or one the \
                 operator sets itself (a connection URL, a port, or a field of the DedupPipeline)"
                    )
                }),
        );
    }
    refused
}

/// KEDA's API for the ScaledObject and TriggerAuthentication of `keda` mode.
pub fn keda_resource(kind: &str) -> kube::api::ApiResource {
    let plural = format!("{}s", kind.to_lowercase());
    kube::api::ApiResource::from_gvk_with_plural(
        &kube::api::GroupVersionKind::gvk("keda.sh", "v1alpha1", kind),
        &plural,
    )
}

/// The TriggerAuthentication giving KEDA the management URL (with its credentials) from the
/// pipeline's Secret, so the ScaledObject carries no password.
pub fn trigger_authentication(pipeline: &DedupPipeline) -> serde_json::Value {
    let names = Names::of(pipeline);
    let management = &pipeline.spec.secrets.rabbitmq_management_url;
    serde_json::json!({
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "TriggerAuthentication",
        "metadata": names.meta(names.worker(), "worker", &owner(pipeline)),
        "spec": {
            "secretTargetRef": [
                {"parameter": "host", "name": management.name, "key": management.key},
            ],
        },
    })
}

/// The KEDA ScaledObject of `keda` mode: RabbitMQ's management API (`http`, so unacknowledged
/// messages count as the operator's own reading does), the pipeline's bounds, target,
/// activation and windows, as an HPA behaviour.
pub fn scaled_object(pipeline: &DedupPipeline) -> serde_json::Value {
    let names = Names::of(pipeline);
    let worker = &pipeline.spec.worker;
    let auto = &worker.autoscaling;
    let (mode, target) = match auto.metric {
        ScaleMetric::QueueLength => ("QueueLength", worker.target_messages_per_worker),
        ScaleMetric::MessageRate => ("MessageRate", auto.target_publish_rate_per_worker),
    };
    let mut scale_up = serde_json::json!({
        "stabilizationWindowSeconds": worker.scale_up_stabilization_seconds,
    });
    if let Some(limit) = auto.scale_up_limit {
        let period = limit.period_seconds;
        scale_up["selectPolicy"] = "Max".into();
        let mut policies = Vec::new();
        if limit.pods > 0 {
            policies.push(
                serde_json::json!({"type": "Pods", "value": limit.pods, "periodSeconds": period}),
            );
        }
        if limit.percent > 0 {
            policies.push(serde_json::json!({"type": "Percent", "value": limit.percent, "periodSeconds": period}));
        }
        if policies.is_empty() {
            // As the operator's own mode: a limit of nothing still allows one more.
            policies.push(serde_json::json!({"type": "Pods", "value": 1, "periodSeconds": period}));
        }
        scale_up["policies"] = policies.into();
    }
    let mut trigger = serde_json::json!({
        "type": "rabbitmq",
        "authenticationRef": {"name": names.worker()},
        "metadata": {
            "protocol": "http",
            "mode": mode,
            "value": target.to_string(),
            "activationValue": auto.activation.to_string(),
            "queueName": pipeline.spec.dedup.queue,
            "vhostName": auto.vhost,
        },
    });
    let queues = pipeline.spec.dedup.queues();
    if queues.len() > 1 {
        // Every shard, summed: the workers consume them all. Exactly these names, so a
        // dead-letter queue or another pipeline's queue never counts.
        let metadata = &mut trigger["metadata"];
        metadata["queueName"] = dedup_message::topology::exact_names_pattern(&queues).into();
        metadata["useRegex"] = "true".into();
        metadata["operation"] = "sum".into();
    }
    serde_json::json!({
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": names.meta(names.worker(), "worker", &owner(pipeline)),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": names.worker()},
            "minReplicaCount": worker.min_replicas,
            "maxReplicaCount": worker.max_replicas,
            "pollingInterval": auto.polling_interval_seconds,
            // From the last active reading to zero workers: the scale-down window.
            "cooldownPeriod": worker.scale_down_stabilization_seconds,
            "advanced": {
                "horizontalPodAutoscalerConfig": {
                    "behavior": {
                        "scaleUp": scale_up,
                        "scaleDown": {"stabilizationWindowSeconds": worker.scale_down_stabilization_seconds},
                    },
                },
            },
            "triggers": [trigger],
        },
    })
}

/// Every object the operator applies for `pipeline`, as it would on its first reconcile
/// (workers at `minReplicas`), for `dedup-operator render`.
pub fn all(pipeline: &DedupPipeline) -> Result<Vec<serde_json::Value>, serde_json::Error> {
    let config = config_map(pipeline);
    let checksum = config_checksum(&config);
    let replicas = Some(pipeline.spec.worker.min_replicas);
    let typed = |mut v: serde_json::Value, api_version: &str, kind: &str| {
        v["apiVersion"] = api_version.into();
        v["kind"] = kind.into();
        v
    };
    let mut objects = vec![
        typed(serde_json::to_value(&config)?, "v1", "ConfigMap"),
        typed(
            serde_json::to_value(ingest_deployment(pipeline, &checksum))?,
            "apps/v1",
            "Deployment",
        ),
        typed(
            serde_json::to_value(ingest_service(pipeline))?,
            "v1",
            "Service",
        ),
        typed(
            serde_json::to_value(worker_deployment(pipeline, &checksum, replicas))?,
            "apps/v1",
            "Deployment",
        ),
    ];
    if pipeline.spec.worker.autoscaling.mode == AutoscalingMode::Keda {
        objects.push(trigger_authentication(pipeline));
        objects.push(scaled_object(pipeline));
    }
    Ok(objects)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::DedupPipelineSpec;

    fn pipeline() -> DedupPipeline {
        let spec: DedupPipelineSpec = serde_yaml::from_str(
            "secrets:\n  rabbitmqUrl: {name: dedup-secrets, key: rabbitmq}\n  rabbitmqManagementUrl: {name: dedup-secrets, key: mgmt}\n  redisUrl: {name: dedup-secrets, key: redis}\n  databaseUrl: {name: dedup-secrets, key: db}\n",
        )
        .unwrap();
        let mut p = DedupPipeline::new("events", spec);
        p.metadata.namespace = Some("prod".into());
        p.metadata.uid = Some("0f6c-uid".into());
        p
    }

    fn pod_spec(d: &Deployment) -> &PodSpec {
        d.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
    }

    fn env_of(d: &Deployment) -> BTreeMap<String, Option<String>> {
        pod_spec(d).containers[0]
            .env
            .iter()
            .flatten()
            .map(|e| (e.name.clone(), e.value.clone()))
            .collect()
    }

    /// Write keys are on by default; with a key Secret, ingest mounts it whole (so Secret
    /// updates reach the pod) and reads the file from it; rate limits become ingest's settings.
    #[test]
    fn ingest_reads_write_keys_from_the_named_secret() {
        let mut p = pipeline();
        let env = env_of(&ingest_deployment(&p, "c"));
        assert_eq!(env["AUTH"].as_deref(), Some("keys"));
        assert!(
            !env.contains_key("WRITE_KEYS_PATH"),
            "no Secret named, no path"
        );

        p.spec.ingest.write_keys_secret = Some("events-write-keys".into());
        p.spec.ingest.rate_limit.per_key = 500;
        p.spec.ingest.rate_limit.trusted_proxies = vec!["10.0.0.0/8".into(), "fd00::/8".into()];
        let d = ingest_deployment(&p, "c");
        let env = env_of(&d);
        assert_eq!(
            env["WRITE_KEYS_PATH"].as_deref(),
            Some("/etc/dedup/write-keys/write-keys.yaml")
        );
        assert_eq!(env["RATE_LIMIT"].as_deref(), Some("500"));
        assert_eq!(
            env["TRUSTED_PROXIES"].as_deref(),
            Some("10.0.0.0/8,fd00::/8")
        );
        let volume = &pod_spec(&d).volumes.as_ref().unwrap()[0];
        let secret = volume.secret.as_ref().unwrap();
        assert_eq!(secret.secret_name.as_deref(), Some("events-write-keys"));
        let mount = &pod_spec(&d).containers[0].volume_mounts.as_ref().unwrap()[0];
        assert_eq!(
            (mount.mount_path.as_str(), mount.sub_path.as_deref()),
            (WRITE_KEYS_DIR, None)
        );
        assert_eq!(mount.read_only, Some(true));

        p.spec.ingest.auth = AuthMode::None;
        let d = ingest_deployment(&p, "c");
        assert_eq!(env_of(&d)["AUTH"].as_deref(), Some("none"));
        assert!(pod_spec(&d).volumes.is_none(), "no keys, no key volume");
    }

    /// A CA bundle named in the secrets is mounted in ingest and the workers, next to the
    /// write keys, and named by TLS_CA_FILE; without one neither has it.
    #[test]
    fn the_backends_ca_reaches_ingest_and_workers() {
        let mut p = pipeline();
        assert!(!env_of(&worker_deployment(&p, "c", Some(1))).contains_key("TLS_CA_FILE"));
        p.spec.secrets.tls_ca = Some(SecretKey {
            name: "backend-ca".into(),
            key: "ca.crt".into(),
        });
        p.spec.ingest.write_keys_secret = Some("keys".into());
        for d in [
            ingest_deployment(&p, "c"),
            worker_deployment(&p, "c", Some(1)),
        ] {
            assert_eq!(
                env_of(&d)["TLS_CA_FILE"].as_deref(),
                Some("/etc/dedup/tls-ca/ca.pem")
            );
            let pod = pod_spec(&d);
            let volume = pod
                .volumes
                .iter()
                .flatten()
                .find(|v| v.name == "tls-ca")
                .expect("CA volume");
            let secret = volume.secret.as_ref().unwrap();
            assert_eq!(secret.secret_name.as_deref(), Some("backend-ca"));
            assert_eq!(secret.items.as_ref().unwrap()[0].key, "ca.crt");
            let mounts: Vec<&str> = pod.containers[0]
                .volume_mounts
                .iter()
                .flatten()
                .map(|m| m.mount_path.as_str())
                .collect();
            assert!(mounts.contains(&TLS_CA_DIR), "{mounts:?}");
        }
        let ingest = ingest_deployment(&p, "c");
        assert_eq!(
            pod_spec(&ingest).volumes.as_ref().unwrap().len(),
            2,
            "keys and CA"
        );
    }

    /// The pipeline's `pods` settings reach both Deployments' pods; without them the pods
    /// carry none.
    #[test]
    fn pods_are_placed_as_the_pipeline_says() {
        let mut p = pipeline();
        let bare = pod_spec(&worker_deployment(&p, "c", Some(1))).clone();
        assert!(bare.image_pull_secrets.is_none() && bare.node_selector.is_none());
        assert!(bare.tolerations.is_none() && bare.priority_class_name.is_none());
        p.spec.pods = serde_yaml::from_str(
            "imagePullSecrets: [regcred]\nnodeSelector: {pool: events}\n\
             tolerations: [{key: dedicated, operator: Equal, value: events, effect: NoSchedule}]\n\
             priorityClassName: high",
        )
        .unwrap();
        for d in [
            ingest_deployment(&p, "c"),
            worker_deployment(&p, "c", Some(1)),
        ] {
            let pod = pod_spec(&d);
            assert_eq!(pod.image_pull_secrets.as_ref().unwrap()[0].name, "regcred");
            assert_eq!(pod.node_selector.as_ref().unwrap()["pool"], "events");
            assert_eq!(
                pod.tolerations.as_ref().unwrap()[0].key.as_deref(),
                Some("dedicated")
            );
            assert_eq!(pod.priority_class_name.as_deref(), Some("high"));
        }
    }

    /// Every object is named after the pipeline, in its namespace, owned by it.
    #[test]
    fn objects_are_named_namespaced_and_owned() {
        let p = pipeline();
        let cm = config_map(&p);
        let checksum = config_checksum(&cm);
        let metas = [
            cm.metadata,
            ingest_deployment(&p, &checksum).metadata,
            ingest_service(&p).metadata,
            worker_deployment(&p, &checksum, Some(3)).metadata,
        ];
        let names: Vec<_> = metas.iter().map(|m| m.name.clone().unwrap()).collect();
        assert_eq!(
            names,
            [
                "events-config",
                "events-ingest",
                "events-ingest",
                "events-worker"
            ]
        );
        for m in &metas {
            assert_eq!(m.namespace.as_deref(), Some("prod"));
            let owner = &m.owner_references.as_ref().unwrap()[0];
            assert_eq!(
                (owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str()),
                ("DedupPipeline", "events", "0f6c-uid")
            );
            assert_eq!(owner.controller, Some(true));
        }
    }

    /// Selectors match the pod labels, and the Service selects only ingest pods on a declared port.
    #[test]
    fn selectors_match_pods_and_service_targets_a_declared_port() {
        let p = pipeline();
        for d in [
            ingest_deployment(&p, "x"),
            worker_deployment(&p, "x", Some(1)),
        ] {
            let spec = d.spec.as_ref().unwrap();
            let pod_labels = spec
                .template
                .metadata
                .as_ref()
                .unwrap()
                .labels
                .as_ref()
                .unwrap();
            for (k, v) in spec.selector.match_labels.as_ref().unwrap() {
                assert_eq!(pod_labels.get(k), Some(v));
            }
        }
        let svc = ingest_service(&p);
        let selector = svc.spec.as_ref().unwrap().selector.as_ref().unwrap();
        assert_eq!(
            selector
                .get("app.kubernetes.io/component")
                .map(String::as_str),
            Some("ingest")
        );
        let target = svc.spec.as_ref().unwrap().ports.as_ref().unwrap()[0]
            .target_port
            .clone();
        let ingest = ingest_deployment(&p, "x");
        let declared: Vec<_> = pod_spec(&ingest).containers[0]
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .filter_map(|p| p.name.clone())
            .collect();
        assert!(
            matches!(target, Some(IntOrString::String(ref n)) if declared.contains(n)),
            "{target:?} vs {declared:?}"
        );
    }

    /// Probes hit the admin port, pods run hardened, and scraping is announced.
    #[test]
    fn pods_are_probed_hardened_and_scraped() {
        let p = pipeline();
        for (d, admin) in [
            (ingest_deployment(&p, "abc"), INGEST_ADMIN_PORT),
            (worker_deployment(&p, "abc", Some(2)), WORKER_ADMIN_PORT),
        ] {
            let pod = pod_spec(&d);
            let c = &pod.containers[0];
            for (probe, path) in [
                (&c.liveness_probe, "/healthz"),
                (&c.readiness_probe, "/readyz"),
            ] {
                let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
                assert_eq!(
                    (get.path.as_deref(), &get.port),
                    (Some(path), &IntOrString::Int(admin))
                );
            }
            let sc = c.security_context.as_ref().unwrap();
            assert_eq!(
                (
                    sc.run_as_non_root,
                    sc.read_only_root_filesystem,
                    sc.allow_privilege_escalation
                ),
                (Some(true), Some(true), Some(false))
            );
            assert_eq!(
                sc.capabilities.as_ref().unwrap().drop.as_deref(),
                Some(&["ALL".to_owned()][..])
            );
            assert_eq!(
                pod.security_context
                    .as_ref()
                    .unwrap()
                    .seccomp_profile
                    .as_ref()
                    .unwrap()
                    .type_,
                "RuntimeDefault"
            );
            let annotations = d
                .spec
                .as_ref()
                .unwrap()
                .template
                .metadata
                .as_ref()
                .unwrap()
                .annotations
                .as_ref()
                .unwrap();
            assert_eq!(annotations["prometheus.io/port"], admin.to_string());
            assert_eq!(annotations["dedup.io/config-checksum"], "abc");
        }
        assert_eq!(
            pod_spec(&worker_deployment(&p, "x", Some(1))).termination_grace_period_seconds,
            Some(30)
        );
    }

    /// URLs come from Secrets only; the ConfigMap holds no secret value; a settings change
    /// changes the checksum (and so rolls the pods).
    #[test]
    fn secrets_stay_in_secrets_and_settings_changes_roll_pods() {
        let mut p = pipeline();
        let worker = worker_deployment(&p, "x", Some(1));
        let env = pod_spec(&worker).containers[0].env.as_ref().unwrap();
        let names: Vec<_> = env.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "RABBITMQ_URL",
                "RABBITMQ_MANAGEMENT_URL",
                "REDIS_URL",
                "DATABASE_URL"
            ]
        );
        assert!(
            env.iter()
                .all(|e| e.value.is_none()
                    && e.value_from.as_ref().unwrap().secret_key_ref.is_some())
        );
        let cm = config_map(&p);
        assert!(
            cm.data
                .as_ref()
                .unwrap()
                .keys()
                .all(|k| !k.contains("URL") || k.starts_with("OTEL"))
        );
        let before = config_checksum(&cm);
        p.spec.dedup.window = "1d".into();
        assert_ne!(config_checksum(&config_map(&p)), before);
        assert_eq!(
            worker_deployment(&p, "x", Some(7)).spec.unwrap().replicas,
            Some(7)
        );
    }

    /// `settings` reach their component's container as variables; the ConfigMap's and the
    /// secrets' names are refused, with every refused entry named.
    #[test]
    fn settings_reach_their_container_and_managed_names_are_refused() {
        let mut p = pipeline();
        p.spec.worker.settings = [
            ("BATCH_SIZE", "500"),
            ("DEDUP_WINDOW", "1d"),
            ("redis url", "x"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .into();
        p.spec.ingest.settings = [("MAX_BODY_BYTES", "65536"), ("RABBITMQ_URL", "amqp://x")]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .into();
        let worker = env_of(&worker_deployment(&p, "x", None));
        let ingest = env_of(&ingest_deployment(&p, "x"));
        assert_eq!(worker.get("BATCH_SIZE"), Some(&Some("500".to_owned())));
        assert!(!worker.contains_key("MAX_BODY_BYTES") && !ingest.contains_key("BATCH_SIZE"));
        assert_eq!(
            ingest.get("MAX_BODY_BYTES"),
            Some(&Some("65536".to_owned()))
        );
        assert!(
            !worker.contains_key("DEDUP_WINDOW"),
            "the ConfigMap's value stays the only one"
        );
        assert!(!worker.contains_key("redis url"));
        assert_eq!(
            ingest.get("RABBITMQ_URL"),
            Some(&None),
            "still from the Secret"
        );
        let refused = refused_settings(&p);
        assert_eq!(refused.len(), 3, "{refused:?}");
        for name in [
            "worker.settings.DEDUP_WINDOW",
            "worker.settings.redis url",
            "ingest.settings.RABBITMQ_URL",
        ] {
            assert!(
                refused.iter().any(|r| r.starts_with(name)),
                "{name}: {refused:?}"
            );
        }
        assert!(
            worker_deployment(&p, "x", None)
                .spec
                .unwrap()
                .replicas
                .is_none()
        );
    }

    /// A queue split into shards reaches both binaries, and KEDA sums exactly its queues.
    #[test]
    fn queue_shards_reach_the_config_and_keda_sums_every_shard() {
        let mut p = pipeline();
        p.spec.worker.autoscaling.mode = AutoscalingMode::Keda;
        let one = scaled_object(&p);
        assert_eq!(
            one["spec"]["triggers"][0]["metadata"]["queueName"],
            "product_events"
        );
        assert!(one["spec"]["triggers"][0]["metadata"]["useRegex"].is_null());
        p.spec.dedup.queue_shards = 3;
        let data = config_map(&p).data.unwrap();
        assert_eq!(data["AMQP_QUEUE_SHARDS"], "3");
        let metadata = &scaled_object(&p)["spec"]["triggers"][0]["metadata"];
        assert_eq!(
            metadata["queueName"],
            r"(?-i)^(product_events|product_events\.1|product_events\.2)$"
        );
        assert_eq!(
            (&metadata["useRegex"], &metadata["operation"]),
            (&serde_json::json!("true"), &serde_json::json!("sum"))
        );
        let pattern = regex::Regex::new(metadata["queueName"].as_str().unwrap()).unwrap();
        for (queue, counted) in [
            ("product_events", true),
            ("product_events.2", true),
            ("product_events.3", false),
            ("product_events.dlq", false),
            ("product_eventsX1", false),
            ("Product_Events.1", false),
        ] {
            assert_eq!(pattern.is_match(queue), counted, "{queue}");
        }
    }
}
