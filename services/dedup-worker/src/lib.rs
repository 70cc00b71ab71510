//! dedup-worker: the consumer side of the dedup pipeline.
//!
//! For every batch of deliveries: decode and validate (the undecodable go to the dead-letter
//! queue), compute keys and collapse in-batch copies, ask Redis which keys are known, insert
//! the rest into PostgreSQL with `ON CONFLICT DO NOTHING`, record the keys in Redis, then ack
//! the whole batch. PostgreSQL decides; Redis only saves it work.
//!
//! # Layout
//!
//! - [`config`]: settings (flags, environment, YAML) and the `migrate` command.
//! - [`consume`]: AMQP session, prefetch, batching, multiple-ack, reconnection.
//! - [`processor`]: the per-batch algorithm, steps 1–5.
//! - [`batch`]: decoding, validation, keys and in-batch collapse (pure).
//! - [`dead_letter`]: publishing refused events to the dead-letter queue.
//! - [`redis_tier`]: the recent keys in Redis, with degraded mode.
//! - [`store`]: PostgreSQL: migrations, partitions, the batch insert.
//! - [`jsonb`]: an event's text in the member order `jsonb` keeps (pure).
//! - [`error`]: what can go wrong, and whether to retry.
//! - `fault`: crash injection between a batch's steps (tests only).
//! - `tests`: the worker's tests against the real services.
//! - [`metrics`]: Prometheus metrics.

mod batch;
pub mod config;
mod consume;
mod dead_letter;
mod error;
#[cfg(test)]
mod fault;
// The fuzz targets (cargo-fuzz builds with `--cfg fuzzing`) check the jsonb ordering.
#[cfg(fuzzing)]
pub mod jsonb;
#[cfg(not(fuzzing))]
mod jsonb;
mod metrics;
mod processor;
mod redis_tier;
mod store;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use dedup_event::KeySpec;
use dedup_runtime::admin::{self, Readiness};
use dedup_runtime::queue_depth::{DepthReader, Placement, vhost_of};
use tokio_util::sync::CancellationToken;

pub use crate::config::Config;
use crate::consume::{Consumer, ConsumerSettings};
use crate::metrics::Metrics;
use crate::processor::{PartitionWindow, Processor};
use crate::redis_tier::{RedisSettings, RedisTier};
use crate::store::Store;

/// A configured worker, ready to run.
pub(crate) struct Worker {
    consumer: Consumer,
    processor: Arc<Processor>,
    config: Config,
}

impl Worker {
    /// Builds the worker from `config`. Nothing connects yet: the services may be down.
    pub fn new(config: Config) -> anyhow::Result<Self> {
        Self::build(
            config,
            #[cfg(test)]
            None,
        )
    }

    /// [`Worker::new`] with a crash injected wherever `fault` says (tests only).
    #[cfg(test)]
    pub fn with_fault(config: Config, fault: fault::FaultHook) -> anyhow::Result<Self> {
        Self::build(config, Some(fault))
    }

