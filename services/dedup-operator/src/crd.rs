//! The `DedupPipeline` custom resource: what a pipeline should look like (spec) and what the
//! operator last saw (status). `dedup-operator crd` prints its CustomResourceDefinition.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A dedup pipeline: ingest replicas, autoscaled workers, and the services they use.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "dedup.io",
    version = "v1alpha1",
    kind = "DedupPipeline",
    plural = "deduppipelines",
    shortname = "dedup",
    namespaced,
    status = "DedupPipelineStatus",
    printcolumn = r#"{"name":"Queue","type":"integer","jsonPath":".status.queueDepth","description":"Ready plus unacknowledged messages"}"#,
    printcolumn = r#"{"name":"Workers","type":"integer","jsonPath":".status.currentWorkers"}"#,
    printcolumn = r#"{"name":"Desired","type":"integer","jsonPath":".status.desiredWorkers"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct DedupPipelineSpec {
    /// Image holding the `ingest` and `dedup-worker` binaries.
    #[serde(default = "default_image")]
    pub image: String,
    #[serde(default = "default_pull_policy")]
    pub image_pull_policy: String,
    #[serde(default)]
    pub ingest: IngestSpec,
    #[serde(default)]
    pub worker: WorkerSpec,
    /// Secrets holding the service URLs (never put credentials in the spec).
    pub secrets: SecretRefs,
    #[serde(default)]
    pub dedup: DedupSettings,
    #[serde(default)]
    pub observability: ObservabilitySettings,
    /// Where ingest's and the workers' pods may run and what they pull with.
    #[serde(default)]
    pub pods: PodPlacement,
}

/// Scheduling and registry settings for the pipeline's pods.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct PodPlacement {
    /// Names of docker-registry Secrets for a private registry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
}

/// The HTTP front door.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IngestSpec {
    #[serde(default = "default_ingest_replicas")]
    pub replicas: i32,
    #[serde(default)]
    pub resources: Option<ResourceRequirements>,
    /// Port of the ingest Service.
    #[serde(default = "default_service_port")]
    pub service_port: i32,
    /// ClusterIP, NodePort or LoadBalancer.
    #[serde(default = "default_service_type")]
    pub service_type: String,
    /// Fixed node port for a NodePort Service (e.g. a kind port mapping); random when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_node_port: Option<i32>,
    /// Who may send events (`AUTH`): `keys`, only holders of a write key listed in
    /// `writeKeysSecret`; `none`, anyone who reaches the Service.
    #[serde(default)]
    pub auth: AuthMode,
    /// Secret holding the write key file under the key `write-keys.yaml` (only the keys'
    /// hashes: `ingest write-key --source NAME` prints an entry). Needed with `auth: keys`;
    /// ingest re-reads it when the Secret changes, so keys are issued and revoked live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_keys_secret: Option<String>,
    /// Token-bucket rate limits (0: none).
    #[serde(default)]
    pub rate_limit: RateLimitSpec,
    /// More of ingest's settings, by variable name (`ingest --help`), e.g.
    /// `MAX_BODY_BYTES: "65536"`. The connection URL and the settings above cannot be set here.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub settings: BTreeMap<String, String>,
}

/// Who may send events.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    #[default]
    Keys,
    None,
}

impl AuthMode {
    /// The value of ingest's `AUTH`.
    pub fn as_env(self) -> &'static str {
        match self {
            AuthMode::Keys => "keys",
            AuthMode::None => "none",
        }
    }
}

/// ingest's rate limits.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitSpec {
    /// `RATE_LIMIT`: events per second per write key (the key file can override it per key).
    #[serde(default)]
    pub per_key: u32,
    /// `RATE_LIMIT_BURST` (0: twice the rate).
    #[serde(default)]
    pub per_key_burst: u32,
    /// `ADDRESS_RATE_LIMIT`: requests per second per client address.
    #[serde(default)]
    pub per_address: u32,
    /// `ADDRESS_RATE_LIMIT_BURST` (0: twice the rate).
    #[serde(default)]
    pub per_address_burst: u32,
    /// `TRUSTED_PROXIES`: CIDRs of the proxies (the Ingress controller's pods) whose
    /// X-Forwarded-For names the client.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted_proxies: Vec<String>,
}

/// The workers and how they scale.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerSpec {
    #[serde(default = "default_min_workers")]
    pub min_replicas: i32,
    #[serde(default = "default_max_workers")]
    pub max_replicas: i32,
    /// Ready plus unacknowledged messages one worker should have to itself.
    #[serde(default = "default_target_per_worker")]
    pub target_messages_per_worker: i64,
    /// How long higher recommendations must last before scaling up (0: at once).
    #[serde(default)]
    pub scale_up_stabilization_seconds: i64,
    /// How long lower recommendations must last before scaling down.
    #[serde(default = "default_scale_down_seconds")]
    pub scale_down_stabilization_seconds: i64,
    /// Who sets the replicas and on what.
    #[serde(default)]
    pub autoscaling: AutoscalingSpec,
    #[serde(default)]
    pub resources: Option<ResourceRequirements>,
    /// More of the worker's settings, by variable name (`dedup-worker --help`), e.g.
    /// `BATCH_SIZE: "500"`, `RETENTION: 30d`. The connection URLs come from `secrets` and
    /// cannot be set here.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub settings: BTreeMap<String, String>,
}

