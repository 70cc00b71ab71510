//! ingest's settings: one documented struct, read from flags, environment or a YAML file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use dedup_message::topology::AmqpArgs;
use dedup_runtime::config::{ConfigFileArg, parse_duration};
use dedup_runtime::telemetry::LogArgs;
use dedup_runtime::tls::TlsArgs;
use ipnet::IpNet;

use crate::auth::AuthMode;

/// Largest single-event body accepted by default (the original's limit was similar).
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;
/// Bytes of single-event bodies in flight by default: thousands of ordinary events, a dozen
/// of the largest.
pub const DEFAULT_MAX_BODY_BYTES_IN_FLIGHT: usize = 16 * 1024 * 1024;
/// Largest batch request body accepted by default. With the bound on batch bodies in flight
/// it keeps ingest's memory near its target whatever clients send.
pub const DEFAULT_MAX_BATCH_BODY_BYTES: usize = 8 * 1024 * 1024;
/// Most client connections open at once by default.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Largest request head by default: far past what a client of this API sends (a write key, a
/// trace context), far below hyper's own ~400 KB.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 8 * 1024;
/// The smallest MAX_HEADER_BYTES taken: a request line, a host, a write key and a content
/// type with room to spare.
const MIN_HEADER_BYTES: usize = 1024;
/// Most events in one batch request by default.
pub const DEFAULT_MAX_BATCH_EVENTS: usize = 10_000;

