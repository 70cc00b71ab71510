//! Leader election on a `coordination.k8s.io` Lease, so that of the operator's replicas only
//! one scales the workers: during a rolling update of the operator, or with a standby, two
//! controllers acting on the same pipelines would fight over their replicas.
//!
//! The replica holding the Lease runs the controllers; the others wait. The election is
//! client-go's:
//!
//! - Every write (take, renew, release) replaces the Lease read just before, conditioned on
//!   its `resourceVersion`. A write decided on a read that is no longer current fails with
//!   409 Conflict and changes nothing: two candidates cannot both take a free Lease, and a
//!   standby cannot take or clear a Lease that was renewed after it looked.
//! - A standby reads the Lease every quarter of the renew margin and takes it when it has no
//!   holder, or when the Lease has not changed for its duration as timed on the standby's own
//!   clock from when it first saw that version. No two nodes' clocks are compared.
//! - The leader renews at the same pace. It stops at once when it finds another holder (the
//!   process exits and Kubernetes restarts it as a standby), and when no renewal got through
//!   for the Lease's duration less half the margin. Each attempt is timed from before its read,
//!   so the leader's work has stopped half a margin before any standby can take over.
//! - A leader that stops (SIGTERM) releases the Lease; one that dies stops renewing it, and a
//!   standby takes it once it has not changed for its duration.

use std::future::Future;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client};
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
    /// How long the Lease stays valid after the leader last renewed it: a standby replaces a
    /// dead leader this long (and at most a quarter of the renew margin more) after its last
    /// renewal.
    #[arg(long, env = "LEASE_DURATION", value_parser = humantime::parse_duration, default_value = "15s")]
    pub lease_duration: Duration,
    /// Every quarter of this, the leader renews the Lease and a standby reads it; a leader
    /// that got no renewal through for the Lease's duration less half of this stops working.
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
    let election = Election::new(client, args);
    tracing::info!(lease = %election.lease, "Waiting to lead.");
    let Some(taken) = election.take(&stop).await? else {
        return Ok(Term::Stopped);
    };
    tracing::info!("Leading: this replica runs the controllers.");
    leading_gauge.set(1);
    // Whichever ends first drops the other: a leader that must stop drops its work at once.
    let term = tokio::select! {
        () = work => Term::Finished,
        term = election.hold(taken) => term,
    };
    leading_gauge.set(0);
    match term {
        Term::Finished => election.release().await,
        Term::Lost => tracing::error!("Lost the Lease to another replica: stopping."),
        Term::NotRenewed => tracing::error!(
            "Could not renew the Lease in time: stopping before it expires, so that a standby \
             can take over. Check this pod's access to the Kubernetes API server."
        ),
        Term::Stopped => {}
    }
    Ok(term)
}

/// One replica's part in the election.
struct Election {
    leases: Api<Lease>,
    name: String,
    /// `namespace/name`, for messages.
    lease: String,
    identity: String,
    /// The Lease's duration, whole seconds as the Lease records it.
    duration: Duration,
    /// How often the leader renews and a standby reads; also the longest one attempt may take.
    every: Duration,
    /// How long after the start of its last successful renewal the leader may work.
    valid_for: Duration,
}

impl Election {
    fn new(client: Client, args: &LeaderArgs) -> Self {
        let duration = args.lease_duration.as_secs().max(2);
        let margin = args.lease_renew_margin.as_secs().clamp(1, duration - 1);
        let (duration, margin) = (Duration::from_secs(duration), Duration::from_secs(margin));
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
        Self {
            leases: Api::namespaced(client, &namespace),
            lease: format!("{namespace}/{}", args.lease_name),
            name: args.lease_name.clone(),
            identity,
            duration,
            every: (margin / 4).max(Duration::from_millis(100)),
            valid_for: duration - margin / 2,
        }
    }