/// Who sets the worker replicas, and on what.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingSpec {
    /// `operator`: the operator scales on the metric below. `keda`: the operator makes a KEDA
    /// ScaledObject (RabbitMQ scaler over the management API) with the same bounds, target
    /// and windows, and leaves the replicas to KEDA. `none`: the replicas are left alone (an
    /// HPA of your own, or `kubectl scale`).
    #[serde(default)]
    pub mode: AutoscalingMode,
    /// What one worker is sized for: `queueLength`, ready plus unacknowledged messages
    /// (`targetMessagesPerWorker`); `messageRate`, messages published per second
    /// (`targetPublishRatePerWorker`).
    #[serde(default)]
    pub metric: ScaleMetric,
    /// Messages per second one worker keeps up with (metric `messageRate`).
    #[serde(default = "default_rate_per_worker")]
    pub target_publish_rate_per_worker: i64,
    /// With `minReplicas: 0`, the metric must exceed this to start the first worker, and the
    /// last one stops only at or below it (KEDA's activation value).
    #[serde(default)]
    pub activation: i64,
    /// How fast the workers may grow: unset, at once to the recommendation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_up_limit: Option<ScaleUpLimit>,
    /// `keda`: the vhost of the queue (the management URL does not name one).
    #[serde(default = "default_vhost")]
    pub vhost: String,
    /// `keda`: how often KEDA reads the queue.
    #[serde(default = "default_polling_seconds")]
    pub polling_interval_seconds: i32,
}

/// Who sets the worker replicas.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum AutoscalingMode {
    #[default]
    Operator,
    Keda,
    None,
}

/// What the workers scale on.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub enum ScaleMetric {
    #[default]
    QueueLength,
    MessageRate,
}

/// At most `pods` more workers, or `percent` more, whichever allows more, per
/// `periodSeconds` (the HPA's scale-up policies). Always at least one more.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScaleUpLimit {
    #[serde(default)]
    pub pods: i32,
    #[serde(default)]
    pub percent: i32,
    #[serde(default = "default_limit_period")]
    pub period_seconds: i64,
}

/// A key in a Secret.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct SecretKey {
    pub name: String,
    pub key: String,
}

/// Where the service URLs are.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretRefs {
    /// `RABBITMQ_URL`.
    pub rabbitmq_url: SecretKey,
    /// `RABBITMQ_MANAGEMENT_URL`, for the queue depth.
    pub rabbitmq_management_url: SecretKey,
    /// `REDIS_URL`.
    pub redis_url: SecretKey,
    /// `DATABASE_URL`.
    pub database_url: SecretKey,
    /// A PEM bundle of CAs trusted for TLS to the backends (mounted as ingest's and the
    /// workers' `TLS_CA_FILE`), for backends whose certificates a private CA signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<SecretKey>,
}

/// Dedup behaviour.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DedupSettings {
    /// `DEDUP_KEY_FIELDS`.
    #[serde(default = "default_key_fields")]
    pub key_fields: Vec<String>,
    /// `DEDUP_WINDOW`, e.g. `7d`.
    #[serde(default = "default_window")]
    pub window: String,
    /// `AMQP_QUEUE`.
    #[serde(default = "default_queue")]
    pub queue: String,
    /// `AMQP_QUEUE_SHARDS`: queues the events are spread over by dedup key (the queue, then
    /// `<queue>.1` …), each consumed by every worker; the workers are scaled on their sum.
    /// Lower it only once the queues past the new count are empty.
    #[serde(default = "default_queue_shards")]
    #[schemars(range(min = 1, max = dedup_message::topology::MAX_SHARDS))]
    pub queue_shards: u16,
}