/// ingest: accepts product events over HTTP and publishes them to RabbitMQ, answering 202 only
/// once the broker has confirmed them.
#[derive(Debug, Clone, Parser)]
#[command(name = "ingest", version, about, long_about = None)]
pub struct Config {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub file: ConfigFileArg,
    /// Address of the public HTTP API.
    #[arg(long, env = "LISTEN_ADDR", default_value = "0.0.0.0:8000")]
    pub listen_addr: SocketAddr,
    /// PEM certificate chain for serving HTTPS on LISTEN_ADDR (with TLS_KEY_FILE); read again
    /// when it changes. Without it ingest serves plain HTTP (put TLS in front of it).
    #[arg(long, env = "TLS_CERT_FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of TLS_CERT_FILE's certificate.
    #[arg(long, env = "TLS_KEY_FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,
    /// How often TLS_CERT_FILE and TLS_KEY_FILE are checked for a renewed certificate.
    #[arg(long, env = "TLS_RELOAD_INTERVAL", value_parser = parse_duration, default_value = "5s")]
    pub tls_reload_interval: Duration,
    /// Address of the admin server (/metrics, /healthz, /readyz).
    #[arg(long, env = "ADMIN_LISTEN_ADDR", default_value = "0.0.0.0:9100")]
    pub admin_listen_addr: SocketAddr,
    #[command(flatten)]
    pub amqp: AmqpArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Who may send events: `keys` (a write key from WRITE_KEYS_PATH in `Authorization:
    /// Bearer <key>` or `X-API-Key`; others get 401) or `none` (anyone who reaches the port).
    #[arg(long, env = "AUTH", value_enum, default_value_t = AuthMode::Keys)]
    pub auth: AuthMode,
    /// The write key file: YAML `keys: [{source: NAME, sha256: HEX, rate: N, burst: N}]`
    /// (rate and burst optional). Read again when it changes; `ingest write-key --source NAME`
    /// makes a key and its entry.
    #[arg(long, env = "WRITE_KEYS_PATH")]
    pub write_keys_path: Option<PathBuf>,
    /// How often the write key file is checked for changes.
    #[arg(long, env = "WRITE_KEYS_RELOAD_INTERVAL", value_parser = parse_duration, default_value = "5s")]
    pub write_keys_reload_interval: Duration,
    /// Events per second one write key may send (a token bucket; more get 429 with
    /// Retry-After). 0: no limit. The key file can give a key its own rate. With AUTH=none
    /// all clients share one bucket.
    #[arg(long, env = "RATE_LIMIT", default_value_t = 0)]
    pub rate_limit: u32,
    /// Events one write key may send at once beyond its rate; no request may carry more.
    /// 0: twice RATE_LIMIT.
    #[arg(long, env = "RATE_LIMIT_BURST", default_value_t = 0)]
    pub rate_limit_burst: u32,
    /// Requests per second one client address may make, with or without a key (more get 429
    /// with Retry-After). 0: no limit. Behind a proxy set TRUSTED_PROXIES, or every client
    /// shares the proxy's address.
    #[arg(long, env = "ADDRESS_RATE_LIMIT", default_value_t = 0)]
    pub address_rate_limit: u32,
    /// Requests one client address may make at once beyond its rate. 0: twice
    /// ADDRESS_RATE_LIMIT.
    #[arg(long, env = "ADDRESS_RATE_LIMIT_BURST", default_value_t = 0)]
    pub address_rate_limit_burst: u32,
    /// Networks of the proxies in front of ingest (comma-separated CIDRs, e.g. 10.0.0.0/8).
    /// From a peer in them, the client address is taken from X-Forwarded-For; from any
    /// other peer the header is ignored.
    #[arg(long, env = "TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<IpNet>,
    /// Most client connections open at once, TLS handshakes included; further clients wait in
    /// the kernel's accept queue until one closes. Each costs ingest ~20 KB.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// How long a connection may take to send a whole request head, from opening or from its
    /// last answer (so also how long an idle keep-alive connection stays open); over TLS the
    /// handshake gets as long first. Then the connection is closed.
    #[arg(long, env = "HEADER_READ_TIMEOUT", value_parser = parse_duration, default_value = "30s")]
    pub header_read_timeout: Duration,
    /// Largest request head (request line and headers), in bytes; larger ones get 431.
    #[arg(long, env = "MAX_HEADER_BYTES", default_value_t = DEFAULT_MAX_HEADER_BYTES)]
    pub max_header_bytes: usize,
    /// Largest body of a single-event request, in bytes; larger ones get 413.
    #[arg(long, env = "MAX_BODY_BYTES", default_value_t = DEFAULT_MAX_BODY_BYTES)]
    pub max_body_bytes: usize,
    /// Largest body of a batch request, in bytes; larger ones get 413.
    #[arg(long, env = "MAX_BATCH_BODY_BYTES", default_value_t = DEFAULT_MAX_BATCH_BODY_BYTES)]
    pub max_batch_body_bytes: usize,
    /// Most bytes of single-event request bodies read and processed at once; further
    /// requests wait their turn. At least MAX_BODY_BYTES.
    #[arg(long, env = "MAX_BODY_BYTES_IN_FLIGHT", default_value_t = DEFAULT_MAX_BODY_BYTES_IN_FLIGHT)]
    pub max_body_bytes_in_flight: usize,
    /// Most bytes of batch request bodies read and processed at once; further batch requests
    /// wait their turn (single events are not held up by them). At least MAX_BATCH_BODY_BYTES.
    #[arg(long, env = "MAX_BATCH_BYTES_IN_FLIGHT", default_value_t = DEFAULT_MAX_BATCH_BODY_BYTES)]
    pub max_batch_bytes_in_flight: usize,
    /// Oldest event_datetime accepted, as an age (older events get 400). Each accepted day is
    /// a partition; keep it within the worker's RETENTION.
    #[arg(long, env = "EVENT_MAX_AGE", value_parser = parse_duration, default_value = "30d")]
    pub event_max_age: Duration,
    /// Furthest event_datetime accepted ahead of the clock (later events get 400). Keep it
    /// below the worker's PARTITIONS_AHEAD.
    #[arg(long, env = "EVENT_MAX_FUTURE", value_parser = parse_duration, default_value = "1d")]
    pub event_max_future: Duration,
    /// Fields whose values identify an event (comma-separated, in order), as the workers have
    /// them: with AMQP_QUEUE_SHARDS above 1 every copy of an event goes to the queue its key
    /// picks, so repeats meet in one queue.
    #[arg(long, env = "DEDUP_KEY_FIELDS", value_delimiter = ',', default_values_t = dedup_event::key::DEFAULT_KEY_FIELDS.map(String::from))]
    pub dedup_key_fields: Vec<String>,
    /// Most events in one batch request; more get 413.
    #[arg(long, env = "MAX_BATCH_EVENTS", default_value_t = DEFAULT_MAX_BATCH_EVENTS)]
    pub max_batch_events: usize,
    /// Most events packed into one AMQP message, whether from single-event requests arriving
    /// together or from one batch request (1 turns packing off). Nothing waits for a message
    /// to fill; a message also stays within 1 MiB.
    #[arg(long, env = "MAX_EVENTS_PER_MESSAGE", default_value_t = 128)]
    pub max_events_per_message: usize,
    /// How message bodies are compressed on the queue (the worker reads both).
    #[arg(long, env = "MESSAGE_COMPRESSION", value_enum, default_value_t = dedup_message::message::Compression::Lz4)]
    pub message_compression: dedup_message::message::Compression,
    /// Packed messages of single events that may await a confirm at once, per queue shard.
    /// Only the first may go part full: while it awaits its confirm, the next events gather
    /// until their message is full or that confirm comes back, since the broker's cost is
    /// mostly per message (a quorum queue spends ~0.3-1 ms of CPU on each). Full messages go
    /// beside it up to this number, so the rate is not capped at one message per round trip.
    #[arg(long, env = "COALESCE_FLUSHERS", default_value_t = 2)]
    pub coalesce_flushers: usize,
    /// AMQP channels publishing in parallel; each carries many unconfirmed messages at once.
    #[arg(long, env = "PUBLISH_CHANNELS", default_value_t = 4)]
    pub publish_channels: usize,
    /// Most publishes awaiting a broker confirm at once; beyond it requests get 503.
    #[arg(long, env = "MAX_IN_FLIGHT_PUBLISHES", default_value_t = 8192)]
    pub max_in_flight_publishes: usize,
    /// How long to wait for the broker's confirm before answering 503.
    #[arg(long, env = "CONFIRM_TIMEOUT", value_parser = parse_duration, default_value = "5s")]
    pub confirm_timeout: Duration,
    /// Upper bound on a whole request; slower ones get 503.
    #[arg(long, env = "REQUEST_TIMEOUT", value_parser = parse_duration, default_value = "15s")]
    pub request_timeout: Duration,
    /// Value of the Retry-After header on 503 answers.
    #[arg(long, env = "RETRY_AFTER", value_parser = parse_duration, default_value = "2s")]
    pub retry_after: Duration,
    /// Longest pause between reconnection attempts to the broker.
    #[arg(long, env = "RECONNECT_MAX_BACKOFF", value_parser = parse_duration, default_value = "5s")]
    pub reconnect_max_backoff: Duration,
    /// On SIGTERM, how long in-flight requests may take to finish before the process exits.
    #[arg(long, env = "SHUTDOWN_GRACE", value_parser = parse_duration, default_value = "25s")]
    pub shutdown_grace: Duration,
    #[command(flatten)]
    pub log: LogArgs,
}

