//! The Redis tier: a cache that keeps duplicate traffic off PostgreSQL. Correctness never
//! depends on it.
//!
//! Per batch, one `MGET` asks for every key's recent-keys entry: an event whose entry exists
//! was stored within `DEDUP_WINDOW` and is dropped as a duplicate; every other event goes to
//! PostgreSQL, whose unique constraint decides. After the PostgreSQL commit one pipeline of
//! `SET … PX` records the batch's keys.
//!
//! There is no probabilistic tier: a filter that may answer "seen" for a new key could only
//! drop unique events, and one that may only answer "not seen" decides nothing PostgreSQL does
//! not already decide.
//!
//! When Redis fails, the worker carries on with PostgreSQL-only dedup, reports it in a metric
//! and a warning, and tries Redis again after a pause. Keys share one hash tag, so one batch's
//! `MGET` lives in one Redis Cluster slot.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::NaiveDate;
use dedup_event::DedupKey;
use redis::RedisError;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::metrics::Metrics;

/// Most keys in one `MGET`, so one command's reply stays small.
const KEYS_PER_MGET: usize = 1000;

/// Settings of the Redis tier.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    pub url: dedup_runtime::secret::SecretUrl,
    /// Prefix of every key; it is also the Redis Cluster hash tag.
    pub prefix: String,
    /// How long a recent key proves a duplicate (`DEDUP_WINDOW`).
    pub recent_ttl: Duration,
    /// Bound on one Redis call; past it the batch goes on without Redis.
    pub timeout: Duration,
    /// After a failure, how long to run PostgreSQL-only before trying Redis again.
    pub retry_interval: Duration,
    /// `TLS_CA_FILE`'s PEM text, for `rediss://`.
    pub ca_pem: Option<String>,
}

/// One key of a batch as the tier sees it.
#[derive(Debug, Clone, Copy)]
pub struct Item {
    pub key: DedupKey,
    pub day: NaiveDate,
}

/// The tier's connection and degraded state.
pub struct RedisTier {
    settings: RedisSettings,
    client: redis::Client,
    /// The connection, created lazily so the worker starts while Redis is down.
    connection: tokio::sync::Mutex<Option<ConnectionManager>>,
    /// While set, Redis is skipped until this instant (degraded mode).
    skip_until: Mutex<Option<Instant>>,
    metrics: Metrics,
}