    fn build(config: Config, #[cfg(test)] fault: Option<fault::FaultHook>) -> anyhow::Result<Self> {
        config.check()?;
        let ca_pem = config.tls.ca_pem()?;
        let metrics = Metrics::new();
        let spec = KeySpec::new(&config.dedup_key_fields)
            .map_err(anyhow::Error::msg)
            .context("DEDUP_KEY_FIELDS")?;
        let redis = RedisTier::new(
            RedisSettings {
                url: config.redis_url.clone(),
                prefix: config.redis_prefix.clone(),
                key_buckets: config.redis_key_buckets,
                cluster: config.redis_cluster,
                recent_ttl: config.dedup_window,
                timeout: config.redis_timeout,
                retry_interval: config.redis_retry_interval,
                ca_pem: ca_pem.clone(),
            },
            metrics.clone(),
        )
        .context("REDIS_URL is not a valid Redis URL")?;
        let store = Store::connect_lazy(
            config.database_url.expose(),
            config.db_pool_size,
            config.db_statement_timeout,
            config.tls.tls_ca_file.as_deref(),
        )?;
        let processor = Arc::new(Processor {
            spec,
            topology: config.amqp.topology.clone(),
            redis,
            store,
            metrics,
            retry_max_backoff: config.reconnect_max_backoff,
            partitions: PartitionWindow {
                retention: config.retention,
                ahead_days: config.partitions_ahead,
            },
            #[cfg(test)]
            fault,
        });
        let consumer = Consumer::new(
            ConsumerSettings {
                url: config.amqp.rabbitmq_url.clone(),
                ca_pem,
                topology: config.amqp.topology.clone(),
                prefetch: config.effective_prefetch(),
                batch_size: config.batch_size.max(1),
                linger: config.batch_linger,
                reconnect_max_backoff: config.reconnect_max_backoff,
                batches_in_flight: config.batches_in_flight,
            },
            processor.clone(),
        );
        Ok(Self {
            consumer,
            processor,
            config,
        })
    }

    pub fn metrics(&self) -> &Metrics {
        &self.processor.metrics
    }

    pub fn store(&self) -> &Store {
        &self.processor.store
    }

    /// Whether the worker is consuming and getting anywhere, and if not why.
    pub fn readiness(&self) -> Readiness {
        let progress = self.consumer.progress();
        let limit = self.config.stall_timeout;
        let queues = self.config.amqp.topology.queues();
        Arc::new(move || {
            if let Some(queue) = progress.not_consumed() {
                return Err(format!(
                    "not consuming from RabbitMQ queue {}; see the worker's warnings",
                    queues[queue]
                ));
            }
            match progress.stalled(limit) {
                Some(stall) => Err(format!(
                    "stalled: {} deliveries of queue {} held and no batch committed for {}s; \
                     see the worker's warnings and dedup_worker_batch_errors_total",
                    stall.holding,
                    queues[stall.queue],
                    stall.idle.as_secs()
                )),
                None => Ok(()),
            }
        })
    }

    /// Consumes until `shutdown` resolves, then finishes the batch in hand within the grace
    /// period. Fails only for an injected crash.
    pub async fn run(
        &self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), error::Error> {
        let stop = CancellationToken::new();
        let grace = self.config.shutdown_grace;
        let signal = tokio::spawn({
            let stop = stop.clone();
            async move {
                shutdown.await;
                stop.cancel();
            }
        });
        let depth = tokio::spawn(report_queue_depth(
            self.config.clone(),
            self.processor.metrics.clone(),
            stop.clone(),
        ));
        let stall = tokio::spawn(report_stall(
            self.consumer.progress(),
            self.config.amqp.topology.queues(),
            self.config.stall_timeout,
            self.processor.metrics.clone(),
            stop.clone(),
        ));
        let maintenance = tokio::spawn(maintain_every(
            self.processor.clone(),
            self.config.maintain_interval,
            stop.clone(),
        ));
        let consume = self.consumer.run(stop.clone());
        tokio::pin!(consume);
        let result = tokio::select! {
            result = &mut consume => result,
            () = async { stop.cancelled().await; tokio::time::sleep(grace).await } => {
                tracing::warn!(?grace, "Shutdown grace period ran out; unacked deliveries go back to the queue.");
                Ok(())
            }
        };
        signal.abort();
        depth.abort();
        stall.abort();
        maintenance.abort();
        result
    }
}

