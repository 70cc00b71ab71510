//! The AMQP side: a competing consumer with manual acks. It sets prefetch before consuming,
//! gathers deliveries into batches (by event count or linger time), hands each batch to the
//! [`Processor`] and acks it with one multiple-ack after the commit. On connection loss it
//! reconnects with backoff; whatever was not acked is redelivered by the broker.
//!
//! With the queue split into shards (`AMQP_QUEUE_SHARDS`) the worker consumes every shard,
//! each in a session of its own (connection, channel, batches) sharing one [`Processor`]; the
//! prefetch and the batches in flight are split among them, so the worker's bounds hold.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use dedup_message::message::Envelope;
use dedup_message::topology::{
    CLOSE_WAIT, SETUP_WAIT, Topology, close_channel, close_connection, describe_declare_error,
};
use dedup_runtime::backoff::Backoff;
use futures::StreamExt;
use lapin::Connection;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::processor::Processor;

/// On shutdown, the longest wait for deliveries the broker sent before the consumer was
/// cancelled (normally they are already here: the cancel's answer comes after them).
const SHUTDOWN_DRAIN: Duration = Duration::from_millis(500);

/// Settings of the consumer.
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    pub url: dedup_runtime::secret::SecretUrl,
    /// `TLS_CA_FILE`'s PEM text, for `amqps://`.
    pub ca_pem: Option<String>,
    pub topology: Topology,
    /// The worker's prefetch, over all the queues it consumes.
    pub prefetch: u16,
    pub batch_size: usize,
    pub linger: Duration,
    pub reconnect_max_backoff: Duration,
    /// Batches processed at once, over all the queues; each queue's acks go in delivery order.
    pub batches_in_flight: usize,
}

impl ConsumerSettings {
    /// The prefetch of each queue's consumer: an even share of the worker's, at least 1.
    pub fn prefetch_per_queue(&self) -> u16 {
        (self.prefetch / self.topology.shards.max(1)).max(1)
    }

    /// The batches in flight of each queue's consumer: an even share, at least 1.
    pub fn batches_in_flight_per_queue(&self) -> usize {
        (self.batches_in_flight / usize::from(self.topology.shards.max(1))).max(1)
    }
}

/// Whether the worker gets anywhere with what it holds: per queue, deliveries in hand and when
/// a batch last committed. A worker that holds deliveries of a queue and commits nothing of
/// them for a while (a database refusing every statement, a bug) is stalled: it stops being
/// ready and says so in a metric.
#[derive(Debug)]
pub struct Progress {
    started: std::time::Instant,
    queues: Vec<QueueProgress>,
}

#[derive(Debug, Default)]
struct QueueProgress {
    /// Deliveries received and not yet acked.
    holding: AtomicUsize,
    /// Milliseconds after `started` of the last ack, or of the moment the consumer began to
    /// hold deliveries while it held none.
    last_progress_ms: AtomicU64,
    /// Whether a session is consuming the queue.
    consuming: AtomicBool,
}

impl Progress {
    fn new(queues: usize) -> Self {
        Self {
            started: std::time::Instant::now(),
            queues: (0..queues.max(1))
                .map(|_| QueueProgress::default())
                .collect(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn queue(&self, queue: usize) -> &QueueProgress {
        &self.queues[queue % self.queues.len()]
    }

    fn received(&self, queue: usize) {
        let q = self.queue(queue);
        if q.holding.fetch_add(1, Ordering::Relaxed) == 0 {
            q.last_progress_ms.store(self.now_ms(), Ordering::Relaxed);
        }
    }

    fn acked(&self, queue: usize, deliveries: usize) {
        let q = self.queue(queue);
        q.last_progress_ms.store(self.now_ms(), Ordering::Relaxed);
        let _ = q
            .holding
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(deliveries))
            });
    }

    fn set_consuming(&self, queue: usize, consuming: bool) {
        self.queue(queue)
            .consuming
            .store(consuming, Ordering::Relaxed);
    }

