//! The Redis tier: a cache that keeps duplicate traffic off PostgreSQL. Correctness never
//! depends on it.
//!
//! Per batch, one script call asks, for every key, the exact recent-keys entry and, for keys
//! without one, the Bloom generations. An event counts as a known duplicate only when its
//! recent key exists; a Bloom hit alone is never trusted, because a false positive would drop
//! a unique event. After the PostgreSQL commit one pipeline of plain commands (no script:
//! nothing there needs atomicity) records the batch's keys: Bloom bits in the current
//! generation and a recent key with a TTL.
//!
//! When Redis fails, the worker carries on with PostgreSQL-only dedup, reports it in a metric
//! and a warning, and tries Redis again after a pause. Keys share one hash tag so a script's
//! keys live in one Redis Cluster slot.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chrono::NaiveDate;
use dedup_core::DedupKey;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Script};

use crate::bloom::BloomParams;
use crate::metrics::Metrics;

/// Answer of the check script for one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Known {
    /// Every generation has a zero bit: never seen in the window.
    BloomMiss,
    /// The Bloom filter says "maybe" but no recent key confirms it: PostgreSQL decides.
    BloomHitUnconfirmed,
    /// The recent key exists: a duplicate, not written again.
    Recent,
}

/// KEYS: the generations (newest first), then one recent key per item.
/// ARGV: generation count, hashes per item, item count, then the bit positions of every item.
/// Returns per item 0 (Bloom miss), 1 (Bloom hit, no recent key) or 2 (recent key present).
///
/// The recent key is asked first: when it exists the answer is known and the Bloom filter is
/// not consulted. The others are asked of the filter generation by generation, one hash
/// position at a time, each round one BITFIELD over every item still in the running (a few
/// calls per batch instead of one GETBIT per bit per item: Redis' CPU per event fell several
/// times over).
const CHECK: &str = r"
local g, k, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local out, pending, np = {}, {}, 0
for first = 1, n, 1000 do
  local last = math.min(first + 999, n)
  local recent = redis.call('MGET', unpack(KEYS, g + first, g + last))
  for i = first, last do
    if recent[i - first + 1] then
      out[i] = 2
    else
      out[i] = 0
      np = np + 1
      pending[np] = i
    end
  end
end
for j = 1, g do
  local cand, nc = {}, 0
  for x = 1, np do
    local i = pending[x]
    if out[i] == 0 then nc = nc + 1 cand[nc] = i end
  end
  for h = 1, k do
    if nc == 0 then break end
    local survivors, ns = {}, 0
    for first = 1, nc, 1000 do
      local last = math.min(first + 999, nc)
      local ops, m = {}, 0
      for x = first, last do
        ops[m + 1] = 'GET'
        ops[m + 2] = 'u1'
        ops[m + 3] = ARGV[3 + (cand[x] - 1) * k + h]
        m = m + 3
      end
      local bits = redis.call('BITFIELD', KEYS[j], unpack(ops))
      for x = first, last do
        if bits[x - first + 1] == 1 then ns = ns + 1 survivors[ns] = cand[x] end
      end
    end
    cand, nc = survivors, ns
  end
  for x = 1, nc do out[cand[x]] = 1 end
end
return out
";

/// Most bit operations in one BITFIELD command of the record pipeline.
const RECORD_BITS_PER_COMMAND: usize = 1000;

/// Settings of the Redis tier.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    pub url: String,
    /// Prefix of every key; it is also the Redis Cluster hash tag.
    pub prefix: String,
    pub bloom: BloomParams,
    /// How long a recent key proves a duplicate.
    pub recent_ttl: Duration,
    /// Bound on one Redis call; past it the batch goes on without Redis.
    pub timeout: Duration,
    /// After a failure, how long to run PostgreSQL-only before trying Redis again.
    pub retry_interval: Duration,
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
    check: Script,
    /// The connection, created lazily so the worker starts while Redis is down.
    connection: tokio::sync::Mutex<Option<ConnectionManager>>,
    /// While set, Redis is skipped until this instant (degraded mode).
    skip_until: Mutex<Option<Instant>>,
    metrics: Metrics,
}

