//! Which namespaces the operator watches: every one (a ClusterRole), or only those listed in
//! `WATCH_NAMESPACES` (a Role in each), so that one operator per team or release sees and
//! touches only its own pipelines, their Deployments and the Secrets they name.

use std::sync::Arc;

use futures::{Stream, StreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use kube::runtime::reflector;
use kube::runtime::{Controller, WatchStreamExt, predicates, watcher};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;

use crate::controller::{self, Context};
use crate::crd::DedupPipeline;

/// The pipeline and Deployment APIs of one watched scope.
pub struct Watched {
    pub pipelines: Api<DedupPipeline>,
    pub deployments: Api<Deployment>,
    /// `None`: the whole cluster.
    pub namespace: Option<String>,
}

impl Watched {
    /// Reconciles this scope's pipelines until `shutdown`: on a change of a pipeline's spec, of
    /// a Deployment it owns, and on the controller's own requeue (every 15 s, for scaling).
    pub async fn run(self, ctx: Arc<Context>, shutdown: CancellationToken) {
        let (reader, writer) = reflector::store();
        let events = watcher(self.pipelines, watcher::Config::default())
            .default_backoff()
            .reflect(writer);
        Controller::for_stream(spec_changes(events), reader)
            .owns(self.deployments, watcher::Config::default())
            .graceful_shutdown_on(shutdown.cancelled_owned())
            .run(controller::reconcile, controller::error_policy, ctx)
            .for_each(|result| async move {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "Reconcile did not complete.");
                }
            })
            .await;
    }
}

/// The pipelines whose spec changed (a new `metadata.generation`, or first seen), from a
/// watch stream. Status writes, the operator's own every 15 s among them, do not raise the
/// generation and so start no reconcile.
pub fn spec_changes<S>(
    events: S,
) -> impl Stream<Item = Result<DedupPipeline, watcher::Error>> + Send + 'static
where
    S: Stream<Item = Result<watcher::Event<DedupPipeline>, watcher::Error>> + Send + 'static,
{
    events
        .applied_objects()
        .predicate_filter(predicates::generation, Default::default())
}

/// The scopes to watch: the whole cluster when `namespaces` is empty, else each namespace
/// once (blank entries and repeats ignored).
pub fn watched(client: &Client, namespaces: &[String]) -> Vec<Watched> {
    let mut names: Vec<&str> = namespaces
        .iter()
        .map(|n| n.trim())
        .filter(|n| !n.is_empty())
        .collect();
    names.sort_unstable();
    names.dedup();
    if names.is_empty() {
        return vec![Watched {
            pipelines: Api::all(client.clone()),
            deployments: Api::all(client.clone()),
            namespace: None,
        }];
    }
    names
        .into_iter()
        .map(|ns| Watched {
            pipelines: Api::namespaced(client.clone(), ns),
            deployments: Api::namespaced(client.clone(), ns),
            namespace: Some(ns.to_owned()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{DedupPipelineSpec, DedupPipelineStatus};

    fn pipeline(name: &str, uid: &str, generation: i64, queue_depth: i64) -> DedupPipeline {
        let spec: DedupPipelineSpec = serde_yaml::from_str(
            "secrets:\n  rabbitmqUrl: {name: s, key: a}\n  rabbitmqManagementUrl: {name: s, key: m}\n  redisUrl: {name: s, key: r}\n  databaseUrl: {name: s, key: d}\n",
        )
        .expect("spec");
        let mut p = DedupPipeline::new(name, spec);
        p.metadata.namespace = Some("prod".into());
        p.metadata.uid = Some(uid.into());
        p.metadata.generation = Some(generation);
        p.status = Some(DedupPipelineStatus {
            queue_depth: Some(queue_depth),
            ..Default::default()
        });
        p
    }

    /// Of a watch stream, only first sightings and spec changes start a reconcile: the
    /// operator's own status writes (same generation) do not; a pipeline deleted and made
    /// again under the same name (new uid) does.
    #[tokio::test]
    async fn only_spec_changes_start_a_reconcile() {
        let events = [
            watcher::Event::Apply(pipeline("events", "u1", 1, 0)),
            watcher::Event::Apply(pipeline("other", "u2", 1, 0)),
            watcher::Event::Apply(pipeline("events", "u1", 1, 4500)),
            watcher::Event::Apply(pipeline("events", "u1", 1, 4600)),
            watcher::Event::Apply(pipeline("events", "u1", 2, 4600)),
            watcher::Event::Apply(pipeline("other", "u2", 1, 7)),
            watcher::Event::Delete(pipeline("events", "u1", 2, 4600)),
            watcher::Event::Apply(pipeline("events", "u3", 1, 0)),
        ];
        let seen: Vec<(String, String, i64)> =
            spec_changes(futures::stream::iter(events.into_iter().map(Ok)))
                .map(|p| {
                    let p = p.expect("no watch error");
                    (
                        p.metadata.name.unwrap(),
                        p.metadata.uid.unwrap(),
                        p.metadata.generation.unwrap(),
                    )
                })
                .collect()
                .await;
        let expected = [
            ("events", "u1", 1),
            ("other", "u2", 1),
            ("events", "u1", 2),
            ("events", "u3", 1),
        ]
        .map(|(n, u, g)| (n.to_owned(), u.to_owned(), g));
        assert_eq!(seen, expected);
    }

    fn client() -> Client {
        let config = kube::Config::new("http://127.0.0.1:1".parse().expect("url"));
        Client::try_from(config).expect("client")
    }

    /// Listed namespaces are watched each on its own, never the cluster; none listed is the
    /// whole cluster.
    #[tokio::test]
    async fn listed_namespaces_are_watched_alone() {
        let client = client();
        let scopes = watched(
            &client,
            &[
                "team-b".into(),
                " team-a ".into(),
                "team-b".into(),
                "".into(),
            ],
        );
        let urls: Vec<(&str, &str)> = scopes
            .iter()
            .map(|w| (w.pipelines.resource_url(), w.deployments.resource_url()))
            .collect();
        assert_eq!(
            urls,
            [
                (
                    "/apis/dedup.io/v1alpha1/namespaces/team-a/deduppipelines",
                    "/apis/apps/v1/namespaces/team-a/deployments"
                ),
                (
                    "/apis/dedup.io/v1alpha1/namespaces/team-b/deduppipelines",
                    "/apis/apps/v1/namespaces/team-b/deployments"
                ),
            ]
        );
        let all = watched(&client, &[]);
        assert_eq!(all.len(), 1);
        assert_eq!(
            all[0].pipelines.resource_url(),
            "/apis/dedup.io/v1alpha1/deduppipelines"
        );
        assert_eq!(all[0].namespace, None);
    }
}