/// Sets `dedup_worker_stalled` from the consumer's progress every few seconds, logging once
/// when the worker stalls and once when it commits again.
async fn report_stall(
    progress: Arc<consume::Progress>,
    queues: Vec<String>,
    limit: Duration,
    metrics: Metrics,
    stop: CancellationToken,
) {
    let mut was_stalled = false;
    loop {
        let stalled = progress.stalled(limit);
        metrics.stalled.set(i64::from(stalled.is_some()));
        match stalled {
            Some(stall) if !was_stalled => {
                tracing::error!(
                    queue = %queues[stall.queue],
                    holding = stall.holding,
                    idle_seconds = stall.idle.as_secs(),
                    "Worker stalled: deliveries held and no batch committed; it reports not ready."
                );
            }
            None if was_stalled => tracing::info!("Worker committing again."),
            _ => {}
        }
        was_stalled = stalled.is_some();
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(STALL_CHECK_INTERVAL.min(limit)) => {}
        }
    }
}

/// How often the stall gauge is brought up to date.
const STALL_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// Runs the partition maintenance at start and every `interval` (never when it is zero).
/// Failures are logged and tried again at the next turn.
async fn maintain_every(processor: Arc<Processor>, interval: Duration, stop: CancellationToken) {
    if interval.is_zero() {
        return;
    }
    loop {
        if let Err(e) = maintain_partitions(&processor).await {
            tracing::warn!(error = %e, retry_in = ?interval, "Partition maintenance failed; trying again later.");
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}

/// Creates the partitions from yesterday to PARTITIONS_AHEAD days on, drops those past the
/// retention, and counts both.
async fn maintain_partitions(processor: &Processor) -> Result<(), error::Error> {
    let now = chrono::Utc::now();
    let days = processor.partitions.days(now);
    let today = now.date_naive();
    let first = today.pred_opt().unwrap_or(today);
    let (created, dropped) = processor
        .store
        .maintain(first, *days.end(), *days.start())
        .await?;
    let m = &processor.metrics.partitions;
    m.with_label_values(&["created"])
        .inc_by(u64::try_from(created).unwrap_or(0));
    m.with_label_values(&["dropped"])
        .inc_by(u64::try_from(dropped).unwrap_or(0));
    tracing::info!(created, dropped, keep_from = %days.start(), ahead_to = %days.end(), "Partitions maintained.");
    Ok(())
}

/// Reads the depth of the main queue (every shard) and the dead-letter queue every
/// `queue_depth_interval` into the `dedup_queue_messages` gauges, until `stop`. Failures are
/// logged once, not fatal. The shards past AMQP_QUEUE_SHARDS are read too while they exist:
/// no worker consumes them (the count was lowered before they drained, or ingest splits the
/// queue into more shards than the workers), so their messages are stranded; their gauges put
/// them in front of the backlog alert, and the worker says what to do.
async fn report_queue_depth(config: Config, metrics: Metrics, stop: CancellationToken) {
    let reader = match config.tls.client_config().map(|tls| {
        DepthReader::with_tls(
            config.rabbitmq_management_url.expose(),
            Duration::from_secs(5),
            tls,
        )
    }) {
        Ok(Ok(reader)) => reader,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "Queue depth gauges disabled; fix RABBITMQ_MANAGEMENT_URL.");
            return;
        }
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "Queue depth gauges disabled; fix TLS_CA_FILE.");
            return;
        }
    };
    let vhost = vhost_of(config.amqp.rabbitmq_url.expose());
    let topology = &config.amqp.topology;
    let set = |queue: &str, depth: &dedup_runtime::queue_depth::QueueDepth| {
        let labels = QueueLabels::of(topology, queue);
        let gauge = |state| {
            metrics
                .queue_messages
                .with_label_values(&labels.with(state))
        };
        gauge("ready").set(i64::try_from(depth.ready).unwrap_or(i64::MAX));
        gauge("unacked").set(i64::try_from(depth.unacked).unwrap_or(i64::MAX));
    };
    let mut beyond = Beyond::default();
    let mut failing = false;
    let mut verdict = LeaderVerdict::default();
    loop {
        let shards = topology.queues();
        let mut placements = Vec::with_capacity(shards.len());
        for queue in &topology.all_queues() {
            match reader.read_placed(&vhost, queue).await {
                Ok((depth, placement)) => {
                    if std::mem::take(&mut failing) {
                        tracing::info!("Reading the queue depth again.");
                    }
                    set(queue, &depth);
                    if shards.contains(queue) {
                        placements.push(placement);
                    }
                }
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(%queue, error = %e, "Cannot read the queue depth; the gauges are stale.");
                }
                Err(_) => {}
            }
        }
        if let Some(now) = verdict.judge(shards.len(), &placements) {
            match now {
                Some(node) => tracing::warn!(
                    %node,
                    shards = shards.len(),
                    "Every shard queue's leader is on one node, so that node does all the \
                     queues' work and the shards gain nothing. Set queue_leader_locator = \
                     balanced in rabbitmq.conf and run `rabbitmq-queues rebalance quorum`."
                ),
                None => tracing::info!("The shard queues' leaders are on several nodes now."),
            }
            metrics
                .shard_leaders_on_one_node
                .set(i64::from(now.is_some()));
        }
        beyond.read(&reader, &vhost, topology, &metrics, &set).await;
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(config.queue_depth_interval) => {}
        }
    }
}

