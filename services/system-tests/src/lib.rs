//! Whole-system tests: the real ingest HTTP server, RabbitMQ, the worker, Redis and PostgreSQL
//! together, plus the checks that span the whole repository (the README documents every
//! setting, the dashboard and alerts use only exposed metrics). The tests are in `tests/`;
//! this library is empty.
//!
//! # Layout
//!
//! - `tests/end_to_end.rs`: HTTP → broker → worker → PostgreSQL over real sockets.
//! - `tests/poison.rs`: hostile and careless input through the real services.
//! - `tests/trace_context.rs`: one trace from the request to the worker's batch span.
//! - `tests/monitoring.rs`: the dashboard's and alerts' metrics exist, scraped by Prometheus.
//! - `tests/readme.rs`: every setting of both binaries is in the README.
