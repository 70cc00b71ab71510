//! The controller: reconciles a `DedupPipeline` into its workloads with server-side apply
//! (one field manager), scales the workers from queue depth, and reports status. Reconcile is
//! idempotent and always requeues, so the scaler sees the queue at a steady interval.

use dedup_runtime::tls::TlsArgs;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

use crate::crd::{AutoscalingMode, DedupPipeline, Recommendation, ScaleMetric, SecretKey};
use crate::metrics::Metrics;
use crate::resources::{self, Names};
use crate::scale::{Decision, Observation, Policy, Reason, ScaleUpLimit, Scaler};

/// The field manager of every apply.
pub const MANAGER: &str = "dedup-operator";
/// How often a pipeline is looked at again when nothing changes.
pub const REQUEUE: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API error: {0}")]
    Kube(#[from] kube::Error),
    #[error("the DedupPipeline has no namespace")]
    NoNamespace,
    /// A spec the operator will not apply, with why and what to change.
    #[error("{0}")]
    Spec(String),
    #[error(
        "worker.autoscaling.mode is keda but KEDA is not installed (no keda.sh/v1alpha1 \
         ScaledObject API): install KEDA, or set the mode to operator"
    )]
    KedaMissing,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Reads the queue depth of a pipeline.
pub type DepthSource =
    Arc<dyn Fn(Client, Arc<DedupPipeline>) -> BoxFuture<'static, Observation> + Send + Sync>;

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub depth: DepthSource,
    /// One scaler (recommendation history) per pipeline, keyed by namespace/name.
    pub scalers: Mutex<HashMap<String, Scaler>>,
    /// Consecutive failed reconciles per pipeline, for the retry backoff.
    pub failures: Mutex<HashMap<String, u32>>,
    pub recorder: Recorder,
    pub now: fn() -> DateTime<Utc>,
    pub metrics: Metrics,
}

impl Context {
    pub fn new(
        client: Client,
        depth: DepthSource,
        now: fn() -> DateTime<Utc>,
        metrics: Metrics,
    ) -> Self {
        let reporter = Reporter {
            controller: MANAGER.to_owned(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            depth,
            scalers: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
            now,
            metrics,
        }
    }
}

fn key_of(pipeline: &DedupPipeline) -> String {
    format!(
        "{}/{}",
        pipeline.namespace().unwrap_or_default(),
        pipeline.name_any()
    )
}

/// Brings the workloads of `pipeline` to what its spec says, scales its workers, and writes
/// its status.
#[tracing::instrument(skip_all, fields(pipeline = %pipeline.name_any()))]
pub async fn reconcile(pipeline: Arc<DedupPipeline>, ctx: Arc<Context>) -> Result<Action> {
    let timer = ctx.metrics.reconcile_seconds.start_timer();
    ctx.metrics.reconciles.inc();
    let result = reconcile_inner(pipeline.clone(), &ctx).await;
    timer.observe_duration();
    match &result {
        Ok(_) => {
            ctx.failures
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&key_of(&pipeline));
        }
        Err(error) => report_failure(&pipeline, error, &ctx).await,
    }
    result
}

/// A Normal event for every scaling decision, so `kubectl describe` tells the story. Best
/// effort: a lost event never fails the reconcile.
async fn report_scaling(
    pipeline: &DedupPipeline,
    from: i32,
    decision: &Decision,
    observation: &Observation,
    ctx: &Context,
) {
    let depth = match observation {
        Observation::Depth(d) => format!("{d} messages queued"),
        Observation::Rate(r) => format!("{r:.1} messages/s published"),
        Observation::Unavailable(_) => "queue depth unreadable".to_owned(),
        Observation::External => "set by KEDA or by hand".to_owned(),
    };
    let note = format!(
        "workers {from} → {} ({:?}, {depth})",
        decision.replicas, decision.reason
    );
    publish(
        ctx,
        pipeline,
        EventType::Normal,
        ("ScaledWorkers", "Scale"),
        note,
    )
    .await;
}

