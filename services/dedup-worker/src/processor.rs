//! Steps 1–5 of the exactly-once algorithm for one batch: decode, dead-letter, ask Redis,
//! insert into PostgreSQL, record in Redis. The caller acks (step 6) only when this succeeds,
//! so a crash between any two steps loses nothing and, thanks to the unique constraint,
//! stores nothing twice.

use std::borrow::Cow;
use std::time::Instant;

use chrono::{DateTime, NaiveDate, Utc};
use dedup_event::KeySpec;
use dedup_message::message::{Envelope, Sources};
use dedup_message::topology::Topology;
use dedup_message::trace_context;
use dedup_runtime::backoff::Backoff;
use lapin::Channel;
use lapin::message::Delivery;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use uuid::Uuid;

use crate::batch::{self, Candidate};
use crate::error::Result;
#[cfg(test)]
use crate::fault::{FaultHook, Stage};
use crate::metrics::Metrics;
use crate::redis_tier::{Item, RedisTier};
use crate::store::{Row, Store};

/// What one batch came to.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub consumed: u64,
    pub stored: u64,
    pub in_batch_duplicates: u64,
    pub recent_key_duplicates: u64,
    pub postgres_duplicates: u64,
    pub dead_lettered: u64,
}

/// Which days' partitions the worker keeps, relative to today.
#[derive(Debug, Clone, Copy)]
pub struct PartitionWindow {
    pub retention: std::time::Duration,
    pub ahead_days: u32,
}

impl PartitionWindow {
    /// The kept days around `now`: the first is the oldest the retention keeps.
    pub fn days(&self, now: chrono::DateTime<Utc>) -> std::ops::RangeInclusive<NaiveDate> {
        let today = now.date_naive();
        let back = i64::try_from(self.retention.as_secs() / 86_400).unwrap_or(i64::MAX);
        let first = today
            .checked_sub_signed(chrono::Duration::days(back))
            .unwrap_or(NaiveDate::MIN);
        let last = today
            .checked_add_signed(chrono::Duration::days(i64::from(self.ahead_days)))
            .unwrap_or(NaiveDate::MAX);
        first..=last
    }
}

/// Everything a batch needs, shared by the consumer sessions of one worker.
pub struct Processor {
    pub spec: KeySpec,
    pub topology: Topology,
    pub redis: RedisTier,
    pub store: Store,
    pub metrics: Metrics,
    pub retry_max_backoff: std::time::Duration,
    /// The days whose partitions are kept, around today: RETENTION back, PARTITIONS_AHEAD on.
    pub partitions: PartitionWindow,
    /// Where a test injects crashes.
    #[cfg(test)]
    pub fault: Option<FaultHook>,
}

/// A point between two steps of a batch where a test may inject a crash; nothing at all
/// outside tests.
macro_rules! checkpoint {
    ($processor:expr, $stage:ident, $deliveries:expr) => {
        #[cfg(test)]
        $processor.checkpoint(Stage::$stage, $deliveries)?;
    };
}

impl Processor {
    #[cfg(test)]
    fn checkpoint(&self, stage: Stage, deliveries: &[Delivery]) -> Result<()> {
        let first_tag = deliveries
            .first()
            .map(|d| d.delivery_tag)
            .unwrap_or_default();
        match &self.fault {
            Some(hook) if hook(stage, first_tag) => Err(crate::error::Error::InjectedCrash(stage)),
            _ => Ok(()),
        }
    }

    /// Processes `deliveries` up to, not including, the ack. PostgreSQL and dead-letter
    /// failures are retried in place (the deliveries stay unacked meanwhile) until they succeed
    /// or `stop` is cancelled.
    pub async fn process(
        &self,
        deliveries: &[Delivery],
        dead_letter_channel: &Channel,
        stop: &CancellationToken,
    ) -> Result<Outcome> {
        let span = tracing::info_span!(
            "batch",
            messages = deliveries.len(),
            stored = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        );
        // The batch links every request whose events it carries (W3C context from the headers).
        for delivery in deliveries {
            for context in trace_context::extract(&delivery.properties) {
                span.add_link(context);
            }
        }
        if let Some(id) = trace_context::trace_id(&span) {
            span.record("trace_id", id);
        }
        let outcome = self
            .process_in_span(deliveries, dead_letter_channel, stop)
            .instrument(span.clone())
            .await;
        if let Ok(outcome) = &outcome {
            span.record("stored", outcome.stored);
        }
        outcome
    }

