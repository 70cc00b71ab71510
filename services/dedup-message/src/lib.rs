//! How events travel between ingest and the workers: the broker topology and the message
//! format (body, headers and trace links).
//!
//! # Layout
//!
//! - [`message`]: the message: NDJSON body, compression, event count, received time and the
//!   dead-letter reason header.
//! - [`topology`]: the broker URL, and the exchanges and queues both sides declare.
//! - [`trace_context`]: W3C trace context in AMQP headers.

pub mod message;
pub mod topology;
pub mod trace_context;