impl RedisTier {
    pub fn new(settings: RedisSettings, metrics: Metrics) -> Result<Self, RedisError> {
        let url = settings.url.expose();
        // rediss:// verifies Redis against the system's roots, or against TLS_CA_FILE alone.
        let client = match &settings.ca_pem {
            Some(pem) if url.starts_with("rediss://") => redis::Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.as_bytes().to_vec()),
                },
            )?,
            _ => redis::Client::open(url)?,
        };
        Ok(Self {
            settings,
            client,
            connection: tokio::sync::Mutex::new(None),
            skip_until: Mutex::new(None),
            metrics,
        })
    }

    /// True while the tier is skipped after a failure.
    #[cfg(test)]
    pub fn is_degraded(&self) -> bool {
        self.skip_until
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// For each of `items`, whether its recent key exists (a known duplicate); `None` when
    /// Redis is unavailable (PostgreSQL decides all).
    pub async fn check(&self, items: &[Item]) -> Option<Vec<bool>> {
        if items.is_empty() {
            return Some(Vec::new());
        }
        let mut pipe = redis::pipe();
        for chunk in items.chunks(KEYS_PER_MGET) {
            let command = pipe.cmd("MGET");
            for item in chunk {
                command.arg(self.recent_key(item));
            }
        }
        let started = Instant::now();
        let answer: Option<Vec<Vec<Option<redis::Value>>>> = self
            .call("check", |mut conn| async move {
                pipe.query_async(&mut conn).await
            })
            .await;
        self.metrics
            .redis_seconds
            .with_label_values(&["check"])
            .observe(started.elapsed().as_secs_f64());
        let known: Vec<bool> = answer?
            .into_iter()
            .flatten()
            .map(|value| value.is_some())
            .collect();
        if known.len() != items.len() {
            tracing::warn!(
                expected = items.len(),
                got = known.len(),
                "Redis check answered the wrong number of keys; ignoring it."
            );
            return None;
        }
        Some(known)
    }

    /// Records `items` as stored. Failure only costs cache hits later, so it is not an error.
    pub async fn record(&self, items: &[Item]) {
        if items.is_empty() {
            return;
        }
        // Plain commands in one pipeline (one round trip): any subset of these writes is a
        // correct cache, so nothing needs a transaction or a script.
        let mut pipe = redis::pipe();
        let recent_ttl = millis(self.settings.recent_ttl);
        for item in items {
            pipe.cmd("SET")
                .arg(self.recent_key(item))
                .arg(1)
                .arg("PX")
                .arg(recent_ttl)
                .ignore();
        }
        let started = Instant::now();
        let _: Option<()> = self
            .call("record", |mut conn| async move {
                pipe.query_async(&mut conn).await
            })
            .await;
        self.metrics
            .redis_seconds
            .with_label_values(&["record"])
            .observe(started.elapsed().as_secs_f64());
    }

    /// Runs one Redis call with the timeout and the degraded-mode bookkeeping.
    async fn call<T, F, Fut>(&self, op: &'static str, f: F) -> Option<T>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        if let Some(until) = *self.skip_until.lock().unwrap_or_else(|e| e.into_inner())
            && Instant::now() < until
        {
            return None;
        }
        let conn = match self.connection().await {
            Ok(conn) => conn,
            Err(e) => {
                self.degrade(op, &e.to_string());
                return None;
            }
        };
        match tokio::time::timeout(self.settings.timeout, f(conn)).await {
            Ok(Ok(value)) => {
                self.recover();
                Some(value)
            }
            Ok(Err(e)) => {
                self.forget_connection().await;
                self.degrade(op, &e.to_string());
                None
            }
            Err(_) => {
                self.forget_connection().await;
                self.degrade(op, &format!("no answer within {:?}", self.settings.timeout));
                None
            }
        }
    }

    /// Drops the connection after a failure: one that hangs without a reset would otherwise
    /// be used again (and time out again) after Redis is back; the next call connects anew.
    async fn forget_connection(&self) {
        self.connection.lock().await.take();
    }

    async fn connection(&self) -> Result<ConnectionManager, RedisError> {
        let mut slot = self.connection.lock().await;
        if let Some(conn) = slot.as_ref() {
            return Ok(conn.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.settings.timeout))
            .set_response_timeout(Some(self.settings.timeout))
            .set_number_of_retries(1)
            .set_max_delay(self.settings.retry_interval);
        let conn = tokio::time::timeout(
            self.settings.timeout * 2,
            ConnectionManager::new_with_config(self.client.clone(), config),
        )
        .await
        .map_err(|_| RedisError::from((redis::ErrorKind::Io, "connecting to Redis timed out")))??;
        *slot = Some(conn.clone());
        Ok(conn)
    }

    fn degrade(&self, op: &str, error: &str) {
        let mut skip = self.skip_until.lock().unwrap_or_else(|e| e.into_inner());
        if skip.is_none() {
            tracing::warn!(op, error, retry_in = ?self.settings.retry_interval,
                "Redis unavailable; deduplicating through PostgreSQL alone until it returns.");
        }
        *skip = Some(Instant::now() + self.settings.retry_interval);
        self.metrics.redis_degraded.set(1);
        self.metrics
            .batch_errors
            .with_label_values(&["redis"])
            .inc();
    }

    fn recover(&self) {
        let mut skip = self.skip_until.lock().unwrap_or_else(|e| e.into_inner());
        if skip.take().is_some() {
            tracing::info!("Redis is back; the cache tier is on again.");
            self.metrics.redis_degraded.set(0);
        }
    }

    fn recent_key(&self, item: &Item) -> String {
        format!(
            "{{{}}}:k:{}:{}",
            self.settings.prefix,
            item.day.format("%Y%m%d"),
            item.key
        )
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}