/// Publishes an event about `pipeline`, best effort: a lost event never fails the reconcile
/// (the API server may be what failed).
async fn publish(
    ctx: &Context,
    pipeline: &DedupPipeline,
    type_: EventType,
    (reason, action): (&str, &str),
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note),
        action: action.to_owned(),
        secondary: None,
    };
    if let Err(e) = ctx
        .recorder
        .publish(&event, &pipeline.object_ref(&()))
        .await
    {
        tracing::debug!(error = %e, reason, "Could not publish the event.");
    }
}

/// Makes a failed reconcile visible on the resource: a Warning event and a Degraded
/// condition. Both are best effort — the API server may be what failed.
async fn report_failure(pipeline: &DedupPipeline, error: &Error, ctx: &Context) {
    let note = error.to_string().chars().take(1000).collect();
    publish(
        ctx,
        pipeline,
        EventType::Warning,
        ("ReconcileFailed", "Reconcile"),
        note,
    )
    .await;
    let Some(namespace) = pipeline.namespace() else {
        return;
    };
    let degraded = condition(
        pipeline,
        "Degraded",
        true,
        "ReconcileFailed",
        error.to_string(),
        (ctx.now)(),
    );
    // Merged with the conditions the resource has: Ready and Progressing stay as last seen.
    let conditions = merged_conditions(previous_conditions(pipeline), vec![degraded]);
    let condition = json!({"status": {"conditions": conditions}});
    let _ = Api::<DedupPipeline>::namespaced(ctx.client.clone(), &namespace)
        .patch_status(
            &pipeline.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&condition),
        )
        .await;
}

async fn reconcile_inner(pipeline: Arc<DedupPipeline>, ctx: &Context) -> Result<Action> {
    let namespace = pipeline.namespace().ok_or(Error::NoNamespace)?;
    let refused = resources::refused_settings(&pipeline);
    if !refused.is_empty() {
        return Err(Error::Spec(refused.join("; ")));
    }
    let names = Names::of(&pipeline);
    let apply = PatchParams::apply(MANAGER).force();
    let config = resources::config_map(&pipeline);
    let checksum = resources::config_checksum(&config);
    Api::<ConfigMap>::namespaced(ctx.client.clone(), &namespace)
        .patch(&names.config(), &apply, &Patch::Apply(&config))
        .await?;
    let deployments = Api::<Deployment>::namespaced(ctx.client.clone(), &namespace);
    let ingest = deployments
        .patch(
            &names.ingest(),
            &apply,
            &Patch::Apply(&resources::ingest_deployment(&pipeline, &checksum)),
        )
        .await?;
    Api::<Service>::namespaced(ctx.client.clone(), &namespace)
        .patch(
            &names.ingest(),
            &apply,
            &Patch::Apply(&resources::ingest_service(&pipeline)),
        )
        .await?;

    let current = deployments
        .get_opt(&names.worker())
        .await?
        .and_then(|d| d.spec?.replicas)
        .unwrap_or(pipeline.spec.worker.min_replicas);
    let now = (ctx.now)();
    let mode = pipeline.spec.worker.autoscaling.mode;
    let (observation, decision, history) = if mode == AutoscalingMode::Operator {
        let observation = (ctx.depth)(ctx.client.clone(), pipeline.clone()).await;
        let (decision, history) = decide(ctx, &pipeline, &namespace, current, &observation, now);
        (observation, decision, history)
    } else {
        let decision = Decision {
            replicas: current,
            reason: Reason::External,
        };
        (Observation::External, decision, Vec::new())
    };
    let worker = deployments
        .patch(
            &names.worker(),
            &apply,
            &Patch::Apply(&resources::worker_deployment(
                &pipeline,
                &checksum,
                // Other modes write back the replicas they found: leaving the field out would
                // hand it back to its default (1) whenever no other manager owns it yet.
                Some(decision.replicas),
            )),
        )
        .await?;
    apply_keda(&pipeline, &namespace, ctx).await?;
    if decision.replicas != current {
        tracing::info!(pipeline = %names.pipeline, from = current, to = decision.replicas, reason = ?decision.reason, "Scaling workers.");
        report_scaling(&pipeline, current, &decision, &observation, ctx).await;
    }
    let (ingest_available, workers_available) = (available(&ingest), available(&worker));
    record_metrics(
        ctx,
        &namespace,
        &names,
        &decision,
        (workers_available, pipeline.spec.worker.max_replicas),
        &observation,
    );
    let mut status = status_patch(
        &pipeline,
        &observation,
        decision,
        current,
        ingest_available,
        workers_available,
        now,
    );
    status["status"]["recommendations"] = json!(history);
    status["status"]["autoscalingMode"] = json!(mode);
    Api::<DedupPipeline>::namespaced(ctx.client.clone(), &namespace)
        .patch_status(
            &names.pipeline,
            &PatchParams::default(),
            &Patch::Merge(&status),
        )
        .await?;
    Ok(Action::requeue(REQUEUE))
}

