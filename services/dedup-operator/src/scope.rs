//! Which namespaces the operator watches: every one (a ClusterRole), or only those listed in
//! `WATCH_NAMESPACES` (a Role in each), so that one operator per team or release sees and
//! touches only its own pipelines, their Deployments and the Secrets they name.

use k8s_openapi::api::apps::v1::Deployment;
use kube::{Api, Client};

use crate::crd::DedupPipeline;

/// The pipeline and Deployment APIs of one watched scope.
pub struct Watched {
    pub pipelines: Api<DedupPipeline>,
    pub deployments: Api<Deployment>,
    /// `None`: the whole cluster.
    pub namespace: Option<String>,
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
