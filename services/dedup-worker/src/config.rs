//! dedup-worker's settings: one documented struct, read from flags, environment or YAML.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, Subcommand};
use dedup_event::key::DEFAULT_KEY_FIELDS;
use dedup_message::topology::AmqpArgs;
use dedup_runtime::config::{ConfigFileArg, parse_duration};
use dedup_runtime::secret::SecretUrl;
use dedup_runtime::telemetry::LogArgs;

/// dedup-worker: consumes product events, drops duplicates through Redis and PostgreSQL, and
/// stores every unique event exactly once.
#[derive(Debug, Clone, Parser)]
#[command(name = "dedup-worker", version, about, long_about = None)]
pub struct Config {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub file: ConfigFileArg,
    /// Address of the admin server (/metrics, /healthz, /readyz).
    #[arg(long, env = "ADMIN_LISTEN_ADDR", default_value = "0.0.0.0:9101")]
    pub admin_listen_addr: SocketAddr,
    #[command(flatten)]
    pub amqp: AmqpArgs,
    #[command(flatten)]
    pub tls: dedup_runtime::tls::TlsArgs,
    /// PostgreSQL URL. The database must exist; `dedup-worker migrate` creates the tables.
    #[arg(
        long,
        env = "DATABASE_URL",
        hide_env_values = true,
        default_value = "postgres://postgres@127.0.0.1:5432/dedup"
    )]
    pub database_url: SecretUrl,
    /// PostgreSQL connections in the pool: BATCHES_IN_FLIGHT and one for maintenance. Every
    /// worker may open this many, so workers × DB_POOL_SIZE must fit PostgreSQL's
    /// max_connections (100 by default) beside its other clients.
    #[arg(long, env = "DB_POOL_SIZE", default_value_t = 7)]
    pub db_pool_size: u32,
    /// Longest a PostgreSQL statement may run before it is cancelled and the batch retried.
    #[arg(long, env = "DB_STATEMENT_TIMEOUT", value_parser = parse_duration, default_value = "30s")]
    pub db_statement_timeout: Duration,
    /// Apply database migrations at start (otherwise run `dedup-worker migrate` first).
    #[arg(long, env = "MIGRATE_ON_START", default_value_t = false)]
    pub migrate_on_start: bool,
    /// Redis URL (plain Redis 7+, Redis Stack, Valkey or a managed Redis).
    #[arg(
        long,
        env = "REDIS_URL",
        hide_env_values = true,
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: SecretUrl,
    /// Prefix of every Redis key; also the Redis Cluster hash tag.
    #[arg(long, env = "REDIS_PREFIX", default_value = "dedup")]
    pub redis_prefix: String,
    /// REDIS_URL is one node of a Redis Cluster (the others are discovered from it).
    #[arg(long, env = "REDIS_CLUSTER", default_value_t = false, action = clap::ArgAction::Set)]
    pub redis_cluster: bool,
    /// Hash tags the recent keys are spread over: 1 keeps them in one slot (one server's
    /// worth); with a Redis Cluster, a few times its primaries (e.g. 64) spreads them over all.
    /// Changing it makes the keys already in Redis unknown until they expire: PostgreSQL
    /// still decides.
    #[arg(long, env = "REDIS_KEY_BUCKETS", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16384))]
    pub redis_key_buckets: u32,
    /// Bound on one Redis call; past it the batch carries on with PostgreSQL alone.
    #[arg(long, env = "REDIS_TIMEOUT", value_parser = parse_duration, default_value = "500ms")]
    pub redis_timeout: Duration,
    /// After a Redis failure, how long to run PostgreSQL-only before trying Redis again.
    #[arg(long, env = "REDIS_RETRY_INTERVAL", value_parser = parse_duration, default_value = "5s")]
    pub redis_retry_interval: Duration,
    /// Fields whose values identify an event (comma-separated, in order).
    #[arg(long, env = "DEDUP_KEY_FIELDS", value_delimiter = ',', default_values_t = DEFAULT_KEY_FIELDS.map(String::from))]
    pub dedup_key_fields: Vec<String>,
    /// How long Redis remembers a stored event's key (about 200 bytes each), so that a
    /// duplicate arriving within it costs no PostgreSQL work. Later duplicates are still
    /// refused by PostgreSQL's unique constraint.
    #[arg(long, env = "DEDUP_WINDOW", value_parser = parse_duration, default_value = "7d")]
    pub dedup_window: Duration,
    /// Unacknowledged messages the broker may send ahead (AMQP prefetch); lowered at start so
    /// that PREFETCH full-size messages fit MAX_UNACKED_BYTES. With AMQP_QUEUE_SHARDS above 1
    /// it is split evenly over the queues (at least 1 each).
    #[arg(long, env = "PREFETCH", default_value_t = 300)]
    pub prefetch: u16,
    /// Most bytes of unacknowledged messages the worker may hold. A message is at most 2 MiB
    /// (larger ones are dead-lettered unread), so the prefetch is capped at this / 2 MiB.
    #[arg(long, env = "MAX_UNACKED_BYTES", default_value_t = DEFAULT_MAX_UNACKED_BYTES)]
    pub max_unacked_bytes: usize,
    /// How long daily partitions are kept: older ones are dropped by the maintenance step, and
    /// events older than this are dead-lettered. At least DEDUP_WINDOW, or Redis would drop
    /// repeats whose first copy is gone.
    #[arg(long, env = "RETENTION", value_parser = parse_duration, default_value = "400d")]
    pub retention: Duration,
    /// Days of partitions created ahead of today; events further in the future are
    /// dead-lettered. Keep it above ingest's EVENT_MAX_FUTURE.
    #[arg(long, env = "PARTITIONS_AHEAD", default_value_t = 3)]
    pub partitions_ahead: u32,
    /// How often a worker runs the partition maintenance (create ahead, drop past retention);
    /// 0 leaves it to `dedup-worker maintain` (e.g. a CronJob).
    #[arg(long, env = "MAINTAIN_INTERVAL", value_parser = parse_duration, default_value = "1h")]
    pub maintain_interval: Duration,
    /// How long the worker may hold deliveries without committing any before it reports
    /// itself not ready (and sets dedup_worker_stalled).
    #[arg(long, env = "STALL_TIMEOUT", value_parser = parse_duration, default_value = "2m")]
    pub stall_timeout: Duration,
    /// Events per batch: one Redis round trip and one PostgreSQL statement each.
    #[arg(long, env = "BATCH_SIZE", default_value_t = 1000)]
    pub batch_size: usize,
    /// Batches processed at once (while one waits on PostgreSQL, the next asks Redis); acks
    /// still go in delivery order, after each batch's commit. With AMQP_QUEUE_SHARDS above 1
    /// it is split evenly over the queues (at least 1 each).
    #[arg(long, env = "BATCHES_IN_FLIGHT", default_value_t = 6)]
    pub batches_in_flight: usize,
    /// Longest wait for a batch to fill before processing what there is.
    #[arg(long, env = "BATCH_LINGER", value_parser = parse_duration, default_value = "20ms")]
    pub batch_linger: Duration,
    /// Longest pause between reconnection or retry attempts.
    #[arg(long, env = "RECONNECT_MAX_BACKOFF", value_parser = parse_duration, default_value = "5s")]
    pub reconnect_max_backoff: Duration,
    /// RabbitMQ management API, for the queue depth gauges (ready and unacknowledged).
    #[arg(
        long,
        env = "RABBITMQ_MANAGEMENT_URL",
        hide_env_values = true,
        default_value = "http://guest:guest@127.0.0.1:15672"
    )]
    pub rabbitmq_management_url: SecretUrl,
    /// How often to read the queue depth from the broker for the metrics.
    #[arg(long, env = "QUEUE_DEPTH_INTERVAL", value_parser = parse_duration, default_value = "5s")]
    pub queue_depth_interval: Duration,
    /// On SIGTERM, how long the batch in hand may take to finish before the process exits.
    #[arg(long, env = "SHUTDOWN_GRACE", value_parser = parse_duration, default_value = "25s")]
    pub shutdown_grace: Duration,
    #[command(flatten)]
    pub log: LogArgs,
}

