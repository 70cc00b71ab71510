//! The AMQP side: a competing consumer with manual acks. It sets prefetch before consuming,
//! gathers deliveries into batches (by event count or linger time), hands each batch to the
//! [`Processor`] and acks it with one multiple-ack after the commit. On connection loss it
//! reconnects with backoff; whatever was not acked is redelivered by the broker.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use dedup_message::message::Envelope;
use dedup_message::topology::{Topology, describe_declare_error};
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
    pub prefetch: u16,
    pub batch_size: usize,
    pub linger: Duration,
    pub reconnect_max_backoff: Duration,
    /// Batches processed at once; their acks still go in delivery order.
    pub batches_in_flight: usize,
}

/// Whether the worker gets anywhere with what it holds: deliveries in hand and when a batch
/// last committed. A worker that holds deliveries and commits nothing for a while (a database
/// refusing every statement, a bug) is stalled: it stops being ready and says so in a metric.
#[derive(Debug)]
pub struct Progress {
    started: std::time::Instant,
    /// Deliveries received and not yet acked.
    holding: AtomicUsize,
    /// Milliseconds after `started` of the last ack, or of the moment the worker began to
    /// hold deliveries while it held none.
    last_progress_ms: AtomicU64,
}

impl Default for Progress {
    fn default() -> Self {
        Self {
            started: std::time::Instant::now(),
            holding: AtomicUsize::new(0),
            last_progress_ms: AtomicU64::new(0),
        }
    }
}

impl Progress {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn received(&self) {
        if self.holding.fetch_add(1, Ordering::Relaxed) == 0 {
            self.last_progress_ms
                .store(self.now_ms(), Ordering::Relaxed);
        }
    }

    fn acked(&self, deliveries: usize) {
        self.last_progress_ms
            .store(self.now_ms(), Ordering::Relaxed);
        let _ = self
            .holding
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(deliveries))
            });
    }

    /// The session ended: the broker takes back whatever was held.
    fn released(&self) {
        self.holding.store(0, Ordering::Relaxed);
    }

    /// `Some((deliveries held, time without progress))` when the worker holds deliveries and
    /// has committed nothing for longer than `limit`.
    pub fn stalled(&self, limit: Duration) -> Option<(usize, Duration)> {
        let holding = self.holding.load(Ordering::Relaxed);
        let idle = Duration::from_millis(
            self.now_ms()
                .saturating_sub(self.last_progress_ms.load(Ordering::Relaxed)),
        );
        (holding > 0 && idle > limit).then_some((holding, idle))
    }
}

/// The consumer loop of one worker process.
pub struct Consumer {
    settings: ConsumerSettings,
    processor: Arc<Processor>,
    /// True while a session is consuming: the worker's readiness.
    consuming: Arc<AtomicBool>,
    /// What the worker holds and when it last committed: readiness and the stall metric.
    progress: Arc<Progress>,
}

impl Consumer {
    pub fn new(settings: ConsumerSettings, processor: Arc<Processor>) -> Self {
        Self {
            settings,
            processor,
            consuming: Arc::new(AtomicBool::new(false)),
            progress: Arc::new(Progress::default()),
        }
    }

    pub fn consuming_flag(&self) -> Arc<AtomicBool> {
        self.consuming.clone()
    }

    pub fn progress(&self) -> Arc<Progress> {
        self.progress.clone()
    }

