//! ingest's tests against the real RabbitMQ, inside the crate so its modules stay private.
//! Whole-system tests are in `services/system-tests`.

mod connections;
mod faults;
mod http;
mod shutdown;
mod support;
