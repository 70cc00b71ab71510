//! Leader election on a `coordination.k8s.io` Lease, so that of the operator's replicas only
//! one scales the workers: during a rolling update of the operator, or with a standby, two
//! controllers acting on the same pipelines would fight over their replicas.
//!
//! The replica holding the Lease runs the controllers; the others wait. A leader that stops
//! (SIGTERM) releases the Lease; one that dies stops renewing it, and a standby takes it once
//! it expires. A leader that finds it lost the Lease stops at once (the process exits and
//! Kubernetes restarts it as a standby), as client-go's leader election does.

use std::future::Future;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;
use prometheus::IntGauge;
use tokio_util::sync::CancellationToken;

/// How the operator elects its leader.
#[derive(Debug, Clone, Args)]
pub struct LeaderArgs {
    /// Run only while holding the Lease (true), or always (false: one replica only).
    #[arg(long, env = "LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,
    /// Name of the Lease the replicas compete for.
    #[arg(long, env = "LEASE_NAME", default_value = "dedup-operator")]
    pub lease_name: String,
    /// Namespace of the Lease. Empty: the operator's own (in-cluster), else the kubeconfig's.
    #[arg(long, env = "LEASE_NAMESPACE", default_value = "")]
    pub lease_namespace: String,
    /// This replica's name in the Lease (the chart passes the pod name). Empty: a random one.
    #[arg(long, env = "POD_NAME", default_value = "")]
    pub identity: String,
    /// How long the Lease stays valid after the leader last renewed it: a dead leader is
    /// replaced within this time.
    #[arg(long, env = "LEASE_DURATION", value_parser = humantime::parse_duration, default_value = "15s")]
    pub lease_duration: Duration,
    /// The leader renews this long before the Lease would expire; also the clock skew between
    /// nodes the election tolerates.
    #[arg(long, env = "LEASE_RENEW_MARGIN", value_parser = humantime::parse_duration, default_value = "5s")]
    pub lease_renew_margin: Duration,
}

/// How a leadership term ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Term {
    /// The work finished (shutdown) while leading; the Lease was released.
    Finished,
    /// Asked to stop before ever leading.
    Stopped,
    /// Another replica holds the Lease now: the work was stopped mid-way.
    Lost,
}

/// Waits for the Lease, runs `work` while holding it, releases it after. `stop` ends the wait
/// for the Lease; the work watches for shutdown itself.
pub async fn lead<W>(
    client: Client,
    args: &LeaderArgs,
    leading_gauge: &IntGauge,
    stop: CancellationToken,
    work: W,
) -> anyhow::Result<Term>
where
    W: Future<Output = ()>,
{
    let duration = args.lease_duration.as_secs().max(2);
    let margin = args.lease_renew_margin.as_secs().clamp(1, duration - 1);
    let namespace = if args.lease_namespace.is_empty() {
        client.default_namespace().to_owned()
    } else {
        args.lease_namespace.clone()
    };
    let mut builder = LeaseManagerBuilder::new(client, &args.lease_name)
        .with_namespace(&namespace)
        .with_duration(duration)
        .with_grace(margin);
    if !args.identity.is_empty() {
        builder = builder.with_identity(&args.identity);
    }
    let manager = builder.build().await.with_context(|| {
        format!(
            "cannot read or create the Lease {namespace}/{}: the operator needs get, create and \
             patch on leases (coordination.k8s.io) in {namespace} (k8s/rbac.yaml), or run it \
             with LEADER_ELECTION=false as a single replica",
            args.lease_name
        )
    })?;
    let (mut leading, task) = manager.watch().await;
    tracing::info!(lease = %format!("{namespace}/{}", args.lease_name), "Waiting to lead.");
    let acquired = tokio::select! {
        () = stop.cancelled() => false,
        changed = leading.wait_for(|leader| *leader) => changed.is_ok(),
    };
    let term = if acquired {
        tracing::info!("Leading: this replica runs the controllers.");
        leading_gauge.set(1);
        let term = tokio::select! {
            () = work => Term::Finished,
            _ = leading.wait_for(|leader| !*leader) => Term::Lost,
        };
        leading_gauge.set(0);
        term
    } else {
        Term::Stopped
    };
    // Closing the channel makes the manager release the Lease (if held) and return.
    drop(leading);
    match task.await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "Could not release the Lease; it expires."),
        Err(e) => tracing::warn!(error = %e, "The Lease task failed; the Lease expires."),
    }
    if term == Term::Lost {
        tracing::error!("Lost the Lease to another replica: stopping.");
    }
    Ok(term)
}
