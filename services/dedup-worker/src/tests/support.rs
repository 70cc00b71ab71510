//! The worker built in-process and wired to a test environment, with short timings and, for
//! the exactly-once tests, crashes injected between a batch's steps. The whole-system tests
//! run the binary instead (`test_support::process`).

use std::sync::Arc;
use std::time::Duration;

use crate::Worker;
use crate::fault::FaultHook;
use clap::Parser;
use test_support::TestEnv;
use test_support::env::{RABBITMQ_URL, REDIS_URL};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A worker config for `env` with test-friendly timings, through the given URLs.
pub fn worker_config(env: &TestEnv) -> crate::Config {
    let mut config = crate::Config::parse_from(["dedup-worker"]);
    config.amqp.rabbitmq_url = RABBITMQ_URL.into();
    config.amqp.topology = env.topology.clone();
    config.database_url = env.database_url.as_str().into();
    config.redis_url = REDIS_URL.into();
    config.redis_prefix = env.redis_prefix.clone();
    config.migrate_on_start = true;
    config.batch_size = 50;
    config.prefetch = 200;
    config.batch_linger = Duration::from_millis(20);
    config.reconnect_max_backoff = Duration::from_millis(300);
    config.redis_timeout = Duration::from_millis(300);
    config.redis_retry_interval = Duration::from_millis(300);
    config.dedup_window = Duration::from_secs(3600);
    config.shutdown_grace = Duration::from_secs(10);
    config
}

/// A worker running as a task; `stop` asks it to shut down gracefully.
pub struct WorkerUnderTest {
    pub worker: Arc<Worker>,
    stop: CancellationToken,
    pub task: JoinHandle<Result<(), crate::error::Error>>,
}

impl WorkerUnderTest {
    /// Migrates (once) and starts consuming.
    pub async fn start(config: crate::Config, fault: Option<FaultHook>) -> Self {
        let worker = match fault {
            Some(fault) => Worker::with_fault(config.clone(), fault),
            None => Worker::new(config.clone()),
        };
        let worker = Arc::new(worker.expect("worker config"));
        if config.migrate_on_start {
            migrate_once(&worker).await;
        }
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let worker = worker.clone();
            let stop = stop.clone();
            async move { worker.run(stop.cancelled_owned()).await }
        });
        Self { worker, stop, task }
    }

    /// Signals shutdown and waits for the worker to finish: at most its shutdown grace, and a
    /// worker still running [`STOP_MARGIN`] past it fails the test.
    pub async fn stop(mut self) -> Result<(), crate::error::Error> {
        self.stop.cancel();
        let bound = self.worker.config.shutdown_grace + STOP_MARGIN;
        tokio::time::timeout(bound, &mut self.task)
            .await
            .unwrap_or_else(|_| panic!("the worker did not stop within {bound:?} of being asked"))
            .expect("worker task")
    }

    /// Waits for the worker to end by itself (an injected crash), with a bound.
    pub async fn finished(mut self, within: Duration) -> Result<(), crate::error::Error> {
        tokio::time::timeout(within, &mut self.task)
            .await
            .expect("the worker should have stopped by now")
            .expect("worker task")
    }
}

impl Drop for WorkerUnderTest {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// How long past its shutdown grace a stopping worker may take before the test fails.
const STOP_MARGIN: Duration = Duration::from_secs(20);

/// Applies migrations; concurrent callers take turns (sqlx holds an advisory lock on the
/// database while it migrates), and a migration that never finishes fails the test.
async fn migrate_once(worker: &Worker) {
    test_support::env::bounded("migrating the test schema", worker.store().migrate())
        .await
        .expect("migrations apply to the test schema");
}

/// Deletes one of the test's queues; `what` says which when the broker refuses.
pub async fn delete_queue(channel: &lapin::Channel, queue: &str, what: &str) {
    channel
        .queue_delete(queue.into(), lapin::options::QueueDeleteOptions::default())
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
}