/// The default bound on unacknowledged message bytes.
pub const DEFAULT_MAX_UNACKED_BYTES: usize = 256 << 20;

impl Config {
    /// The prefetch actually asked for: PREFETCH, lowered so that as many largest messages
    /// fit MAX_UNACKED_BYTES.
    pub fn effective_prefetch(&self) -> u16 {
        let fit = self.max_unacked_bytes / dedup_message::message::MAX_DECODED_BYTES;
        self.prefetch
            .min(u16::try_from(fit).unwrap_or(u16::MAX))
            .max(1)
    }

    /// Refuses settings that break the exactly-once guarantee, and variables this version no
    /// longer reads (a setting silently ignored would leave its operator believing it holds).
    pub fn check(&self) -> anyhow::Result<()> {
        dedup_runtime::config::refuse_removed(&REMOVED_VARIABLES)?;
        anyhow::ensure!(
            self.retention >= self.dedup_window,
            "RETENTION ({}) is shorter than DEDUP_WINDOW ({}): Redis would drop repeats whose \
             first copy was deleted. Lengthen RETENTION or shorten DEDUP_WINDOW.",
            humantime::format_duration(self.retention),
            humantime::format_duration(self.dedup_window)
        );
        Ok(())
    }
}

/// Variables earlier versions read, with what replaced them.
const REMOVED_VARIABLES: [(&str, &str); 4] = [
    (
        "RECENT_KEYS_TTL",
        "DEDUP_WINDOW is the recent keys' TTL; set it instead.",
    ),
    ("BLOOM_EXPECTED_RATE", BLOOM_REMOVED),
    ("BLOOM_FALSE_POSITIVE_RATE", BLOOM_REMOVED),
    ("BLOOM_SLICE", BLOOM_REMOVED),
];

const BLOOM_REMOVED: &str = "the worker has no Bloom filter (it could not change a decision: \
     only a recent key drops an event, everything else goes to PostgreSQL).";

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Apply the database migrations and exit.
    Migrate,
    /// Create the partitions PARTITIONS_AHEAD days ahead, drop those older than RETENTION,
    /// and exit.
    Maintain,
    /// Ask the running worker (on ADMIN_LISTEN_ADDR) whether it is ready; exit 0 if so. For
    /// container health checks.
    Probe,
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    /// The settings print (`{:?}`, as a log line or a panic would) without any password.
    #[test]
    fn debug_output_masks_every_credential() {
        let config = Config::parse_from([
            "dedup-worker",
            "--rabbitmq-url=amqp://u:S3CRET1@rabbit/%2f",
            "--database-url=postgres://u:S3CRET2@db/dedup",
            "--redis-url=redis://:S3CRET3@cache:6379",
            "--rabbitmq-management-url=http://u:S3CRET4@rabbit:15672",
        ]);
        let shown = format!("{config:?}");
        assert!(!shown.contains("S3CRET"), "{shown}");
        assert!(shown.contains("postgres://u:***@db/dedup"), "{shown}");
        assert_eq!(
            config.database_url.expose(),
            "postgres://u:S3CRET2@db/dedup"
        );
    }
}