impl RedisTier {
    pub fn new(settings: RedisSettings, metrics: Metrics) -> Result<Self, RedisError> {
        let client = redis::Client::open(settings.url.as_str())?;
        Ok(Self {
            settings,
            client,
            check: Script::new(CHECK),
            connection: tokio::sync::Mutex::new(None),
            skip_until: Mutex::new(None),
            metrics,
        })
    }

    /// True while the tier is skipped after a failure.
    pub fn is_degraded(&self) -> bool {
        self.skip_until
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Which of `items` Redis knows; `None` when Redis is unavailable (PostgreSQL decides all).
    pub async fn check(&self, items: &[Item]) -> Option<Vec<Known>> {
        if items.is_empty() {
            return Some(Vec::new());
        }
        let now = unix_now();
        let newest = self.settings.bloom.generation(now);
        let generations = u64::from(self.settings.bloom.generations);
        let bloom = &self.settings.bloom;
        let mut invocation = self.check.prepare_invoke();
        for g in 0..generations {
            invocation.key(self.generation_key(newest.saturating_sub(g)));
        }
        for item in items {
            invocation.key(self.recent_key(item));
        }
        invocation
            .arg(generations)
            .arg(bloom.hashes)
            .arg(items.len());
        let mut positions = Vec::with_capacity(items.len() * bloom.hashes as usize);
        for item in items {
            bloom.positions(&item.key, item.day, &mut positions);
        }
        invocation.arg(positions);
        let started = Instant::now();
        let answer: Option<Vec<u8>> = self
            .call("check", |mut conn| async move {
                invocation.invoke_async::<Vec<u8>>(&mut conn).await
            })
            .await;
        self.metrics
            .redis_seconds
            .with_label_values(&["check"])
            .observe(started.elapsed().as_secs_f64());
        let answer = answer?;
        if answer.len() != items.len() {
            tracing::warn!(
                expected = items.len(),
                got = answer.len(),
                "Redis check answered the wrong number of keys; ignoring it."
            );
            return None;
        }
        Some(
            answer
                .into_iter()
                .map(|a| match a {
                    0 => Known::BloomMiss,
                    2 => Known::Recent,
                    _ => Known::BloomHitUnconfirmed,
                })
                .collect(),
        )
    }

    /// Records `items` as stored. Failure only costs cache hits later, so it is not an error.
    pub async fn record(&self, items: &[Item]) {
        if items.is_empty() {
            return;
        }
        let bloom = &self.settings.bloom;
        let generation = self.generation_key(bloom.generation(unix_now()));
        let mut positions = Vec::with_capacity(items.len() * bloom.hashes as usize);
        for item in items {
            bloom.positions(&item.key, item.day, &mut positions);
        }
        // Plain commands in one pipeline (one round trip): nothing here needs a script's
        // atomicity — any subset of these writes is a correct cache — and Redis runs them
        // natively instead of through Lua, which cost more than the writes themselves.
        let mut pipe = redis::pipe();
        for chunk in positions.chunks(RECORD_BITS_PER_COMMAND) {
            let command = pipe.cmd("BITFIELD").arg(&generation);
            for position in chunk {
                command.arg("SET").arg("u1").arg(*position).arg(1);
            }
            command.ignore();
        }
        let recent_ttl = millis(self.settings.recent_ttl);
        for item in items {
            pipe.cmd("SET")
                .arg(self.recent_key(item))
                .arg(1)
                .arg("PX")
                .arg(recent_ttl)
                .ignore();
        }
        // The generation expires once, at the end of its time (NX: only when it has no TTL).
        pipe.cmd("PEXPIRE")
            .arg(&generation)
            .arg(millis(bloom.generation_ttl()))
            .arg("NX")
            .ignore();
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

    fn generation_key(&self, generation: u64) -> String {
        format!("{{{}}}:bloom:{generation}", self.settings.prefix)
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

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}