/// `keda` mode: the TriggerAuthentication and ScaledObject, applied. Leaving `keda` (as the
/// status remembers it): both deleted, so KEDA's HPA stops setting the replicas.
async fn apply_keda(pipeline: &DedupPipeline, namespace: &str, ctx: &Context) -> Result<()> {
    let mode = pipeline.spec.worker.autoscaling.mode;
    let was = pipeline.status.as_ref().and_then(|s| s.autoscaling_mode);
    if mode != AutoscalingMode::Keda && was != Some(AutoscalingMode::Keda) {
        return Ok(());
    }
    let name = Names::of(pipeline).worker();
    let objects = [
        (
            resources::keda_resource("TriggerAuthentication"),
            resources::trigger_authentication(pipeline),
        ),
        (
            resources::keda_resource("ScaledObject"),
            resources::scaled_object(pipeline),
        ),
    ];
    for (resource, object) in objects {
        let api = Api::<DynamicObject>::namespaced_with(ctx.client.clone(), namespace, &resource);
        let result = if mode == AutoscalingMode::Keda {
            api.patch(
                &name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&object),
            )
            .await
            .map(|_| ())
        } else {
            match api.delete(&name, &DeleteParams::default()).await {
                Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
                other => other.map(|_| ()),
            }
        };
        match result {
            Err(kube::Error::Api(e)) if e.code == 404 => return Err(Error::KedaMissing),
            other => other?,
        }
    }
    Ok(())
}

/// The pipeline's worker count now, through its scaler (which keeps the stabilization
/// history between reconciles).
fn decide(
    ctx: &Context,
    pipeline: &DedupPipeline,
    namespace: &str,
    current: i32,
    observation: &Observation,
    now: DateTime<Utc>,
) -> (Decision, Vec<Recommendation>) {
    let spec = &pipeline.spec.worker;
    let auto = &spec.autoscaling;
    let policy = Policy {
        min: spec.min_replicas,
        max: spec.max_replicas,
        target_per_worker: match auto.metric {
            ScaleMetric::QueueLength => spec.target_messages_per_worker,
            ScaleMetric::MessageRate => auto.target_publish_rate_per_worker,
        },
        scale_up_window: chrono::Duration::seconds(spec.scale_up_stabilization_seconds),
        scale_down_window: chrono::Duration::seconds(spec.scale_down_stabilization_seconds),
        activation: auto.activation,
        scale_up_limit: auto.scale_up_limit.map(|l| ScaleUpLimit {
            pods: l.pods,
            percent: l.percent,
            period: chrono::Duration::seconds(l.period_seconds),
        }),
    };
    let key = format!("{namespace}/{}", Names::of(pipeline).pipeline);
    let mut scalers = ctx.scalers.lock().unwrap_or_else(|e| e.into_inner());
    let scaler = scalers
        .entry(key)
        .or_insert_with(|| Scaler::from_history(kept_history(pipeline)));
    let decision = scaler.decide(now, current, observation, &policy);
    let history = scaler
        .history()
        .map(|(at, replicas)| Recommendation {
            at: at.to_rfc3339(),
            replicas,
        })
        .collect();
    (decision, history)
}