impl Config {
    /// Refuses settings that would break the limits' promises.
    pub fn check(&self) -> anyhow::Result<()> {
        dedup_runtime::config::refuse_removed(&[
            ("EVENTS_PER_MESSAGE", PACKING_MERGED),
            ("COALESCE_MAX_EVENTS", PACKING_MERGED),
        ])?;
        self.tls.ca_pem()?;
        self.key_spec()?;
        anyhow::ensure!(
            self.max_connections > 0,
            "MAX_CONNECTIONS is 0: ingest could take no connection; set at least 1"
        );
        anyhow::ensure!(
            !self.header_read_timeout.is_zero(),
            "HEADER_READ_TIMEOUT is 0: every connection would be closed before its request; \
             set a duration such as 30s"
        );
        anyhow::ensure!(
            self.max_header_bytes >= MIN_HEADER_BYTES,
            "MAX_HEADER_BYTES is {}; set at least {MIN_HEADER_BYTES}, or ordinary requests get 431",
            self.max_header_bytes
        );
        let most = dedup_message::message::MAX_DECODED_BYTES - 1;
        anyhow::ensure!(
            self.max_body_bytes <= most,
            "MAX_BODY_BYTES is {}; at most {most} fit one message (the worker refuses larger ones)",
            self.max_body_bytes
        );
        anyhow::ensure!(
            self.max_body_bytes_in_flight >= self.max_body_bytes,
            "MAX_BODY_BYTES_IN_FLIGHT ({}) must be at least MAX_BODY_BYTES ({}), or an event at \
             the limit could never be read",
            self.max_body_bytes_in_flight,
            self.max_body_bytes
        );
        anyhow::ensure!(
            self.max_batch_bytes_in_flight >= self.max_batch_body_bytes,
            "MAX_BATCH_BYTES_IN_FLIGHT ({}) must be at least MAX_BATCH_BODY_BYTES ({}), or a batch \
             at the limit could never be read",
            self.max_batch_bytes_in_flight,
            self.max_batch_body_bytes
        );
        Ok(())
    }

    /// The dedup key the events are routed by.
    pub fn key_spec(&self) -> anyhow::Result<dedup_event::key::KeySpec> {
        dedup_event::key::KeySpec::new(&self.dedup_key_fields)
            .map_err(|e| anyhow::anyhow!("DEDUP_KEY_FIELDS: {e}"))
    }
}

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Ask the running ingest (on ADMIN_LISTEN_ADDR) whether it is ready; exit 0 if so. For
    /// container health checks.
    Probe,
    /// Make a new write key: prints the key (give it to the client app) and the entry to add
    /// to the write key file (which holds only the key's hash).
    WriteKey {
        /// The source the key is for (the app's name; stored with each of its events).
        #[arg(long)]
        source: String,
    },
}

const PACKING_MERGED: &str = "MAX_EVENTS_PER_MESSAGE now bounds every message, from single-event \
     and from batch requests alike; set it instead.";

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    /// The settings print without the broker password.
    #[test]
    fn debug_output_masks_the_broker_password() {
        let config = Config::parse_from(["ingest", "--rabbitmq-url=amqp://u:S3CRET@rabbit/%2f"]);
        let shown = format!("{config:?}");
        assert!(!shown.contains("S3CRET"), "{shown}");
        assert!(shown.contains("amqp://u:***@rabbit/%2f"), "{shown}");
    }

    /// Connection limits that would leave ingest unable to serve anyone are refused at start,
    /// naming the setting and what to set; the defaults pass.
    #[test]
    fn connection_limits_that_serve_no_one_are_refused() {
        Config::parse_from(["ingest"])
            .check()
            .expect("the defaults");
        for (flag, named) in [
            ("--max-connections=0", "MAX_CONNECTIONS is 0"),
            ("--header-read-timeout=0s", "HEADER_READ_TIMEOUT is 0"),
            (
                "--max-header-bytes=512",
                "MAX_HEADER_BYTES is 512; set at least 1024",
            ),
        ] {
            let refused = Config::parse_from(["ingest", flag])
                .check()
                .expect_err(flag)
                .to_string();
            assert!(refused.contains(named), "{flag}: {refused}");
        }
    }
}
