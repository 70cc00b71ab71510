//! Leader election on a `coordination.k8s.io` Lease, so that of the operator's replicas only
//! one scales the workers: during a rolling update of the operator, or with a standby, two
//! controllers acting on the same pipelines would fight over their replicas.
//!
//! The replica holding the Lease runs the controllers; the others wait. A leader that stops
//! (SIGTERM) releases the Lease; one that dies stops renewing it, and a standby takes it once
//! it expires. A leader that finds it lost the Lease stops at once (the process exits and
//! Kubernetes restarts it as a standby), as client-go's leader election does.
//!
//! A leader that cannot renew also stops, before its Lease can expire: it reads the Lease
//! every quarter of the renew margin, and once the last renewal it saw is older than the
//! Lease's duration less half the margin, it stops (client-go's renew deadline). So a leader
//! cut off from the API server does not work on while a standby takes the Lease and starts
//! working too, provided the nodes' clocks differ by less than a quarter of the margin.

use std::future::Future;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::{Api, Client};
use kube_lease_manager::LeaseManagerBuilder;
use prometheus::IntGauge;
use tokio::time::Instant;
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
    /// The leader renews this long before the Lease would expire; if no renewal got through,
    /// it stops working at least a quarter of this before expiry. That quarter is the clock
    /// skew between nodes the election tolerates.
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
    /// The Lease was not renewed in time (the API server unreachable or refusing): the work
    /// was stopped before the Lease could expire.
    NotRenewed,
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
    let identity = if args.identity.is_empty() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        format!("dedup-operator-{}-{nanos}", std::process::id())
    } else {
        args.identity.clone()
    };
    let leases: Api<Lease> = Api::namespaced(client.clone(), &namespace);
    let manager = LeaseManagerBuilder::new(client, &args.lease_name)
        .with_namespace(&namespace)
        .with_duration(duration)
        .with_grace(margin)
        .with_identity(&identity);
    let manager = manager.build().await.with_context(|| {
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
    let (term, fenced) = if acquired {
        tracing::info!("Leading: this replica runs the controllers.");
        leading_gauge.set(1);
        let fence = Fence {
            leases: &leases,
            name: &args.lease_name,
            identity: &identity,
            duration: Duration::from_secs(duration),
            margin: Duration::from_secs(margin),
        };
        let (term, fenced) = tokio::select! {
            () = work => (Term::Finished, false),
            _ = leading.wait_for(|leader| !*leader) => (Term::Lost, false),
            term = fence.watch() => (term, true),
        };
        leading_gauge.set(0);
        (term, fenced)
    } else {
        (Term::Stopped, false)
    };
    if fenced {
        // The manager still believes it holds the Lease: releasing would clear another
        // holder's, or wait on an API server that does not answer. The Lease expires.
        task.abort();
    } else {
        // Closing the channel makes the manager release the Lease (if held) and return.
        drop(leading);
        match task.await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "Could not release the Lease; it expires."),
            Err(e) => tracing::warn!(error = %e, "The Lease task failed; the Lease expires."),
        }
    }
    match term {
        Term::Lost => tracing::error!("Lost the Lease to another replica: stopping."),
        Term::NotRenewed => tracing::error!(
            "Could not renew the Lease in time: stopping before it expires, so that a standby \
             can take over. Check this pod's access to the Kubernetes API server."
        ),
        Term::Finished | Term::Stopped => {}
    }
    Ok(term)
}

/// Stops a leader whose Lease renewals have not been seen in time.
struct Fence<'a> {
    leases: &'a Api<Lease>,
    name: &'a str,
    identity: &'a str,
    duration: Duration,
    margin: Duration,
}

impl Fence<'_> {
    /// Returns when the leader must stop: another holder ([`Term::Lost`]), or no renewal seen
    /// by half the margin before the Lease would expire ([`Term::NotRenewed`]). Runs while
    /// leading. The manager renews a whole margin before expiry, so a renewal that succeeds is
    /// seen in time; the last read, at the deadline, ends by a quarter margin before expiry.
    async fn watch(&self) -> Term {
        let every = (self.margin / 4).max(Duration::from_millis(100));
        let valid_for = self.duration.saturating_sub(self.margin / 2);
        // Leading began with a renewal just now.
        let mut deadline = Instant::now() + valid_for;
        loop {
            tokio::time::sleep_until(deadline.min(Instant::now() + every)).await;
            match tokio::time::timeout(every, self.leases.get(self.name)).await {
                Ok(Ok(lease)) => {
                    let spec = lease.spec.unwrap_or_default();
                    if spec.holder_identity.as_deref() != Some(self.identity) {
                        return Term::Lost;
                    }
                    // The renewal time is this replica's own clock: its manager wrote it.
                    if let Some(renewed) = spec.renew_time {
                        let age = Timestamp::now()
                            .duration_since(renewed.0)
                            .try_into()
                            .unwrap_or_default();
                        deadline = Instant::now() + valid_for.saturating_sub(age);
                    }
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "Cannot read the Lease."),
                Err(_) => tracing::warn!("Reading the Lease timed out."),
            }
            if Instant::now() >= deadline {
                return Term::NotRenewed;
            }
        }
    }
}