    /// The session ended: the broker takes back whatever was held.
    fn released(&self, queue: usize) {
        let q = self.queue(queue);
        q.consuming.store(false, Ordering::Relaxed);
        q.holding.store(0, Ordering::Relaxed);
    }

    /// The first queue (its index in the topology's consumed queues) without a consuming
    /// session, or `None` while every queue has one.
    pub fn not_consumed(&self) -> Option<usize> {
        self.queues
            .iter()
            .position(|q| !q.consuming.load(Ordering::Relaxed))
    }

    /// `Some(Stall)` when the worker holds deliveries of a queue and has committed nothing of
    /// them for longer than `limit` (the longest-idle such queue).
    pub fn stalled(&self, limit: Duration) -> Option<Stall> {
        let now = self.now_ms();
        self.queues
            .iter()
            .enumerate()
            .filter_map(|(queue, q)| {
                let holding = q.holding.load(Ordering::Relaxed);
                let idle = Duration::from_millis(
                    now.saturating_sub(q.last_progress_ms.load(Ordering::Relaxed)),
                );
                (holding > 0 && idle > limit).then_some(Stall {
                    queue,
                    holding,
                    idle,
                })
            })
            .max_by_key(|stall| stall.idle)
    }
}

/// A queue whose deliveries the worker holds without committing any of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stall {
    /// The queue's index in the topology's consumed queues.
    pub queue: usize,
    /// Deliveries held.
    pub holding: usize,
    /// Time since the queue's last commit (or since it began to hold deliveries).
    pub idle: Duration,
}

/// The consumer loops of one worker process, one per queue.
pub struct Consumer {
    settings: ConsumerSettings,
    processor: Arc<Processor>,
    /// Per queue, whether it is consumed, what the worker holds of it and when it last
    /// committed: readiness and the stall metric.
    progress: Arc<Progress>,
}

/// One queue's consumer: which queue, and its index in [`Progress`].
#[derive(Clone, Copy)]
struct QueueRef<'a> {
    index: usize,
    name: &'a str,
}

impl Consumer {
    pub fn new(settings: ConsumerSettings, processor: Arc<Processor>) -> Self {
        let queues = usize::from(settings.topology.shards.max(1));
        Self {
            settings,
            processor,
            progress: Arc::new(Progress::new(queues)),
        }
    }

    pub fn progress(&self) -> Arc<Progress> {
        self.progress.clone()
    }

    /// Consumes every queue until `stop` is cancelled, reconnecting after failures. Returns an
    /// error only for an injected crash (tests) — every real failure is retried.
    pub async fn run(&self, stop: CancellationToken) -> Result<()> {
        let names = self.settings.topology.queues();
        let loops = names
            .iter()
            .enumerate()
            .map(|(index, name)| self.run_queue(QueueRef { index, name }, stop.clone()));
        futures::future::try_join_all(loops).await.map(|_| ())
    }