/// The recommendations the pipeline's status kept (unreadable entries skipped).
fn kept_history(pipeline: &DedupPipeline) -> Vec<(DateTime<Utc>, i32)> {
    pipeline
        .status
        .iter()
        .flat_map(|s| &s.recommendations)
        .filter_map(|r| {
            let at = DateTime::parse_from_rfc3339(&r.at).ok()?;
            Some((at.with_timezone(&Utc), r.replicas))
        })
        .collect()
}

/// Available replicas of a deployment as its status reports them.
fn available(deployment: &Deployment) -> i32 {
    deployment
        .status
        .as_ref()
        .and_then(|s| s.available_replicas)
        .unwrap_or(0)
}

/// The operator's gauges for one pipeline.
fn record_metrics(
    ctx: &Context,
    namespace: &str,
    names: &Names,
    decision: &Decision,
    (workers_available, workers_max): (i32, i32),
    observation: &Observation,
) {
    let labels = [namespace, names.pipeline.as_str()];
    let m = &ctx.metrics;
    m.workers_desired
        .with_label_values(&labels)
        .set(i64::from(decision.replicas));
    m.workers_current
        .with_label_values(&labels)
        .set(i64::from(workers_available));
    m.workers_max
        .with_label_values(&labels)
        .set(i64::from(workers_max));
    match observation {
        Observation::Depth(d) => m.queue_depth.with_label_values(&labels).set(*d),
        Observation::Unavailable(_) => m.queue_depth.with_label_values(&labels).set(-1),
        // Not read by the operator (the workers export the queue's gauges themselves).
        Observation::Rate(_) | Observation::External => {}
    }
}

/// What to do after a failed reconcile: log it and try again soon.
pub fn error_policy(pipeline: Arc<DedupPipeline>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_errors.inc();
    let failures = {
        let mut all = ctx.failures.lock().unwrap_or_else(|e| e.into_inner());
        let n = all.entry(key_of(&pipeline)).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    // 5 s, 10 s, 20 s … up to 5 minutes.
    let delay = Duration::from_secs(5)
        .saturating_mul(1 << (failures - 1).min(6))
        .min(Duration::from_secs(300));
    tracing::warn!(pipeline = %pipeline.name_any(), error = %error, retry_in = ?delay, "Reconcile failed; retrying.");
    Action::requeue(delay)
}

/// One condition of `pipeline`, as of `now`.
fn condition(
    pipeline: &DedupPipeline,
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    now: DateTime<Utc>,
) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: if ok { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
        message,
        observed_generation: pipeline.metadata.generation,
        last_transition_time: Time(
            k8s_openapi::jiff::Timestamp::from_second(now.timestamp())
                .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
        ),
    }
}

/// The conditions the resource carries now.
fn previous_conditions(pipeline: &DedupPipeline) -> &[Condition] {
    pipeline
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default()
}

/// `new` conditions merged into `old`: a condition whose status did not change keeps its
/// `lastTransitionTime` (it marks a transition, not the last look), and types `new` does not
/// mention stay as they were.
pub fn merged_conditions(old: &[Condition], new: Vec<Condition>) -> Vec<Condition> {
    let mut merged: Vec<Condition> = new
        .into_iter()
        .map(|mut c| {
            if let Some(before) = old.iter().find(|o| o.type_ == c.type_)
                && before.status == c.status
            {
                c.last_transition_time = before.last_transition_time.clone();
            }
            c
        })
        .collect();
    for before in old {
        if !merged.iter().any(|c| c.type_ == before.type_) {
            merged.push(before.clone());
        }
    }
    merged
}