/// The labels of a queue's `dedup_queue_messages` gauges besides `state`. The role and the
/// main queue come from the worker's own topology, so alerts and dashboards tell the dead-letter
/// queue and a queue's shards by label, whatever the queues are named.
struct QueueLabels<'a> {
    queue: &'a str,
    role: &'static str,
    main_queue: &'a str,
}

impl<'a> QueueLabels<'a> {
    fn of(topology: &'a dedup_message::topology::Topology, queue: &'a str) -> Self {
        let role = if queue == topology.dead_letter_queue() {
            "dead_letter"
        } else {
            "events"
        };
        Self {
            queue,
            role,
            main_queue: &topology.queue,
        }
    }

    /// The label values in the gauge's order: queue, state, role, main_queue.
    fn with(&self, state: &'a str) -> [&'a str; 4] {
        [self.queue, state, self.role, self.main_queue]
    }
}

/// Whether the shard queues' leaders all sit on one node, as last judged.
#[derive(Default)]
struct LeaderVerdict {
    together: Option<String>,
}

impl LeaderVerdict {
    /// Judges one round's placements; returns the new verdict when it changed (the node
    /// leading them all, or `None` once they spread). A round that read fewer than all
    /// `shards` changes nothing: one failed read neither raises nor clears the warning.
    fn judge(&mut self, shards: usize, placements: &[Placement]) -> Option<Option<&str>> {
        if placements.len() != shards {
            return None;
        }
        let now = leaders_together(placements).map(str::to_owned);
        if now == self.together {
            return None;
        }
        self.together = now;
        Some(self.together.as_deref())
    }
}

/// The node leading every one of two or more quorum queues, when their replicas span more
/// than one node: RabbitMQ's default locator puts a new queue's leader on the declaring client's
/// node, so shards declared through one connection all land there. `None` for one queue, a
/// single-node broker, leaders on several nodes, or queues without leaders (classic queues).
fn leaders_together(placements: &[Placement]) -> Option<&str> {
    let [first, rest @ ..] = placements else {
        return None;
    };
    let leader = first.leader.as_deref()?;
    let same = rest.iter().all(|p| p.leader.as_deref() == Some(leader));
    let mut nodes: Vec<&str> = placements
        .iter()
        .flat_map(|p| p.members.iter().map(String::as_str))
        .collect();
    nodes.sort_unstable();
    nodes.dedup();
    (!rest.is_empty() && same && nodes.len() > 1).then_some(leader)
}

/// The shard queues past AMQP_QUEUE_SHARDS that exist, as last read.
#[derive(Default)]
struct Beyond {
    /// Each one's name, and whether its stranded messages were already logged.
    queues: Vec<(String, bool)>,
}

