//! PostgreSQL, the authority on duplicates: one multi-row `INSERT … ON CONFLICT DO NOTHING`
//! per batch against the `(event_date, dedup_key)` unique constraint. The rows that come back
//! inserted are the unique events; the rest were duplicates. There is no check-then-insert.

use std::collections::HashSet;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::PgPool;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use uuid::Uuid;

use crate::error::{Error, Result};

/// The migrations in `migrations/`, embedded in the binary.
pub static MIGRATOR: Migrator = sqlx::migrate!("../../migrations");

/// One row to insert.
#[derive(Debug, Clone)]
pub struct Row<'a> {
    pub event_date: NaiveDate,
    pub dedup_key: Uuid,
    pub event_datetime: DateTime<Utc>,
    pub client_id: Option<&'a str>,
    pub event_name: &'a str,
    pub product_id: &'a str,
    pub sid: &'a str,
    pub r: &'a str,
    /// The event's JSON text, as received.
    pub payload: &'a str,
    pub received_at: DateTime<Utc>,
    /// The write key's source, if the event came with one.
    pub source: Option<&'a str>,
}

const INSERT: &str = "
WITH inserted AS (
    INSERT INTO product_events
        (event_date, dedup_key, event_datetime, client_id, event_name, product_id, sid, r, payload, received_at, source)
    SELECT d, k, dt, c, en, p, s, r, pl::jsonb, ra, src
    FROM UNNEST($1::date[], $2::uuid[], $3::timestamptz[], $4::text[], $5::text[], $6::text[],
                $7::text[], $8::text[], $9::text[], $10::timestamptz[], $11::text[])
        AS t(d, k, dt, c, en, p, s, r, pl, ra, src)
    ON CONFLICT (event_date, dedup_key) DO NOTHING
    RETURNING 1
)
SELECT count(*) FROM inserted";

/// What [`Store::insert_isolating`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Inserted {
    /// Rows that were new.
    pub stored: u64,
    /// Each row PostgreSQL refused for its data: its index in the input and the reason.
    pub refused: Vec<(usize, String)>,
}

/// Whether PostgreSQL refused the statement for the data in it, so that the same rows would
/// be refused again: data exceptions (class 22: bad text, numbers out of range, …),
/// integrity violations (class 23: a row no partition takes, …) and program limits (class 54:
/// a value too large to index, …). Anything else — connections, timeouts, locks, a server
/// shutting down — may pass on a retry.
pub fn is_data_error(error: &sqlx::Error) -> bool {
    let Some(db) = error.as_database_error() else {
        return false;
    };
    db.code()
        .is_some_and(|code| matches!(code.get(..2), Some("22" | "23" | "54")))
}

