//! Whole-system tests: the real `ingest` and `dedup-worker` binaries (started as processes by
//! `test_support::process`) with RabbitMQ, Redis and PostgreSQL, observed only over HTTP, AMQP,
//! SQL, `/metrics` and OTLP — plus the checks that span the whole repository (the README
//! documents every setting, the dashboard and alerts use only exposed metrics). The tests are
//! in `tests/`; this library is empty.
//!
//! # Layout
//!
//! - `tests/end_to_end.rs`: HTTP → broker → worker → PostgreSQL over real sockets.
//! - `tests/poison.rs`: hostile and careless input through the real services.
//! - `tests/trace_context.rs`: one trace from the request to the worker's batch span, through
//!   the binaries' OTLP exporters to a real receiver.
//! - `tests/monitoring.rs`: the dashboard's and alerts' metrics exist, and a real Prometheus
//!   scraping the binaries answers their queries.
//! - `tests/readme.rs`: every setting of both binaries is in the README.