/// The status merge patch: observed generation, conditions, depth and workers.
pub fn status_patch(
    pipeline: &DedupPipeline,
    observation: &Observation,
    decision: Decision,
    previous: i32,
    ingest_available: i32,
    workers_available: i32,
    now: DateTime<Utc>,
) -> serde_json::Value {
    let generation = pipeline.metadata.generation;
    let condition = |type_: &str, ok: bool, reason: &str, message: String| {
        condition(pipeline, type_, ok, reason, message, now)
    };
    let ready = ingest_available > 0 && (workers_available > 0 || decision.replicas == 0);
    let (degraded, degraded_reason, degraded_message) = match observation {
        Observation::Unavailable(why) => (
            true,
            "BrokerUnreachable",
            format!("queue depth unreadable, workers held: {why}"),
        ),
        Observation::Depth(_) => (false, "AsExpected", "queue depth read".to_owned()),
        Observation::Rate(_) => (false, "AsExpected", "publish rate read".to_owned()),
        Observation::External => (
            false,
            "AsExpected",
            "the worker replicas are set by KEDA or by hand (worker.autoscaling.mode)".to_owned(),
        ),
    };
    let progressing =
        decision.replicas != previous || matches!(decision.reason, Reason::Stabilizing);
    let mut status = json!({
        "status": {
            "observedGeneration": generation,
            "desiredWorkers": decision.replicas,
            "currentWorkers": workers_available,
            "queueDepth": match observation { Observation::Depth(d) => Some(*d), _ => None },
            "conditions": merged_conditions(previous_conditions(pipeline), vec![
                condition("Ready", ready, if ready { "Available" } else { "Unavailable" },
                    format!("{ingest_available} ingest and {workers_available} worker pods available")),
                condition("Progressing", progressing, &format!("{:?}", decision.reason),
                    format!("workers {previous} → {}", decision.replicas)),
                condition("Degraded", degraded, degraded_reason, degraded_message),
            ]),
        }
    });
    if decision.replicas != previous {
        status["status"]["lastScaleTime"] = json!(now.to_rfc3339());
    }
    status
}