    async fn process_in_span(
        &self,
        deliveries: &[Delivery],
        dead_letter_channel: &Channel,
        stop: &CancellationToken,
    ) -> Result<Outcome> {
        let started = Instant::now();
        // Step 1: decode and validate; what cannot be accepted is dead-lettered now.
        let Bodies {
            readable,
            unreadable,
        } = Bodies::open(deliveries);
        let decoded = self.decode(&readable, unreadable);
        checkpoint!(self, Decoded, deliveries);
        self.dead_letter(&decoded.dead_letters, dead_letter_channel, stop)
            .await?;

        // Steps 2-3: drop what Redis remembers.
        let items: Vec<Item> = decoded.candidates.iter().map(Candidate::item).collect();
        let known = self.redis.check(&items).await;
        checkpoint!(self, AfterRedisCheck, deliveries);
        let (fresh, mut fresh_items) = unknown(&decoded.candidates, &items, known.as_deref());

        // Step 4: PostgreSQL decides the rest.
        let mut rows: Vec<Row<'_>> = fresh.iter().map(|c| c.row()).collect();
        crate::store::lock_order(&mut rows);
        let insert_started = Instant::now();
        let inserted = self
            .retrying(stop, || self.store.insert_isolating(&rows))
            .await?;
        let committed = Utc::now();
        self.metrics
            .postgres_seconds
            .with_label_values(&["insert"])
            .observe(insert_started.elapsed().as_secs_f64());
        let refused = self
            .dead_letter_refused(&rows, &inserted, dead_letter_channel, stop)
            .await?;
        fresh_items.retain(|item| !refused.contains(&(item.day, item.key.as_uuid())));
        checkpoint!(self, AfterCommit, deliveries);

        // Step 5: remember what PostgreSQL now holds.
        self.redis.record(&fresh_items).await;
        checkpoint!(self, AfterRedisRecord, deliveries);

        let outcome = Outcome {
            consumed: decoded.consumed,
            stored: inserted.stored,
            in_batch_duplicates: decoded.in_batch_duplicates,
            recent_key_duplicates: (items.len() - fresh.len()) as u64,
            postgres_duplicates: (fresh.len() - refused.len()) as u64 - inserted.stored,
            dead_lettered: (decoded.dead_letters.len() + refused.len()) as u64,
        };
        self.count(&outcome, deliveries, started, committed);
        tracing::debug!(?outcome, "Batch processed.");
        Ok(outcome)
    }