    /// Consumes until `stop` is cancelled, reconnecting after failures. Returns an error only
    /// for an injected crash (tests) — every real failure is retried.
    pub async fn run(&self, stop: CancellationToken) -> Result<()> {
        let mut backoff = Backoff::new(self.settings.reconnect_max_backoff);
        while !stop.is_cancelled() {
            let outcome = self.session(&stop, &mut backoff).await;
            self.consuming.store(false, Ordering::Relaxed);
            self.progress.released();
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
                    tracing::warn!(queue = %self.settings.topology.queue, error = %e, retry_in = ?delay,
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

    /// One connection's life: consume and process until stopped or broken.
    async fn session(&self, stop: &CancellationToken, backoff: &mut Backoff) -> Result<()> {
        let s = &self.settings;
        let connection = tokio::time::timeout(
            Duration::from_secs(10),
            dedup_message::topology::connect(s.url.expose(), s.ca_pem.as_deref()),
        )
        .await
        .map_err(|_| {
            Error::Amqp(lapin::Error::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connecting to RabbitMQ timed out",
            )))
        })??;
        let result = self.consume(&connection, stop, backoff).await;
        let (code, text) = match &result {
            Ok(()) => (200, "worker stopping"),
            Err(_) => (320, "worker restarting the session"),
        };
        let _ =
            tokio::time::timeout(Duration::from_secs(2), connection.close(code, text.into())).await;
        result
    }

    async fn consume(
        &self,
        connection: &Connection,
        stop: &CancellationToken,
        backoff: &mut Backoff,
    ) -> Result<()> {
        let s = &self.settings;
        let (channel, dead_letter_channel, mut consumer) = self.open(connection).await?;
        self.consuming.store(true, Ordering::Relaxed);
        backoff.reset();

        let mut pending = Pending::default();
        // Batches being processed, oldest first, with the last delivery tag of each. Acks go
        // strictly in this order: a multiple-ack covers a batch only once every batch before it
        // has committed too.
        let mut in_flight = InFlight {
            batches: Default::default(),
            progress: self.progress.clone(),
        };
        let max_in_flight = s.batches_in_flight.max(1);
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
                        return self.finish(&channel, &dead_letter_channel, consumer, batch, &mut in_flight, stop).await;
                    }
                    done = in_flight.oldest(), if !in_flight.is_empty() => {
                        in_flight.acknowledge(done, &channel).await?;
                        false
                    }
                    () = linger => true,
                    next = consumer.next() => match next {
                        Some(Ok(delivery)) => {
                            self.progress.received();
                            pending.push(delivery, s)
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

    /// Declares the topology and opens the consuming channel (with its prefetch) and the
    /// confirmed channel dead letters go out on.
    async fn open(
        &self,
        connection: &Connection,
    ) -> Result<(lapin::Channel, lapin::Channel, lapin::Consumer)> {
        let s = &self.settings;
        let channel = connection.create_channel().await?;
        if let Err(e) = s.topology.declare(&channel).await {
            tracing::error!(error = %describe_declare_error(&s.topology, &e), "Cannot declare the queues.");
            return Err(e.into());
        }
        let dead_letter_channel = connection.create_channel().await?;
        dead_letter_channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        channel
            .basic_qos(s.prefetch, BasicQosOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                s.topology.queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        tracing::info!(queue = %s.topology.queue, prefetch = s.prefetch, batch_size = s.batch_size, "Consuming.");
        Ok((channel, dead_letter_channel, consumer))
    }

    /// Stops consuming and finishes the batches in hand. Deliveries the broker sent before the
    /// cancel are in hand too (they arrive before its answer), so they join the last batch;
    /// anything else goes back to the queue.
    async fn finish(
        &self,
        channel: &lapin::Channel,
        dead_letter_channel: &lapin::Channel,
        mut consumer: lapin::Consumer,
        mut pending: Vec<Delivery>,
        in_flight: &mut InFlight,
        stop: &CancellationToken,
    ) -> Result<()> {
        let _ = channel
            .basic_cancel(consumer.tag(), BasicCancelOptions::default())
            .await;
        let drained_by = Instant::now() + SHUTDOWN_DRAIN;
        while let Ok(Some(Ok(delivery))) =
            tokio::time::timeout_at(drained_by, consumer.next()).await
        {
            self.progress.received();
            pending.push(delivery);
        }
        if !pending.is_empty() {
            in_flight.push(self.spawn(pending, dead_letter_channel, stop));
        }
        while !in_flight.is_empty() {
            in_flight.complete_oldest(channel).await?;
        }
        let _ = dead_letter_channel
            .close(200, "worker stopping".into())
            .await;
        let _ = channel.close(200, "worker stopping".into()).await;
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
    fn push(&mut self, delivery: Delivery, s: &ConsumerSettings) -> bool {
        self.events += Envelope::event_count(&delivery.properties);
        self.deadline
            .get_or_insert_with(|| Instant::now() + s.linger);
        self.deliveries.push(delivery);
        self.events >= s.batch_size || self.deliveries.len() >= usize::from(s.prefetch.max(1))
    }

    /// The deliveries gathered, leaving it empty.
    fn take(&mut self) -> Vec<Delivery> {
        self.events = 0;
        self.deadline = None;
        std::mem::take(&mut self.deliveries)
    }
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
            self.progress.acked(batch.deliveries);
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
