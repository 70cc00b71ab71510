//! Packing concurrent single-event requests into shared messages.
//!
//! Each request hands its event to a queue and waits. Flusher tasks take whatever is waiting —
//! as much as one [`Envelope`] takes — publish it as one confirmed message and answer every
//! request in it. Nothing waits for a batch to fill: when no message is awaiting its confirm,
//! an event goes at once, alone if it is alone. While one is, the next events gather until
//! their message is full or that confirm comes back (as Nagle's algorithm does for TCP
//! segments), so a busy ingest sends few, full messages: the broker's cost is mostly per
//! message. A full message goes at once beside those in flight, up to the flushers' number,
//! so the rate is never capped at one message per confirm round trip. The worker still
//! judges every event on its own, and a confirm answers only the requests whose events the
//! message carried. With the queue split into shards, each shard has its own waiting events
//! and flushers: a message goes to one queue, so it carries only events routed there.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use dedup_message::message::Envelope;
use tokio::sync::{Mutex, Notify, OwnedSemaphorePermit, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::publish::{PublishError, Publisher};

/// Settings of the coalescer.
#[derive(Debug, Clone)]
pub struct CoalesceSettings {
    /// Most events packed into one message.
    pub max_events: usize,
    /// Flusher tasks per queue shard: how many packed messages may await a confirm at once
    /// (all but the first only when full).
    pub flushers: usize,
    /// Queue shards (`AMQP_QUEUE_SHARDS`).
    pub shards: u16,
    /// How long a request waits for its answer before giving up with 503.
    pub timeout: Duration,
}

/// One request's event waiting to be published.
struct Pending {
    line: Vec<u8>,
    received_at: DateTime<Utc>,
    traceparent: Option<String>,
    source: Option<Arc<str>>,
    done: oneshot::Sender<Result<(), PublishError>>,
    /// Held until answered: counts against the in-flight limit.
    _permit: OwnedSemaphorePermit,
}

/// The entry point requests use.
pub struct Coalescer {
    /// The waiting events of each queue shard.
    queues: Vec<mpsc::UnboundedSender<Pending>>,
    publisher: Arc<Publisher>,
    timeout: Duration,
}

impl Coalescer {
    /// Starts the flushers; they stop when `stop` is cancelled and the queue is drained.
    pub fn start(
        publisher: Arc<Publisher>,
        settings: &CoalesceSettings,
        stop: &CancellationToken,
    ) -> Arc<Self> {
        let mut queues = Vec::new();
        for shard in 0..settings.shards.max(1) {
            let (queue, receiver) = mpsc::unbounded_channel();
            // One receiver shared by the flushers: one collects while the others await confirms.
            let shared = Arc::new(Shard {
                receiver: Mutex::new(receiver),
                in_flight: AtomicUsize::new(0),
                confirmed: Notify::new(),
            });
            for _ in 0..settings.flushers.max(1) {
                tokio::spawn(flush_loop(
                    publisher.clone(),
                    shared.clone(),
                    shard,
                    settings.max_events.max(1),
                    stop.clone(),
                ));
            }
            queues.push(queue);
        }
        Arc::new(Self {
            queues,
            publisher,
            timeout: settings.timeout,
        })
    }

    /// Publishes one event (an NDJSON line) to queue shard `shard` and waits until the broker
    /// confirmed the message carrying it.
    pub async fn publish(
        &self,
        shard: u16,
        line: Vec<u8>,
        received_at: DateTime<Utc>,
        traceparent: Option<String>,
        source: Option<Arc<str>>,
    ) -> Result<(), PublishError> {
        let permit = self.publisher.acquire()?;
        if !self.publisher.is_connected() {
            return Err(PublishError::NotConnected);
        }
        let (done, answer) = oneshot::channel();
        let pending = Pending {
            line,
            received_at,
            traceparent,
            source,
            done,
            _permit: permit,
        };
        // `shard` comes from `shard_of` over as many shards as there are queues here.
        self.queues[usize::from(shard) % self.queues.len()]
            .send(pending)
            .map_err(|_| PublishError::NotConnected)?;
        match tokio::time::timeout(self.timeout, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(PublishError::NotConnected),
            Err(_) => Err(PublishError::ConfirmTimeout(self.timeout)),
        }
    }
}

/// What the flushers of one queue shard share.
struct Shard {
    /// The shard's waiting events; the flusher holding the lock is the one that packs them.
    receiver: Mutex<mpsc::UnboundedReceiver<Pending>>,
    /// Messages of this shard awaiting their confirm.
    in_flight: AtomicUsize,
    /// Signalled whenever one of them is answered.
    confirmed: Notify,
}

async fn flush_loop(
    publisher: Arc<Publisher>,
    shard_state: Arc<Shard>,
    shard: u16,
    max_events: usize,
    stop: CancellationToken,
) {
    let mut batch: Vec<Pending> = Vec::with_capacity(max_events);
    let mut envelope = Envelope::new();
    // An event that found the last envelope full starts the next.
    let mut carried: Option<Pending> = None;
    let push = |envelope: &mut Envelope, batch: &mut Vec<Pending>, pending: Pending| {
        envelope.push_line(
            &pending.line,
            pending.received_at,
            pending.traceparent.as_deref(),
            pending.source.as_deref(),
        );
        batch.push(pending);
    };
    loop {
        {
            // The lock is held from the first event to the last taken: the flusher that
            // waits for events is the one that packs them. A carried event is in hand
            // already: it goes with whatever waits now, never waiting for the lock itself.
            let mut receiver = match carried.take() {
                Some(first) => {
                    push(&mut envelope, &mut batch, first);
                    shard_state.receiver.try_lock().ok()
                }
                None => {
                    let mut receiver = shard_state.receiver.lock().await;
                    // Waiting events first: a flusher stops only once its queue is empty.
                    let first = tokio::select! {
                        biased;
                        first = receiver.recv() => first,
                        () = stop.cancelled() => None,
                    };
                    let Some(first) = first else { return };
                    push(&mut envelope, &mut batch, first);
                    Some(receiver)
                }
            };
            if let Some(receiver) = receiver.as_mut() {
                loop {
                    // An event that does not fit is carried to the next message.
                    while carried.is_none() && envelope.events() < max_events {
                        match receiver.try_recv() {
                            Ok(next) if !envelope.has_room(next.line.len(), max_events) => {
                                carried = Some(next);
                                break;
                            }
                            Ok(next) => push(&mut envelope, &mut batch, next),
                            Err(_) => break,
                        }
                    }
                    let full = carried.is_some() || envelope.events() >= max_events;
                    if full || shard_state.in_flight.load(Ordering::Acquire) == 0 {
                        break;
                    }
                    // A message is awaiting its confirm: gather until this one is full or
                    // that confirm comes back. A confirm answered between the check above
                    // and here is not missed: `notify_one` keeps a permit for the next wait.
                    tokio::select! {
                        () = shard_state.confirmed.notified() => {}
                        () = stop.cancelled() => break,
                        next = receiver.recv() => match next {
                            Some(next) if !envelope.has_room(next.line.len(), max_events) => {
                                carried = Some(next);
                            }
                            Some(next) => push(&mut envelope, &mut batch, next),
                            None => break,
                        },
                    }
                }
            }
            // Counted before the lock is let go, so the next flusher to take it sees it.
            shard_state.in_flight.fetch_add(1, Ordering::AcqRel);
        }
        let result = publisher.publish_unbounded(&envelope, shard).await;
        shard_state.in_flight.fetch_sub(1, Ordering::AcqRel);
        shard_state.confirmed.notify_one();
        envelope.clear();
        for pending in batch.drain(..) {
            let _ = pending.done.send(result.clone());
        }
    }
}