/// Logs, metrics and traces.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct ObservabilitySettings {
    /// `LOG_FORMAT`: json (default) or text.
    #[serde(default)]
    pub log_format: Option<String>,
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`; tracing is off without it.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
}

/// What the operator last observed and did.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct DedupPipelineStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, Progressing and Degraded, with reasons.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Ready plus unacknowledged messages at the last reading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_depth: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_workers: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_workers: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<String>,
    /// The scaler's recent recommendations (within the longer stabilization window), so an
    /// operator that restarts or hands over keeps the windows instead of scaling at once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recommendations: Vec<Recommendation>,
    /// The autoscaling mode last applied, so that leaving `keda` removes the ScaledObject.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling_mode: Option<AutoscalingMode>,
}

/// One scaling recommendation: how many workers, and when (RFC 3339).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct Recommendation {
    pub at: String,
    pub replicas: i32,
}

fn default_image() -> String {
    format!("dedup/dedup:{}", env!("CARGO_PKG_VERSION"))
}
fn default_pull_policy() -> String {
    "IfNotPresent".into()
}
fn default_ingest_replicas() -> i32 {
    2
}
fn default_service_port() -> i32 {
    8000
}
fn default_service_type() -> String {
    "ClusterIP".into()
}
fn default_min_workers() -> i32 {
    1
}
fn default_max_workers() -> i32 {
    10
}
fn default_target_per_worker() -> i64 {
    1000
}
fn default_scale_down_seconds() -> i64 {
    300
}
fn default_rate_per_worker() -> i64 {
    200
}
fn default_vhost() -> String {
    "/".into()
}
fn default_polling_seconds() -> i32 {
    15
}
fn default_limit_period() -> i64 {
    60
}
fn default_key_fields() -> Vec<String> {
    ["client_id", "event_name", "product_id", "sid", "r"]
        .map(String::from)
        .to_vec()
}
fn default_window() -> String {
    "7d".into()
}
fn default_queue() -> String {
    "product_events".into()
}
fn default_queue_shards() -> u16 {
    1
}

impl Default for IngestSpec {
    fn default() -> Self {
        Self {
            replicas: default_ingest_replicas(),
            resources: None,
            service_port: default_service_port(),
            service_type: default_service_type(),
            service_node_port: None,
            auth: AuthMode::default(),
            write_keys_secret: None,
            rate_limit: RateLimitSpec::default(),
            settings: BTreeMap::new(),
        }
    }
}

impl Default for WorkerSpec {
    fn default() -> Self {
        Self {
            min_replicas: default_min_workers(),
            max_replicas: default_max_workers(),
            target_messages_per_worker: default_target_per_worker(),
            scale_up_stabilization_seconds: 0,
            scale_down_stabilization_seconds: default_scale_down_seconds(),
            autoscaling: AutoscalingSpec::default(),
            resources: None,
            settings: BTreeMap::new(),
        }
    }
}

impl Default for AutoscalingSpec {
    fn default() -> Self {
        Self {
            mode: AutoscalingMode::default(),
            metric: ScaleMetric::default(),
            target_publish_rate_per_worker: default_rate_per_worker(),
            activation: 0,
            scale_up_limit: None,
            vhost: default_vhost(),
            polling_interval_seconds: default_polling_seconds(),
        }
    }
}

impl DedupSettings {
    /// Every queue the workers consume, as the binaries name them.
    pub fn queues(&self) -> Vec<String> {
        dedup_message::topology::shard_queues(&self.queue, self.queue_shards)
    }
}

impl Default for DedupSettings {
    fn default() -> Self {
        Self {
            key_fields: default_key_fields(),
            window: default_window(),
            queue: default_queue(),
            queue_shards: default_queue_shards(),
        }
    }
}

/// The CustomResourceDefinition as YAML, as `dedup-operator crd` prints it.
pub fn crd_yaml() -> anyhow::Result<String> {
    use kube::CustomResourceExt;
    Ok(serde_yaml::to_string(&DedupPipeline::crd())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed CRD is the one the types generate: regenerate it with
    /// `cargo run -p dedup-operator -- crd > k8s/crd/dedup-pipeline.yaml`.
    #[test]
    fn committed_crd_matches_the_types() {
        let committed = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../k8s/crd/dedup-pipeline.yaml"
        ))
        .expect("k8s/crd/dedup-pipeline.yaml");
        assert_eq!(
            committed,
            crd_yaml().unwrap(),
            "regenerate k8s/crd/dedup-pipeline.yaml from the types"
        );
    }

    /// A minimal resource (only the secrets) gets working defaults everywhere else.
    #[test]
    fn minimal_spec_gets_working_defaults() {
        let spec: DedupPipelineSpec = serde_yaml::from_str(
            "secrets:\n  rabbitmqUrl: {name: dedup, key: rabbitmq}\n  rabbitmqManagementUrl: {name: dedup, key: mgmt}\n  redisUrl: {name: dedup, key: redis}\n  databaseUrl: {name: dedup, key: db}\n",
        )
        .unwrap();
        assert_eq!(
            spec.image,
            format!("dedup/dedup:{}", env!("CARGO_PKG_VERSION"))
        );
        assert_eq!(spec.ingest.replicas, 2);
        assert_eq!(
            (
                spec.worker.min_replicas,
                spec.worker.max_replicas,
                spec.worker.target_messages_per_worker
            ),
            (1, 10, 1000)
        );
        assert_eq!(spec.worker.scale_down_stabilization_seconds, 300);
        assert_eq!(
            spec.dedup.key_fields,
            ["client_id", "event_name", "product_id", "sid", "r"]
        );
    }

    /// The definition is namespaced, has a status subresource, the short name and the columns.
    #[test]
    fn crd_has_status_short_name_and_printer_columns() {
        use kube::CustomResourceExt;
        let crd = DedupPipeline::crd();
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(
            crd.spec.names.short_names.as_deref(),
            Some(&["dedup".to_owned()][..])
        );
        let version = &crd.spec.versions[0];
        assert!(
            version
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some()
        );
        let columns: Vec<&str> = version
            .additional_printer_columns
            .as_ref()
            .unwrap()
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(columns, ["Queue", "Workers", "Desired", "Ready", "Age"]);
    }
}
