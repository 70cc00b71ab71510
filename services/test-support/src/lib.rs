//! Test helpers shared by every crate's tests: each test gets its own queues, PostgreSQL
//! schema and Redis key prefix on the real local services, cleaned up even when it panics; a
//! TCP proxy the test can cut to make a service "go away"; and event builders.
//!
//! # Layout
//!
//! - [`env`]: [`TestEnv`], the isolated slice of PostgreSQL, Redis and RabbitMQ.
//! - [`proxy`]: [`Proxy`], a cuttable TCP proxy.
//! - [`rabbitmq_cluster`], [`redis_cluster`]: three-node clusters of their own, for what a
//!   cluster changes.
//! - [`client`]: one HTTP/1.1 request; a broker URL through a proxy.
//! - [`process`]: the real binaries as child processes, for tests that are clients.
//! - [`otlp`]: a real OTLP/HTTP trace receiver the binaries export to.
//! - [`prometheus`]: a real Prometheus server scraping the binaries.
//! - [`events`]: valid events with chosen keys, and the real samples.

pub mod client;
pub mod env;
pub mod events;
pub mod otlp;
pub mod process;
pub mod prometheus;
pub mod proxy;
pub mod rabbitmq_cluster;
pub mod redis_cluster;
pub mod tls;

pub use env::TestEnv;
pub use proxy::Proxy;

/// Polls `check` every 50 ms until it returns `Some`, or panics after `timeout` with `what`.
pub async fn eventually<T, F, Fut>(timeout: std::time::Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