    /// Decodes and validates every readable body; unreadable ones join the dead letters.
    fn decode<'b>(
        &self,
        readable: &'b [Body<'_>],
        unreadable: Vec<batch::DeadLetter>,
    ) -> batch::Decoded<'b> {
        let now = Utc::now();
        let mut decoded = batch::decode(
            readable
                .iter()
                .map(|(body, at, sources)| (body.as_ref(), *at, sources)),
            &self.spec,
            &self.partitions.days(now),
            now,
        );
        decoded.consumed += unreadable.len() as u64;
        decoded.dead_letters.extend(unreadable);
        decoded
    }

    /// Counts a processed batch in the metrics.
    fn count(
        &self,
        outcome: &Outcome,
        deliveries: &[Delivery],
        started: Instant,
        committed: DateTime<Utc>,
    ) {
        let m = &self.metrics;
        m.consumed.inc_by(outcome.consumed);
        m.stored.inc_by(outcome.stored);
        for (tier, n) in [
            ("in_batch", outcome.in_batch_duplicates),
            ("recent_keys", outcome.recent_key_duplicates),
            ("postgres", outcome.postgres_duplicates),
        ] {
            m.duplicates.with_label_values(&[tier]).inc_by(n);
        }
        m.batch_size.observe(outcome.consumed as f64);
        m.batch_seconds.observe(started.elapsed().as_secs_f64());
        for delivery in deliveries {
            if let Some(received) = Envelope::received_at(&delivery.properties) {
                let lag = (committed - received)
                    .num_microseconds()
                    .unwrap_or_default()
                    .max(0);
                m.end_to_end_lag_seconds.observe(lag as f64 / 1e6);
            }
        }
    }

    async fn dead_letter_refused(
        &self,
        rows: &[Row<'_>],
        inserted: &crate::store::Inserted,
        channel: &Channel,
        stop: &CancellationToken,
    ) -> Result<Vec<(NaiveDate, Uuid)>> {
        let letters: Vec<batch::DeadLetter> = inserted
            .refused
            .iter()
            .map(|(i, reason)| batch::DeadLetter {
                body: rows[*i].payload.as_bytes().to_vec(),
                reason: batch::DeadLetterReason::RefusedByPostgres,
                detail: reason.clone(),
            })
            .collect();
        self.dead_letter(&letters, channel, stop).await?;
        Ok(inserted
            .refused
            .iter()
            .map(|(i, _)| (rows[*i].event_date, rows[*i].dedup_key))
            .collect())
    }

    /// Publishes `letters` to the dead-letter queue (retried until confirmed), then logs and
    /// counts them.
    async fn dead_letter(
        &self,
        letters: &[batch::DeadLetter],
        channel: &Channel,
        stop: &CancellationToken,
    ) -> Result<()> {
        if letters.is_empty() {
            return Ok(());
        }
        self.retrying(stop, || {
            crate::dead_letter::publish(channel, &self.topology, letters)
        })
        .await?;
        for letter in letters {
            tracing::warn!(reason = letter.reason.label(), detail = %letter.detail, "Event dead-lettered.");
            self.metrics
                .dead_lettered
                .with_label_values(&[letter.reason.label()])
                .inc();
        }
        Ok(())
    }

    /// Runs `op` until it succeeds, retrying retryable errors with backoff; gives up with the
    /// last error when `stop` is cancelled or the error is not retryable.
    async fn retrying<T, F, Fut>(&self, stop: &CancellationToken, mut op: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let mut backoff = Backoff::new(self.retry_max_backoff);
        loop {
            match op().await {
                Ok(value) => return Ok(value),
                Err(e) if e.is_retryable() && !stop.is_cancelled() => {
                    self.metrics
                        .batch_errors
                        .with_label_values(&[e.stage()])
                        .inc();
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = ?delay, "Batch step failed; retrying with the deliveries unacked.");
                    tokio::select! {
                        () = stop.cancelled() => return Err(e),
                        () = tokio::time::sleep(delay) => {}
                    }
                }
                Err(e) => {
                    self.metrics
                        .batch_errors
                        .with_label_values(&[e.stage()])
                        .inc();
                    return Err(e);
                }
            }
        }
    }
}

/// A readable message body with the time ingest received its events and their sources.
type Body<'a> = (Cow<'a, [u8]>, Option<DateTime<Utc>>, Sources);

/// A batch's message bodies, decompressed per their content encoding; one that cannot be read
/// goes to the dead-letter queue whole and the rest of the batch carries on.
struct Bodies<'a> {
    readable: Vec<Body<'a>>,
    unreadable: Vec<batch::DeadLetter>,
}

impl<'a> Bodies<'a> {
    fn open(deliveries: &'a [Delivery]) -> Self {
        let mut bodies = Self {
            readable: Vec::with_capacity(deliveries.len()),
            unreadable: Vec::new(),
        };
        for d in deliveries {
            match Envelope::open(&d.data, &d.properties) {
                Ok(body) => bodies.readable.push((
                    body,
                    Envelope::received_at(&d.properties),
                    Sources::read(&d.properties),
                )),
                Err(detail) => bodies.unreadable.push(batch::DeadLetter {
                    body: d.data.clone(),
                    reason: batch::DeadLetterReason::InvalidEncoding,
                    detail,
                }),
            }
        }
        bodies
    }
}

/// The candidates Redis does not know (all of them when Redis did not answer), with their
/// items.
fn unknown<'c, 'a>(
    candidates: &'c [Candidate<'a>],
    items: &[Item],
    known: Option<&[bool]>,
) -> (Vec<&'c Candidate<'a>>, Vec<Item>) {
    let mut fresh = Vec::with_capacity(items.len());
    let mut fresh_items = Vec::with_capacity(items.len());
    for (i, candidate) in candidates.iter().enumerate() {
        if !known.is_some_and(|k| k[i]) {
            fresh.push(candidate);
            fresh_items.push(items[i]);
        }
    }
    (fresh, fresh_items)
}
