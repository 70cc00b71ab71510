//! Steps 1–5 of the exactly-once algorithm for one batch: decode, dead-letter, ask Redis,
//! insert into PostgreSQL, record in Redis. The caller acks (step 6) only when this succeeds,
//! so a crash between any two steps loses nothing and, thanks to the unique constraint,
//! stores nothing twice.

use std::time::Instant;

use chrono::{NaiveDate, Utc};
use dedup_event::KeySpec;
use dedup_message::message::Envelope;
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
#[cfg(feature = "test-util")]
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
pub struct Pipeline {
    pub spec: KeySpec,
    pub topology: Topology,
    pub redis: RedisTier,
    pub store: Store,
    pub metrics: Metrics,
    pub retry_max_backoff: std::time::Duration,
    /// The days whose partitions are kept, around today: RETENTION back, PARTITIONS_AHEAD on.
    pub partitions: PartitionWindow,
    /// Where a test injects crashes.
    #[cfg(feature = "test-util")]
    pub fault: Option<FaultHook>,
}

/// A point between two steps of a batch where a test may inject a crash; nothing at all
/// without the `test-util` feature.
macro_rules! checkpoint {
    ($pipeline:expr, $stage:ident, $deliveries:expr) => {
        #[cfg(feature = "test-util")]
        $pipeline.checkpoint(Stage::$stage, $deliveries)?;
    };
}

impl Pipeline {
    #[cfg(feature = "test-util")]
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
        // Bodies decompressed per their content encoding; one that cannot be read goes to the
        // dead-letter queue whole and the rest of the batch carries on.
        let mut unreadable = Vec::new();
        let bodies: Vec<_> = deliveries
            .iter()
            .filter_map(|d| match Envelope::open(&d.data, &d.properties) {
                Ok(body) => Some((body, Envelope::received_at(&d.properties))),
                Err(detail) => {
                    unreadable.push(batch::DeadLetter {
                        body: d.data.clone(),
                        reason: batch::DeadLetterReason::InvalidEncoding,
                        detail,
                    });
                    None
                }
            })
            .collect();
        let now = Utc::now();
        let mut decoded = batch::decode(
            bodies.iter().map(|(body, at)| (body.as_ref(), *at)),
            &self.spec,
            &self.partitions.days(now),
            now,
        );
        decoded.consumed += unreadable.len() as u64;
        decoded.dead_letters.extend(unreadable);
        checkpoint!(self, Decoded, deliveries);
        self.dead_letter(&decoded.dead_letters, dead_letter_channel, stop)
            .await?;

        let items: Vec<Item> = decoded.candidates.iter().map(Candidate::item).collect();
        let known = self.redis.check(&items).await;
        checkpoint!(self, AfterRedisCheck, deliveries);
        let mut fresh: Vec<&Candidate<'_>> = Vec::with_capacity(items.len());
        let mut fresh_items: Vec<Item> = Vec::with_capacity(items.len());
        let mut recent = 0u64;
        for (i, candidate) in decoded.candidates.iter().enumerate() {
            if known.as_ref().is_some_and(|k| k[i]) {
                recent += 1;
                continue;
            }
            fresh.push(candidate);
            fresh_items.push(items[i]);
        }

        let mut rows: Vec<Row<'_>> = fresh.iter().map(|c| c.row()).collect();
        let insert_started = Instant::now();
        crate::store::lock_order(&mut rows);
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
        if !refused.is_empty() {
            fresh_items.retain(|item| !refused.contains(&(item.day, item.key.as_uuid())));
        }
        let stored = inserted.stored;
        checkpoint!(self, AfterCommit, deliveries);

        self.redis.record(&fresh_items).await;
        checkpoint!(self, AfterRedisRecord, deliveries);

        let outcome = Outcome {
            consumed: decoded.consumed,
            stored,
            in_batch_duplicates: decoded.in_batch_duplicates,
            recent_key_duplicates: recent,
            postgres_duplicates: (fresh.len() - refused.len()) as u64 - stored,
            dead_lettered: (decoded.dead_letters.len() + refused.len()) as u64,
        };
        let m = &self.metrics;
        m.consumed.inc_by(outcome.consumed);
        m.stored.inc_by(outcome.stored);
        m.duplicates
            .with_label_values(&["in_batch"])
            .inc_by(outcome.in_batch_duplicates);
        m.duplicates
            .with_label_values(&["recent_keys"])
            .inc_by(outcome.recent_key_duplicates);
        m.duplicates
            .with_label_values(&["postgres"])
            .inc_by(outcome.postgres_duplicates);
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
        tracing::debug!(?outcome, "Batch processed.");
        Ok(outcome)
    }

    /// Sends the rows PostgreSQL refused to the dead-letter queue, each alone with the
    /// database's reason; returns their keys (they are neither stored nor remembered in Redis).
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