    /// Waits until this replica holds the Lease: returns when the successful attempt began,
    /// or `None` when stopped first. The first attempt failing is an error that names the
    /// rights the operator needs; later failures are retried.
    async fn take(&self, stop: &CancellationToken) -> anyhow::Result<Option<Instant>> {
        // The Lease's version as last read, and when this replica first saw that version.
        let mut seen: Option<(String, Instant)> = None;
        let mut first = true;
        loop {
            let began = Instant::now();
            let attempt = tokio::select! {
                () = stop.cancelled() => return Ok(None),
                attempt = tokio::time::timeout(self.every, self.try_take(&mut seen)) => attempt,
            };
            match attempt {
                Ok(Ok(true)) => return Ok(Some(began)),
                Ok(Ok(false)) => {}
                Ok(Err(e)) if first => {
                    return Err(e).with_context(|| {
                        format!(
                            "cannot read or take the Lease {}: the operator needs get, create and \
                             update on leases (coordination.k8s.io) in its namespace \
                             (k8s/rbac.yaml), or run it with LEADER_ELECTION=false as a single \
                             replica",
                            self.lease
                        )
                    });
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, lease = %self.lease, "Cannot read or take the Lease.")
                }
                Err(_) => tracing::warn!(lease = %self.lease, "Reading the Lease timed out."),
            }
            first = false;
            tokio::select! {
                () = stop.cancelled() => return Ok(None),
                () = tokio::time::sleep_until(began + self.every) => {}
            }
        }
    }

    /// One look at the Lease: takes it (creating it if there is none) when it is free, this
    /// replica's own, or unchanged for its duration since first `seen`. `Ok(false)`: held by
    /// another replica, or written by someone since it was read.
    async fn try_take(&self, seen: &mut Option<(String, Instant)>) -> Result<bool, kube::Error> {
        let Some(mut lease) = self.leases.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.taken(None)),
            };
            return match self.leases.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                // Another replica created it first.
                Err(e) if has_status(&e, 409) => Ok(false),
                Err(e) => Err(e),
            };
        };
        let version = lease.metadata.resource_version.clone().unwrap_or_default();
        let first_seen = match seen {
            Some((seen_version, at)) if *seen_version == version => *at,
            _ => seen.insert((version, Instant::now())).1,
        };
        let spec = lease.spec.take().unwrap_or_default();
        let holder = spec.holder_identity.as_deref().unwrap_or_default();
        let duration = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map_or(self.duration, Duration::from_secs);
        let free = holder.is_empty() || holder == self.identity || first_seen.elapsed() >= duration;
        if !free {
            return Ok(false);
        }
        lease.spec = Some(self.taken(Some(spec)));
        match self
            .leases
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            // Written since it was read (renewed, or taken by another standby): look again.
            Err(e) if has_status(&e, 409) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The spec of a Lease this replica creates (`old` none), takes, or renews (holding `old`).
    fn taken(&self, old: Option<LeaseSpec>) -> LeaseSpec {
        let now = Some(MicroTime(Timestamp::now()));
        let (old, transitions) = match old {
            None => (LeaseSpec::default(), 0),
            Some(old) if old.holder_identity.as_deref() == Some(&self.identity) => {
                let transitions = old.lease_transitions.unwrap_or(0);
                return LeaseSpec {
                    renew_time: now,
                    lease_duration_seconds: Some(self.duration_seconds()),
                    lease_transitions: Some(transitions),
                    ..old
                };
            }
            Some(old) => {
                let transitions = old.lease_transitions.unwrap_or(0).saturating_add(1);
                (old, transitions)
            }
        };
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            acquire_time: now.clone(),
            renew_time: now,
            lease_duration_seconds: Some(self.duration_seconds()),
            lease_transitions: Some(transitions),
            ..old
        }
    }

    fn duration_seconds(&self) -> i32 {
        i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX)
    }

    /// Renews the Lease while leading, from `taken` (when the attempt that took it began);
    /// returns when the leader must stop.
    async fn hold(&self, taken: Instant) -> Term {
        let mut deadline = taken + self.valid_for;
        let mut began = taken;
        loop {
            tokio::time::sleep_until((began + self.every).min(deadline)).await;
            began = Instant::now();
            if began >= deadline {
                return Term::NotRenewed;
            }
            let limit = self.every.min(deadline - began);
            match tokio::time::timeout(limit, self.renew()).await {
                Ok(Ok(true)) => deadline = began + self.valid_for,
                Ok(Ok(false)) => return Term::Lost,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, lease = %self.lease, "Cannot renew the Lease.")
                }
                Err(_) => tracing::warn!(lease = %self.lease, "Renewing the Lease timed out."),
            }
            if Instant::now() >= deadline {
                return Term::NotRenewed;
            }
        }
    }

    /// Renews the Lease if this replica holds it; `Ok(false)` when another does (or it is gone).
    /// A conflict (someone wrote it since the read) is an error: the next attempt reads again.
    async fn renew(&self) -> Result<bool, kube::Error> {
        self.replace_held(|spec| self.taken(Some(spec))).await
    }

    /// Leaves the Lease free for a standby, if this replica still holds it. Bounded: on an API
    /// server that does not answer, the Lease expires instead.
    async fn release(&self) {
        let attempt = self.replace_held(|spec| LeaseSpec {
            holder_identity: None,
            acquire_time: None,
            renew_time: None,
            lease_duration_seconds: None,
            ..spec
        });
        match tokio::time::timeout(self.every * 2, attempt).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "Could not release the Lease; it expires."),
            Err(_) => tracing::warn!("Releasing the Lease timed out; it expires."),
        }
    }

    /// Reads the Lease and, if this replica holds it, replaces its spec with `write(spec)`,
    /// conditioned on the version read. `Ok(false)`: another replica holds it, or it is gone.
    async fn replace_held(
        &self,
        write: impl FnOnce(LeaseSpec) -> LeaseSpec,
    ) -> Result<bool, kube::Error> {
        let Some(mut lease) = self.leases.get_opt(&self.name).await? else {
            return Ok(false);
        };
        let spec = lease.spec.take().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(&self.identity) {
            return Ok(false);
        }
        lease.spec = Some(write(spec));
        self.leases
            .replace(&self.name, &PostParams::default(), &lease)
            .await
            .map(|_| true)
    }
}

/// Whether the API server answered `code`.
fn has_status(error: &kube::Error, code: u16) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == code)
}
