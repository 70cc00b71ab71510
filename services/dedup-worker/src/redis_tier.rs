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
//! and a warning, and tries Redis again after a pause.
//!
//! Keys carry a hash tag: the prefix alone (`REDIS_KEY_BUCKETS=1`, one slot), or the prefix and
//! one of N buckets picked by the key (`{prefix:7}`), which spreads them over a Redis Cluster's
//! slots and nodes. A batch's keys are grouped by bucket: against one server every group goes
//! in one pipeline (one round trip); against a cluster (`REDIS_CLUSTER`), where a pipeline
//! must stay in one slot, each group is its own pipeline, all sent at once.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::NaiveDate;
use dedup_event::DedupKey;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{FromRedisValue, Pipeline, RedisError};

use crate::metrics::Metrics;

/// Most keys in one `MGET`, so one command's reply stays small.
const KEYS_PER_MGET: usize = 1000;

/// Settings of the Redis tier.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    pub url: dedup_runtime::secret::SecretUrl,
    /// Prefix of every key; with `key_buckets` the Redis Cluster hash tag.
    pub prefix: String,
    /// Hash tags the keys are spread over (1: the prefix alone, one slot).
    pub key_buckets: u32,
    /// `url` is one node of a Redis Cluster (the others are discovered).
    pub cluster: bool,
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

/// A client of one Redis server or of a Redis Cluster.
#[allow(
    clippy::large_enum_variant,
    reason = "one per worker, made once at start"
)]
enum Client {
    Single(redis::Client),
    Cluster(ClusterClient),
}

/// A connection to one Redis server or to a Redis Cluster; clones share it.
#[derive(Clone)]
enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Connection {
    /// Runs `pipes` (each within one slot) and returns their answers in order: as one
    /// pipeline against one server, as concurrent pipelines against a cluster.
    async fn query<T: FromRedisValue>(self, pipes: Vec<Pipeline>) -> Result<Vec<T>, RedisError> {
        match self {
            Connection::Single(mut conn) => {
                let mut pipes = pipes.into_iter();
                let Some(mut all) = pipes.next() else {
                    return Ok(Vec::new());
                };
                // One round trip: the other groups' commands join the first pipeline.
                for pipe in pipes {
                    for cmd in pipe.cmd_iter() {
                        all.add_command(cmd.clone());
                    }
                }
                all.query_async(&mut conn).await
            }
            Connection::Cluster(conn) => {
                let answers = futures::future::try_join_all(pipes.into_iter().map(|pipe| {
                    let mut conn = conn.clone();
                    async move { pipe.query_async::<Vec<T>>(&mut conn).await }
                }))
                .await?;
                Ok(answers.into_iter().flatten().collect())
            }
        }
    }
}

/// The tier's connection and degraded state.
pub struct RedisTier {
    settings: RedisSettings,
    client: Client,
    /// The connection, created lazily so the worker starts while Redis is down.
    connection: tokio::sync::Mutex<Option<Connection>>,
    /// While set, Redis is skipped until this instant (degraded mode).
    skip_until: Mutex<Option<Instant>>,
    metrics: Metrics,
}

