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
/// A check that hangs (a service that never answers) fails too: a slow one may run past the
/// deadline, up to [`env::STEP_WAIT`], as every other step with a service may.
pub async fn eventually<T, F, Fut>(timeout: std::time::Duration, what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    poll_until(timeout, env::STEP_WAIT, what, check).await
}

/// [`eventually`], with each check bounded by the time left or `step_wait`, whichever is longer.
async fn poll_until<T, F, Fut>(
    timeout: std::time::Duration,
    step_wait: std::time::Duration,
    what: &str,
    mut check: F,
) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let limit = deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .max(step_wait);
        let checked = tokio::time::timeout(limit, check())
            .await
            .unwrap_or_else(|_| {
                panic!("timed out waiting for {what}: a check did not return within {limit:?}")
            });
        if let Some(value) = checked {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[tokio::test]
    #[should_panic(expected = "waiting for an answer: a check did not return within 200ms")]
    async fn a_check_that_never_returns_fails() {
        super::poll_until(
            Duration::from_millis(100),
            Duration::from_millis(200),
            "an answer",
            std::future::pending::<Option<()>>,
        )
        .await;
    }

    #[tokio::test]
    async fn a_slow_check_may_answer_past_the_deadline() {
        let answer = super::poll_until(
            Duration::from_millis(50),
            Duration::from_secs(5),
            "an answer",
            || async {
                tokio::time::sleep(Duration::from_millis(200)).await;
                Some(7)
            },
        )
        .await;
        assert_eq!(answer, 7);
    }

    #[tokio::test]
    #[should_panic(expected = "timed out after 100ms waiting for an answer")]
    async fn a_check_that_keeps_saying_no_fails_at_the_deadline() {
        super::eventually(Duration::from_millis(100), "an answer", || async {
            None::<()>
        })
        .await;
    }
}