/// The production depth source: the management URL and vhost from the pipeline's Secrets;
/// `https://` is verified against the system's roots and `tls`'s CA file (read on each use,
/// so a rotated CA is picked up).
pub fn broker_depth(tls: TlsArgs) -> DepthSource {
    Arc::new(move |client: Client, pipeline: Arc<DedupPipeline>| {
        let tls = tls.clone();
        Box::pin(async move {
            let namespace = pipeline.namespace().unwrap_or_default();
            let secrets = Api::<Secret>::namespaced(client, &namespace);
            let read = |key: SecretKey| {
                let secrets = secrets.clone();
                async move {
                    let secret = secrets
                        .get(&key.name)
                        .await
                        .map_err(|e| format!("Secret {}: {e}", key.name))?;
                    let bytes = secret
                        .data
                        .and_then(|d| d.get(&key.key).cloned())
                        .ok_or_else(|| format!("Secret {} has no key {}", key.name, key.key))?;
                    String::from_utf8(bytes.0)
                        .map_err(|e| format!("Secret {} key {}: {e}", key.name, key.key))
                }
            };
            let management = match read(pipeline.spec.secrets.rabbitmq_management_url.clone()).await
            {
                Ok(url) => url,
                Err(e) => return Observation::Unavailable(e),
            };
            let amqp = read(pipeline.spec.secrets.rabbitmq_url.clone())
                .await
                .unwrap_or_default();
            let vhost = dedup_runtime::queue_depth::vhost_of(&amqp);
            let config = match tls.client_config() {
                Ok(config) => config,
                Err(e) => return Observation::Unavailable(format!("{e:#}")),
            };
            let reader = match dedup_runtime::queue_depth::DepthReader::with_tls(
                &management,
                Duration::from_secs(5),
                config,
            ) {
                Ok(reader) => reader,
                Err(e) => return Observation::Unavailable(e.to_string()),
            };
            match reader.read_sum(&vhost, &pipeline.spec.dedup.queues()).await {
                Ok(depth) => match pipeline.spec.worker.autoscaling.metric {
                    ScaleMetric::QueueLength => {
                        Observation::Depth(i64::try_from(depth.total()).unwrap_or(i64::MAX))
                    }
                    ScaleMetric::MessageRate => Observation::Rate(depth.publish_rate),
                },
                Err(e) => Observation::Unavailable(e.to_string()),
            }
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{DedupPipelineSpec, DedupPipelineStatus};

    fn pipeline() -> DedupPipeline {
        let spec: DedupPipelineSpec = serde_yaml::from_str(
            "secrets:\n  rabbitmqUrl: {name: s, key: a}\n  rabbitmqManagementUrl: {name: s, key: m}\n  redisUrl: {name: s, key: r}\n  databaseUrl: {name: s, key: d}\n",
        )
        .expect("spec");
        DedupPipeline::new("events", spec)
    }

    fn at(second: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(second, 0).expect("time")
    }

    fn time_of(conditions: &[Condition], type_: &str) -> i64 {
        let c = conditions.iter().find(|c| c.type_ == type_).expect(type_);
        c.last_transition_time.0.as_second()
    }

    /// A condition keeps its lastTransitionTime while its status holds and takes a new one when
    /// it flips; conditions the update does not name stay.
    #[test]
    fn conditions_change_their_time_only_on_a_transition() {
        let p = pipeline();
        let old = vec![
            condition(&p, "Ready", true, "Available", "1 ingest".into(), at(100)),
            condition(&p, "Degraded", false, "AsExpected", "ok".into(), at(100)),
            condition(&p, "Progressing", false, "Steady", "2 → 2".into(), at(100)),
        ];
        let new = vec![
            condition(&p, "Ready", true, "Available", "2 ingest".into(), at(500)),
            condition(
                &p,
                "Degraded",
                true,
                "ReconcileFailed",
                "conflict".into(),
                at(500),
            ),
        ];
        let merged = merged_conditions(&old, new);
        assert_eq!(time_of(&merged, "Ready"), 100, "still Ready: no transition");
        assert_eq!(
            time_of(&merged, "Degraded"),
            500,
            "False → True is a transition"
        );
        assert_eq!(time_of(&merged, "Progressing"), 100, "not named: kept");
        let ready = merged.iter().find(|c| c.type_ == "Ready").expect("Ready");
        assert_eq!(ready.message, "2 ingest", "the message is the latest");
        assert_eq!(merged.len(), 3);
    }

    /// The status patch of a steady pipeline keeps the times its conditions already have.
    #[test]
    fn a_steady_pipeline_keeps_its_transition_times() {
        let mut p = pipeline();
        let decision = Decision {
            replicas: 2,
            reason: Reason::Steady,
        };
        let first = status_patch(&p, &Observation::Depth(10), decision, 2, 1, 2, at(100));
        let conditions: Vec<Condition> =
            serde_json::from_value(first["status"]["conditions"].clone()).expect("conditions");
        p.status = Some(DedupPipelineStatus {
            conditions,
            ..Default::default()
        });
        let later = status_patch(&p, &Observation::Depth(12), decision, 2, 1, 2, at(900));
        let conditions: Vec<Condition> =
            serde_json::from_value(later["status"]["conditions"].clone()).expect("conditions");
        for type_ in ["Ready", "Progressing", "Degraded"] {
            assert_eq!(time_of(&conditions, type_), 100, "{type_}");
        }
    }
}
