//! The worker's tests against the real PostgreSQL, Redis and RabbitMQ, inside the crate so
//! its modules stay private. Whole-system tests are in `services/system-tests`.

mod exactly_once;
mod faults;
mod properties;
mod queue_depth;
mod redis_tier;
mod storage;
mod support;