impl RedisTier {
    pub fn new(settings: RedisSettings, metrics: Metrics) -> Result<Self, RedisError> {
        let url = settings.url.expose();
        // rediss:// verifies Redis against the system's roots, or against TLS_CA_FILE alone.
        let certificates = |pem: &String| redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pem.as_bytes().to_vec()),
        };
        let tls_ca = settings
            .ca_pem
            .as_ref()
            .filter(|_| url.starts_with("rediss://"));
        let client = if settings.cluster {
            let mut builder = ClusterClient::builder([url])
                .connection_timeout(settings.timeout)
                .response_timeout(settings.timeout)
                .retries(1);
            if let Some(pem) = tls_ca {
                builder = builder.certs(certificates(pem));
            }
            Client::Cluster(builder.build()?)
        } else {
            Client::Single(match tls_ca {
                Some(pem) => redis::Client::build_with_tls(url, certificates(pem))?,
                None => redis::Client::open(url)?,
            })
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
        let groups = self.by_bucket(items);
        let pipes = groups
            .iter()
            .map(|group| {
                let mut pipe = redis::pipe();
                for chunk in group.chunks(KEYS_PER_MGET) {
                    let command = pipe.cmd("MGET");
                    for &i in chunk {
                        command.arg(self.recent_key(&items[i]));
                    }
                }
                pipe
            })
            .collect();
        let started = Instant::now();
        let answer: Option<Vec<Vec<Option<redis::Value>>>> =
            self.call("check", |conn| conn.query(pipes)).await;
        self.metrics
            .redis_seconds
            .with_label_values(&["check"])
            .observe(started.elapsed().as_secs_f64());
        // Answers come group by group; put each back at its item's place.
        let answers: Vec<bool> = answer?
            .into_iter()
            .flatten()
            .map(|value| value.is_some())
            .collect();
        if answers.len() != items.len() {
            tracing::warn!(
                expected = items.len(),
                got = answers.len(),
                "Redis check answered the wrong number of keys; ignoring it."
            );
            return None;
        }
        let mut known = vec![false; items.len()];
        for (&i, answer) in groups.iter().flatten().zip(answers) {
            known[i] = answer;
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
        let recent_ttl = millis(self.settings.recent_ttl);
        let pipes = self
            .by_bucket(items)
            .into_iter()
            .map(|group| {
                let mut pipe = redis::pipe();
                for i in group {
                    pipe.cmd("SET")
                        .arg(self.recent_key(&items[i]))
                        .arg(1)
                        .arg("PX")
                        .arg(recent_ttl)
                        .ignore();
                }
                pipe
            })
            .collect();
        let started = Instant::now();
        let _: Option<Vec<()>> = self.call("record", |conn| conn.query(pipes)).await;
        self.metrics
            .redis_seconds
            .with_label_values(&["record"])
            .observe(started.elapsed().as_secs_f64());
    }

    /// Runs one Redis call with the timeout and the degraded-mode bookkeeping.
    async fn call<T, F, Fut>(&self, op: &'static str, f: F) -> Option<T>
    where
        F: FnOnce(Connection) -> Fut,
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

    async fn connection(&self) -> Result<Connection, RedisError> {
        let mut slot = self.connection.lock().await;
        if let Some(conn) = slot.as_ref() {
            return Ok(conn.clone());
        }
        let connect = async {
            match &self.client {
                Client::Single(client) => {
                    let config = ConnectionManagerConfig::new()
                        .set_connection_timeout(Some(self.settings.timeout))
                        .set_response_timeout(Some(self.settings.timeout))
                        .set_number_of_retries(1)
                        .set_max_delay(self.settings.retry_interval);
                    ConnectionManager::new_with_config(client.clone(), config)
                        .await
                        .map(Connection::Single)
                }
                Client::Cluster(client) => {
                    client.get_async_connection().await.map(Connection::Cluster)
                }
            }
        };
        let conn = tokio::time::timeout(self.settings.timeout * 2, connect)
            .await
            .map_err(|_| {
                RedisError::from((redis::ErrorKind::Io, "connecting to Redis timed out"))
            })??;
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

    /// The items' indices grouped by bucket (one group when there is one bucket), each group
    /// in the items' order.
    fn by_bucket(&self, items: &[Item]) -> Vec<Vec<usize>> {
        let buckets = self.settings.key_buckets.max(1) as usize;
        let mut groups = vec![Vec::new(); buckets];
        for (i, item) in items.iter().enumerate() {
            groups[self.bucket(item) as usize].push(i);
        }
        groups.retain(|g| !g.is_empty());
        groups
    }

    /// The key's bucket: from its own bytes (a hash already), so every worker agrees.
    fn bucket(&self, item: &Item) -> u32 {
        let head = u64::from_le_bytes(item.key.0[..8].try_into().unwrap_or_default());
        (head % u64::from(self.settings.key_buckets.max(1))) as u32
    }

    fn recent_key(&self, item: &Item) -> String {
        let (prefix, day, key) = (&self.settings.prefix, item.day.format("%Y%m%d"), item.key);
        if self.settings.key_buckets <= 1 {
            format!("{{{prefix}}}:k:{day}:{key}")
        } else {
            format!("{{{prefix}:{}}}:k:{day}:{key}", self.bucket(item))
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}
