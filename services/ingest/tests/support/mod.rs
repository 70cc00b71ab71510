//! ingest built in-process from its crate and wired to a test environment: a router with a
//! connected publisher (driven with `oneshot`), or a real server on loopback ports. For the
//! tests that hold ingest's internals (its body gates, its publisher); the whole-system tests
//! run the binary instead (`test_support::process`).

// Each test binary compiles this module and uses part of it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use ingest::http::AppState;
use ingest::metrics::Metrics;
use ingest::publish::Publisher;
use test_support::TestEnv;
use test_support::client::http_request;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

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
            test_support::eventually(
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
        test_support::eventually(Duration::from_secs(10), "ingest to be ready", || async {
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
