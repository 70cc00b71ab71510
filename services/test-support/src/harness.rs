//! Builders for the code under test, wired to a [`TestEnv`]: an ingest router with a
//! connected publisher, and workers with short timings.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use dedup_worker::Worker;
use dedup_worker::fault::FaultHook;
use ingest::http::AppState;
use ingest::metrics::Metrics;
use ingest::publish::Publisher;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::env::{RABBITMQ_URL, REDIS_URL, TestEnv};

/// `amqp://` URL of a proxy in front of the local RabbitMQ.
pub fn amqp_url_via(proxy: SocketAddr) -> String {
    format!("amqp://guest:guest@{proxy}/%2f")
}

/// An ingest config for `env`, publishing to `amqp_url`.
pub fn ingest_config(env: &TestEnv, amqp_url: &str) -> ingest::Config {
    let mut config = ingest::Config::parse_from(["ingest"]);
    config.amqp.rabbitmq_url = amqp_url.to_owned();
    config.amqp.topology = env.topology.clone();
    config.confirm_timeout = Duration::from_secs(3);
    config.reconnect_max_backoff = Duration::from_millis(300);
    config.retry_after = Duration::from_secs(2);
    config
}

/// A running ingest: the router to drive with `oneshot`, and its publisher.
pub struct IngestUnderTest {
    pub router: axum::Router,
    pub publisher: Arc<Publisher>,
    pub metrics: Metrics,
    /// The gates on single-event and batch bodies in flight, to hold in tests.
    pub body_bytes: Arc<tokio::sync::Semaphore>,
    pub batch_bytes: Arc<tokio::sync::Semaphore>,
    stop: CancellationToken,
}

impl IngestUnderTest {
    /// Builds the router and waits (up to 10 s) for the broker connection when `wait` is set.
    pub async fn start(config: &ingest::Config, wait: bool) -> Self {
        let metrics = Metrics::new();
        let publisher = Publisher::new(ingest::publisher_config(config), metrics.clone());
        let stop = CancellationToken::new();
        tokio::spawn(publisher.clone().supervise(stop.clone()));
        if wait {
            let p = publisher.clone();
            crate::eventually(
                Duration::from_secs(10),
                "ingest to connect to RabbitMQ",
                || {
                    let p = p.clone();
                    async move { p.is_connected().then_some(()) }
                },
            )
            .await;
        }
        let ready: dedup_runtime::admin::Readiness = {
            let p = publisher.clone();
            Arc::new(move || {
                if p.is_connected() {
                    Ok(())
                } else {
                    Err("not connected to RabbitMQ".into())
                }
            })
        };
        let coalescer = ingest::coalesce::Coalescer::start(
            publisher.clone(),
            &ingest::coalesce_settings(config),
            &stop,
        );
        let batch_bytes = ingest::batch_gate(config);
        let body_bytes = ingest::body_gate(config);
        let state = AppState {
            publisher: publisher.clone(),
            coalescer,
            limits: Arc::new(ingest::limits(config)),
            metrics: metrics.clone(),
            ready,
            body_bytes: body_bytes.clone(),
            batch_bytes: batch_bytes.clone(),
        };
        Self {
            router: ingest::http::app(state),
            publisher,
            metrics,
            body_bytes,
            batch_bytes,
            stop,
        }
    }
}

impl Drop for IngestUnderTest {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A worker config for `env` with test-friendly timings, through the given URLs.
pub fn worker_config(env: &TestEnv) -> dedup_worker::Config {
    let mut config = dedup_worker::Config::parse_from(["dedup-worker"]);
    config.amqp.rabbitmq_url = RABBITMQ_URL.to_owned();
    config.amqp.topology = env.topology.clone();
    config.database_url = env.database_url.clone();
    config.redis_url = REDIS_URL.to_owned();
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
    pub task: JoinHandle<Result<(), dedup_worker::error::Error>>,
}

impl WorkerUnderTest {
    /// Migrates (once) and starts consuming.
    pub async fn start(config: dedup_worker::Config, fault: Option<FaultHook>) -> Self {
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

    /// Signals shutdown and waits for the worker to finish.
    pub async fn stop(mut self) -> Result<(), dedup_worker::error::Error> {
        self.stop.cancel();
        (&mut self.task).await.expect("worker task")
    }

    /// Waits for the worker to end by itself (an injected crash), with a bound.
    pub async fn finished(mut self, within: Duration) -> Result<(), dedup_worker::error::Error> {
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

/// Applies migrations; concurrent callers on one schema take turns (sqlx locks the schema).
async fn migrate_once(worker: &Worker) {
    worker
        .store()
        .migrate()
        .await
        .expect("migrations apply to the test schema");
}

/// One HTTP/1.1 request over a fresh connection (`Connection: close`); returns the status
/// code and body. Enough for end-to-end tests against a real listening server.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the server under test");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream
        .write_all(head.as_bytes())
        .await
        .expect("write request head");
    stream.write_all(body).await.expect("write request body");
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .await
        .expect("read response");
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("HTTP status line");
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// A real ingest server on loopback ports, serving until [`IngestServer::shutdown`].
pub struct IngestServer {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub task: JoinHandle<anyhow::Result<()>>,
}

impl IngestServer {
    /// Binds ephemeral ports, starts `ingest::serve` and waits (10 s at most) until ready.
    pub async fn start(config: ingest::Config) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let (addr, admin_addr) = (
            listener.local_addr().expect("addr"),
            admin.local_addr().expect("addr"),
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(ingest::serve(config, listener, admin, async {
            let _ = stopped.await;
        }));
        crate::eventually(Duration::from_secs(10), "ingest to be ready", || async {
            (http_request(admin_addr, "GET", "/readyz", "text/plain", b"")
                .await
                .0
                == 200)
                .then_some(())
        })
        .await;
        Self {
            addr,
            admin_addr,
            stop: Some(stop),
            task,
        }
    }

    /// Starts the graceful shutdown (as SIGTERM would).
    pub fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Shuts down and waits for the server to exit cleanly.
    pub async fn stop(mut self) {
        self.shutdown();
        (&mut self.task)
            .await
            .expect("ingest task")
            .expect("ingest stops cleanly");
    }
}