    /// One queue's sessions, one after the other, until `stop` is cancelled.
    async fn run_queue(&self, queue: QueueRef<'_>, stop: CancellationToken) -> Result<()> {
        let mut backoff = Backoff::new(self.settings.reconnect_max_backoff);
        while !stop.is_cancelled() {
            let outcome = self.session(queue, &stop, &mut backoff).await;
            self.progress.released(queue.index);
            match outcome {
                Ok(()) => return Ok(()),
                #[cfg(test)]
                Err(e @ Error::InjectedCrash(_)) => return Err(e),
                Err(e) => {
                    self.processor
                        .metrics
                        .batch_errors
                        .with_label_values(&[e.stage()])
                        .inc();
                    let delay = backoff.next_delay();
                    tracing::warn!(queue = %queue.name, error = %e, retry_in = ?delay,
                        "Broker session ended; reconnecting.");
                    tokio::select! {
                        () = stop.cancelled() => return Ok(()),
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        Ok(())
    }

    /// One connection's life: consume `queue` and process until stopped or broken.
    async fn session(
        &self,
        queue: QueueRef<'_>,
        stop: &CancellationToken,
        backoff: &mut Backoff,
    ) -> Result<()> {
        let s = &self.settings;
        let connect = tokio::time::timeout(
            SETUP_WAIT,
            dedup_message::topology::connect(s.url.expose(), s.ca_pem.as_deref()),
        );
        let connection = tokio::select! {
            () = stop.cancelled() => return Ok(()),
            connected = connect => connected.map_err(|_| timed_out("connecting to RabbitMQ"))??,
        };
        let result = self.consume(queue, &connection, stop, backoff).await;
        let (code, text) = match &result {
            Ok(()) => (200, "worker stopping"),
            Err(_) => (320, "worker restarting the session"),
        };
        close_connection(&connection, code, text).await;
        result
    }

    async fn consume(
        &self,
        queue: QueueRef<'_>,
        connection: &Connection,
        stop: &CancellationToken,
        backoff: &mut Backoff,
    ) -> Result<()> {
        let s = &self.settings;
        let open = tokio::time::timeout(SETUP_WAIT, self.open(queue, connection));
        let (channel, dead_letter_channel, mut consumer) = tokio::select! {
            () = stop.cancelled() => return Ok(()),
            opened = open => opened.map_err(|_| timed_out(
                "the broker accepted the connection but opening the channels and the consumer"
            ))??,
        };
        self.progress.set_consuming(queue.index, true);
        backoff.reset();
        let batch_limits = BatchLimits {
            events: s.batch_size,
            deliveries: usize::from(s.prefetch_per_queue()),
            linger: s.linger,
        };

        let mut pending = Pending::default();
        // Batches being processed, oldest first, with the last delivery tag of each. Acks go
        // strictly in this order: a multiple-ack covers a batch only once every batch before it
        // has committed too.
        let mut in_flight = InFlight {
            batches: Default::default(),
            progress: self.progress.clone(),
            queue: queue.index,
        };
        let max_in_flight = s.batches_in_flight_per_queue();
        let result: Result<()> = async {
            loop {
                let linger = async {
                    match pending.deadline {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                };
                let full = tokio::select! {
                    biased;
                    () = stop.cancelled() => {
                        let batch = pending.take();
                        return self.finish(queue, &channel, &dead_letter_channel, consumer, batch, &mut in_flight, stop).await;
                    }
                    done = in_flight.oldest(), if !in_flight.is_empty() => {
                        in_flight.acknowledge(done, &channel).await?;
                        false
                    }
                    () = linger => true,
                    next = consumer.next() => match next {
                        Some(Ok(delivery)) => {
                            self.progress.received(queue.index);
                            pending.push(delivery, &batch_limits)
                        }
                        Some(Err(e)) => return Err(e.into()),
                        None => return Err(Error::Amqp(lapin::Error::from(std::io::Error::other("the broker cancelled the consumer")))),
                    },
                };
                if full && !pending.deliveries.is_empty() {
                    while in_flight.len() >= max_in_flight {
                        in_flight.complete_oldest(&channel).await?;
                    }
                    in_flight.push(self.spawn(pending.take(), &dead_letter_channel, stop));
                }
            }
        }
        .await;
        // On failure nothing more is acked: stop the other batches; the broker redelivers.
        in_flight.abort_all();
        result
    }

    /// Declares the topology and opens the channel consuming `queue` (with its prefetch) and
    /// the confirmed channel dead letters go out on.
    async fn open(
        &self,
        queue: QueueRef<'_>,
        connection: &Connection,
    ) -> Result<(lapin::Channel, lapin::Channel, lapin::Consumer)> {
        let s = &self.settings;
        let channel = connection.create_channel().await?;
        if let Err(e) = s.topology.declare_consumed(&channel, queue.name).await {
            tracing::error!(error = %describe_declare_error(&s.topology, &e), "Cannot declare the queues.");
            return Err(e.into());
        }
        let dead_letter_channel = connection.create_channel().await?;
        dead_letter_channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let prefetch = s.prefetch_per_queue();
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                queue.name.into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        tracing::info!(queue = %queue.name, prefetch, batch_size = s.batch_size, "Consuming.");
        Ok((channel, dead_letter_channel, consumer))
    }

    /// Stops consuming and finishes the batches in hand. Deliveries the broker sent before the
    /// cancel are in hand too (they arrive before its answer), so they join the last batch;
    /// anything else goes back to the queue.
    #[allow(
        clippy::too_many_arguments,
        reason = "the consume loop's state, handed over once"
    )]
    async fn finish(
        &self,
        queue: QueueRef<'_>,
        channel: &lapin::Channel,
        dead_letter_channel: &lapin::Channel,
        mut consumer: lapin::Consumer,
        mut pending: Vec<Delivery>,
        in_flight: &mut InFlight,
        stop: &CancellationToken,
    ) -> Result<()> {
        // A hung broker never answers the cancel; past CLOSE_WAIT the worker goes on without it.
        let _ = tokio::time::timeout(
            CLOSE_WAIT,
            channel.basic_cancel(consumer.tag(), BasicCancelOptions::default()),
        )
        .await;
        let drained_by = Instant::now() + SHUTDOWN_DRAIN;
        while let Ok(Some(Ok(delivery))) =
            tokio::time::timeout_at(drained_by, consumer.next()).await
        {
            self.progress.received(queue.index);
            pending.push(delivery);
        }
        if !pending.is_empty() {
            in_flight.push(self.spawn(pending, dead_letter_channel, stop));
        }
        while !in_flight.is_empty() {
            in_flight.complete_oldest(channel).await?;
        }
        tokio::join!(
            close_channel(dead_letter_channel, 200, "worker stopping"),
            close_channel(channel, 200, "worker stopping"),
        );
        Ok(())
    }

    fn spawn(
        &self,
        batch: Vec<Delivery>,
        dead_letter_channel: &lapin::Channel,
        stop: &CancellationToken,
    ) -> Batch {
        let last_tag = batch.last().map(|d| d.delivery_tag).unwrap_or_default();
        let deliveries = batch.len();
        let (processor, channel, stop) = (
            self.processor.clone(),
            dead_letter_channel.clone(),
            stop.clone(),
        );
        let task =
            tokio::spawn(
                async move { processor.process(&batch, &channel, &stop).await.map(|_| ()) },
            );
        Batch {
            last_tag,
            deliveries,
            task,
        }
    }
}

/// Deliveries gathering into the next batch.
#[derive(Default)]
struct Pending {
    deliveries: Vec<Delivery>,
    /// Events they carry (a message may carry many).
    events: usize,
    /// When the batch goes even if not full: the first delivery's arrival + the linger.
    deadline: Option<Instant>,
}

impl Pending {
    /// Adds `delivery`; true when the batch is full (BATCH_SIZE events or a prefetch's worth
    /// of messages).
    fn push(&mut self, delivery: Delivery, limits: &BatchLimits) -> bool {
        self.events += Envelope::event_count(&delivery.properties);
        self.deadline
            .get_or_insert_with(|| Instant::now() + limits.linger);
        self.deliveries.push(delivery);
        self.events >= limits.events || self.deliveries.len() >= limits.deliveries.max(1)
    }

    /// The deliveries gathered, leaving it empty.
    fn take(&mut self) -> Vec<Delivery> {
        self.events = 0;
        self.deadline = None;
        std::mem::take(&mut self.deliveries)
    }
}

/// When a queue's batch is full, or due.
struct BatchLimits {
    events: usize,
    /// The queue's prefetch: no more deliveries can arrive before an ack.
    deliveries: usize,
    linger: Duration,
}

/// A batch being processed.
struct Batch {
    last_tag: u64,
    deliveries: usize,
    task: tokio::task::JoinHandle<Result<()>>,
}

/// The batches in flight, in delivery order.
struct InFlight {
    batches: std::collections::VecDeque<Batch>,
    progress: Arc<Progress>,
    /// The queue's index in `progress`.
    queue: usize,
}

impl InFlight {
    fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }

    fn len(&self) -> usize {
        self.batches.len()
    }

    fn push(&mut self, batch: Batch) {
        self.batches.push_back(batch);
    }

    /// Resolves when the oldest batch is done (pending forever when there is none).
    async fn oldest(&mut self) -> Result<()> {
        match self.batches.front_mut() {
            Some(batch) => (&mut batch.task).await.unwrap_or_else(|e| {
                Err(Error::Amqp(lapin::Error::from(std::io::Error::other(
                    format!("batch task failed: {e}"),
                ))))
            }),
            None => std::future::pending().await,
        }
    }

    /// Acks the oldest batch after [`InFlight::oldest`] said it committed.
    async fn acknowledge(&mut self, done: Result<()>, channel: &lapin::Channel) -> Result<()> {
        done?;
        if let Some(batch) = self.batches.pop_front() {
            channel
                .basic_ack(batch.last_tag, BasicAckOptions { multiple: true })
                .await?;
            self.progress.acked(self.queue, batch.deliveries);
        }
        Ok(())
    }

    async fn complete_oldest(&mut self, channel: &lapin::Channel) -> Result<()> {
        let done = self.oldest().await;
        self.acknowledge(done, channel).await
    }

    fn abort_all(&mut self) {
        for batch in self.batches.drain(..) {
            batch.task.abort();
        }
    }
}

/// The error for a step with the broker that took longer than [`SETUP_WAIT`].
fn timed_out(what: &str) -> Error {
    Error::Amqp(lapin::Error::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("{what} timed out after {SETUP_WAIT:?}"),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(prefetch: u16, batches_in_flight: usize, shards: u16) -> ConsumerSettings {
        let mut topology = Topology::prefixed("t");
        topology.shards = shards;
        ConsumerSettings {
            url: "amqp://127.0.0.1".into(),
            ca_pem: None,
            topology,
            prefetch,
            batch_size: 500,
            linger: Duration::from_millis(20),
            reconnect_max_backoff: Duration::from_secs(1),
            batches_in_flight,
        }
    }

    /// The worker's prefetch and batches in flight are split over its queues, so it holds no
    /// more than one queue's worth in all, and every queue keeps at least one of each.
    #[test]
    fn prefetch_and_batches_are_split_over_the_queues() {
        let one = settings(300, 3, 1);
        assert_eq!(
            (one.prefetch_per_queue(), one.batches_in_flight_per_queue()),
            (300, 3)
        );
        let four = settings(300, 3, 4);
        assert_eq!(
            (
                four.prefetch_per_queue(),
                four.batches_in_flight_per_queue()
            ),
            (75, 1)
        );
        let many = settings(2, 1, 8);
        assert_eq!(
            (
                many.prefetch_per_queue(),
                many.batches_in_flight_per_queue()
            ),
            (1, 1)
        );
    }

    /// One stalled queue makes the worker stalled even while another commits, and the worker
    /// consumes only while every queue has a session.
    #[tokio::test]
    async fn a_queue_holding_deliveries_without_commits_stalls_the_worker() {
        let progress = Progress::new(2);
        assert_eq!(progress.not_consumed(), Some(0));
        progress.set_consuming(0, true);
        assert_eq!(
            progress.not_consumed(),
            Some(1),
            "one queue of two is not enough"
        );
        progress.set_consuming(1, true);
        assert_eq!(progress.not_consumed(), None);
        progress.received(0);
        progress.received(1);
        tokio::time::sleep(Duration::from_millis(5)).await;
        progress.acked(1, 1);
        // Queue 0 holds one delivery and committed nothing for 5 ms; queue 1 just committed.
        let stalled = progress.stalled(Duration::from_millis(2));
        assert!(
            matches!(stalled, Some(Stall { queue: 0, holding: 1, idle }) if idle >= Duration::from_millis(5)),
            "{stalled:?}"
        );
        assert_eq!(
            progress.stalled(Duration::from_secs(60)),
            None,
            "not past a longer limit"
        );
        progress.released(0);
        assert_eq!(
            progress.stalled(Duration::ZERO),
            None,
            "the broker took the delivery back"
        );
        assert_eq!(
            progress.not_consumed(),
            Some(0),
            "a released queue is not consumed"
        );
    }
}
