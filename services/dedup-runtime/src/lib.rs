//! What every dedup process runs on: settings, logging and tracing, the admin server, signals
//! and graceful shutdown, reconnection pacing and the queue depth read from RabbitMQ's
//! management API.
//!
//! # Layout
//!
//! - [`config`]: the optional YAML settings file, its precedence and the duration syntax.
//! - [`telemetry`]: logging and OpenTelemetry tracing setup.
//! - [`admin`]: the /metrics, /healthz and /readyz server on the admin port, and the `probe`
//!   health check.
//! - [`serve`]: a router on HTTP/1.1 connections with limits on the connections themselves
//!   (count, header timeout, head size): the admin port and ingest's public port.
//! - [`shutdown`]: the one SIGINT/SIGTERM future every binary waits on.
//! - [`backoff`]: reconnection pacing.
//! - [`queue_depth`]: ready and unacknowledged messages from the management API.
//! - [`secret`]: connection URLs as they may be shown (passwords masked).
//! - [`tls`]: the trusted roots of every TLS connection to a backend (`TLS_CA_FILE`).

pub mod admin;
pub mod backoff;
pub mod config;
pub mod queue_depth;
pub mod secret;
pub mod serve;
pub mod shutdown;
pub mod telemetry;
pub mod tls;
