//! What `ingest` and `dedup-worker` share, and nothing more.
//!
//! # Layout
//!
//! - [`event`]: the HTTP contract for one product event: required fields, limits and the
//!   original service's error messages.
//! - [`datetime`]: the ISO 8601 date-times the original accepted.
//! - [`storable`]: what PostgreSQL's `jsonb` and `text` accept, checked before an event is.
//! - [`key`]: the dedup key, a 128-bit hash over an unambiguous encoding of the key fields.
//! - [`message`]: how events travel on the queue (NDJSON body, received time and trace headers).
//! - [`queue_depth`]: ready and unacknowledged messages from the management API.
//! - [`topology`]: the exchanges and queues both sides declare.
//! - [`admin`]: the /metrics, /healthz and /readyz server on the admin port.
//! - [`backoff`]: reconnection pacing.
//! - [`config`]: settings both binaries read (broker, logging, optional YAML file).
//! - [`telemetry`]: logging and OpenTelemetry tracing setup.
//! - [`trace_context`]: W3C trace context in AMQP headers.
//! - [`shutdown`]: the one SIGINT/SIGTERM future every binary waits on.

pub mod admin;
pub mod backoff;
pub mod config;
pub mod datetime;
pub mod event;
pub mod key;
pub mod message;
pub mod queue_depth;
pub mod shutdown;
pub mod storable;
pub mod telemetry;
pub mod topology;
pub mod trace_context;

pub use event::FieldErrors;
pub use key::{DedupKey, KeySpec};