/// Sorts rows by `(event_date, dedup_key)`: concurrent workers then take the unique index's
/// locks in the same order and cannot deadlock on overlapping batches.
pub fn lock_order(rows: &mut [Row<'_>]) {
    rows.sort_unstable_by_key(|r| (r.event_date, r.dedup_key));
}

/// The event store.
pub struct Store {
    /// Bounded pool: its size caps concurrent statements, its acquire timeout turns a stuck
    /// database into a retryable batch error instead of a hang.
    pool: PgPool,
    /// Days whose partition is known to exist, so the common batch needs no extra round trip.
    partitions: Mutex<HashSet<NaiveDate>>,
    /// Client-side bound on one statement: the server's statement_timeout plus a margin. A
    /// connection that hangs without a reset never answers, so the server's own timeout
    /// cannot end the wait; this does, and the batch is retried on a new connection.
    deadline: Duration,
}

/// How long past the server's statement_timeout the client waits before giving up on a
/// statement whose connection went silent.
const STATEMENT_DEADLINE_MARGIN: Duration = Duration::from_secs(2);

impl Store {
    /// Connects lazily: the pool opens connections on first use, so the worker starts (and
    /// retries) while PostgreSQL is down.
    /// With `sslmode=verify-full` (or `verify-ca`, `require`) in the URL the connection is
    /// TLS; `ca_file` (`TLS_CA_FILE`) is the root it is verified against unless the URL names
    /// one (`sslrootcert`).
    pub fn connect_lazy(
        url: &str,
        pool_size: u32,
        statement_timeout: Duration,
        ca_file: Option<&std::path::Path>,
    ) -> Result<Self> {
        let mut options = PgConnectOptions::from_str(url).map_err(|e| {
            Error::Config(format!("DATABASE_URL is not a valid PostgreSQL URL: {e}"))
        })?;
        if let Some(ca_file) = ca_file
            && !url.contains("sslrootcert=")
        {
            options = options.ssl_root_cert(ca_file);
        }
        let pool = PgPoolOptions::new()
            .max_connections(pool_size.max(1))
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy_with(options.application_name("dedup-worker").options([(
                "statement_timeout",
                format!("{}ms", statement_timeout.as_millis().max(1)),
            )]));
        Ok(Self {
            pool,
            partitions: Mutex::new(HashSet::new()),
            deadline: statement_timeout + STATEMENT_DEADLINE_MARGIN,
        })
    }

    /// Applies pending migrations.
    pub async fn migrate(&self) -> Result<()> {
        MIGRATOR
            .run(&self.pool)
            .await
            .map_err(|e| Error::Migrate(e.to_string()))
    }

    /// Inserts `rows` like [`Store::insert`], and isolates the rows PostgreSQL refuses for
    /// their data: a refused statement is split in halves, each inserted on its own, until a
    /// refused row stands alone. Returns how many rows were new and the index and reason of
    /// each refused row; every other row is stored (exactly once) when this returns. Any
    /// other failure (connection, timeout, server) is returned for the caller to retry.
    pub async fn insert_isolating(&self, rows: &[Row<'_>]) -> Result<Inserted> {
        let mut inserted = Inserted::default();
        // Ranges still to insert, first ones first; a refused range comes back as two halves.
        // A row alone is tried twice before it counts as refused: the first failure may have
        // been a partition dropped since it was cached (the cache is cleared on any failure).
        let mut todo = vec![(0..rows.len(), false)];
        while let Some((range, retried)) = todo.pop() {
            match self.insert(&rows[range.clone()]).await {
                Ok(n) => inserted.stored += n,
                Err(Error::Postgres(e)) if is_data_error(&e) => {
                    if range.len() == 1 && retried {
                        inserted.refused.push((range.start, e.to_string()));
                    } else if range.len() == 1 {
                        todo.push((range, true));
                    } else {
                        let mid = range.start + range.len() / 2;
                        todo.push((mid..range.end, false));
                        todo.push((range.start..mid, false));
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(inserted)
    }

    /// `statement` within the client-side deadline; past it, an I/O timeout error (the
    /// connection is dropped with the future, never reused).
    async fn bounded<T>(
        &self,
        statement: impl Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<T, sqlx::Error> {
        match tokio::time::timeout(self.deadline, statement).await {
            Ok(result) => result,
            Err(_) => Err(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("PostgreSQL did not answer within {:?}", self.deadline),
            ))),
        }
    }

    /// Creates the partitions of `first..=last` where missing and drops those of days before
    /// `drop_before`; returns how many it created and dropped.
    pub async fn maintain(
        &self,
        first: NaiveDate,
        last: NaiveDate,
        drop_before: NaiveDate,
    ) -> Result<(i32, i32)> {
        let counts: (i32, i32) = self
            .bounded(
                sqlx::query_as(
                    "SELECT created, dropped FROM dedup_maintain_partitions($1, $2, $3)",
                )
                .bind(first)
                .bind(last)
                .bind(drop_before)
                .fetch_one(&self.pool),
            )
            .await
            .map_err(Error::Postgres)?;
        // Dropped partitions must be created again if an event for them still comes.
        self.partitions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        Ok(counts)
    }

    /// Inserts `rows` in one statement; returns how many were new. Rows must not repeat a
    /// `(event_date, dedup_key)` pair and must be in [`lock_order`].
    pub async fn insert(&self, rows: &[Row<'_>]) -> Result<u64> {
        if rows.is_empty() {
            return Ok(0);
        }
        debug_assert!(
            rows.is_sorted_by_key(|r| (r.event_date, r.dedup_key)),
            "rows must be in lock order"
        );
        self.ensure_partitions(rows).await?;
        let insert = sqlx::query_scalar::<_, i64>(INSERT)
            .bind(rows.iter().map(|r| r.event_date).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.dedup_key).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.event_datetime).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.client_id).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.event_name).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.product_id).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.sid).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.r).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.payload).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.received_at).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.source).collect::<Vec<_>>())
            .fetch_one(&self.pool);
        let count = self.bounded(insert).await.map_err(|e| {
            // A partition may have been dropped (retention) since it was cached.
            self.partitions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
            Error::Postgres(e)
        })?;
        Ok(u64::try_from(count).unwrap_or_default())
    }

    async fn ensure_partitions(&self, rows: &[Row<'_>]) -> Result<()> {
        let missing: Vec<NaiveDate> = {
            let known = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
            let mut days: Vec<NaiveDate> = rows
                .iter()
                .map(|r| r.event_date)
                .filter(|d| !known.contains(d))
                .collect();
            days.dedup();
            days
        };
        if missing.is_empty() {
            return Ok(());
        }
        let created: i32 = self
            .bounded(
                sqlx::query_scalar("SELECT dedup_ensure_partitions($1::date[])")
                    .bind(&missing)
                    .fetch_one(&self.pool),
            )
            .await
            .map_err(Error::Postgres)?;
        if created > 0 {
            tracing::info!(created, "Created daily partitions.");
        }
        self.partitions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(missing);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    /// The benchmark's PostgreSQL ceiling runs this statement on its own connection; it must
    /// stay the statement the worker runs, or the ceiling measures something else.
    #[test]
    fn the_benchmark_ceiling_measures_this_statement() {
        let bench = include_str!("../../bench/src/ceilings.rs");
        assert!(
            bench.contains(super::INSERT),
            "update services/bench/src/ceilings.rs"
        );
    }
}