impl Beyond {
    /// Reads the shards numbered AMQP_QUEUE_SHARDS and up that exist, whatever their numbers
    /// (one listing by name; mostly it finds nothing). Each is gauged and, when it holds
    /// messages, logged once until it empties. The gauges of queues gone since are removed,
    /// so an alert does not fire on a deleted queue. A failed listing changes nothing.
    async fn read(
        &mut self,
        reader: &DepthReader,
        vhost: &str,
        topology: &dedup_message::topology::Topology,
        metrics: &Metrics,
        set: &impl Fn(&str, &dedup_runtime::queue_depth::QueueDepth),
    ) {
        let pattern = dedup_message::topology::shard_queue_pattern(&topology.queue);
        let Ok(mut listed) = reader.list(vhost, &pattern).await else {
            return;
        };
        listed.retain(|(queue, _)| {
            dedup_message::topology::shard_number(&topology.queue, queue)
                .is_some_and(|n| n >= topology.shards)
        });
        listed.sort_by_key(|(queue, _)| {
            dedup_message::topology::shard_number(&topology.queue, queue)
        });
        let mut found = Vec::new();
        for (queue, depth) in listed {
            set(&queue, &depth);
            let logged = self.queues.iter().any(|(q, logged)| *q == queue && *logged);
            let stranded = depth.total() > 0;
            if stranded && !logged {
                tracing::error!(
                    %queue,
                    messages = depth.total(),
                    shards = topology.shards,
                    "A queue past AMQP_QUEUE_SHARDS holds messages no worker consumes: give ingest \
                     and the workers the same AMQP_QUEUE_SHARDS, or raise it until that queue drains."
                );
            }
            found.push((queue, stranded));
        }
        for (gone, _) in self
            .queues
            .iter()
            .filter(|(q, _)| !found.iter().any(|(f, _)| f == q))
        {
            let labels = QueueLabels::of(topology, gone);
            for state in ["ready", "unacked"] {
                // Absent already is fine: nothing to remove.
                let _ = metrics
                    .queue_messages
                    .remove_label_values(&labels.with(state));
            }
        }
        self.queues = found;
    }
}

/// The binary's whole life: optional migrations, the admin server, then the consumer.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let worker = Worker::new(config.clone())?;
    if config.migrate_on_start {
        worker
            .store()
            .migrate()
            .await
            .context("applying migrations at start (MIGRATE_ON_START)")?;
        tracing::info!("Migrations applied.");
    }
    let admin_listener = admin::bind(config.admin_listen_addr, "ADMIN_LISTEN_ADDR").await?;
    let admin_router = admin::router(worker.metrics().registry.clone(), worker.readiness());
    let stop_admin = CancellationToken::new();
    let admin_task = admin::spawn(admin_listener, admin_router, stop_admin.clone());
    let result = worker.run(shutdown).await;
    stop_admin.cancel();
    let _ = admin_task.await;
    result.context("the worker stopped on an error")?;
    tracing::info!("dedup-worker stopped.");
    Ok(())
}

/// `dedup-worker maintain`: the partition maintenance once, for a CronJob or by hand.
pub async fn maintain(config: Config) -> anyhow::Result<()> {
    let worker = Worker::new(config)?;
    maintain_partitions(&worker.processor)
        .await
        .context("partition maintenance failed; check DATABASE_URL and that migrations ran")?;
    Ok(())
}

/// `dedup-worker migrate`: applies the migrations and reports what it did.
pub async fn migrate(config: &Config) -> anyhow::Result<()> {
    let store = Store::connect_lazy(
        config.database_url.expose(),
        1,
        config.db_statement_timeout,
        config.tls.tls_ca_file.as_deref(),
    )?;
    store.migrate().await.context(
        "cannot migrate the database at DATABASE_URL; check that PostgreSQL is running and the \
         database exists (e.g. `createdb dedup`)",
    )?;
    tracing::info!("Migrations applied.");
    Ok(())
}

#[cfg(test)]
mod tests;
