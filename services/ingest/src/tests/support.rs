//! ingest built in-process from its crate and wired to a test environment: a router with a
//! connected publisher (driven with `oneshot`), or a real server on loopback ports. For the
//! tests that hold ingest's internals (its body gates, its publisher); the whole-system tests
//! run the binary instead (`test_support::process`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::http::AppState;
use crate::metrics::Metrics;
use crate::publish::Publisher;
use clap::Parser;
use serde_json::Value;
use test_support::TestEnv;
use test_support::client::http_request;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// An ingest config for `env`, publishing to `amqp_url`.
pub fn ingest_config(env: &TestEnv, amqp_url: &str) -> crate::Config {
    let mut config = crate::Config::parse_from(["ingest"]);
    config.auth = crate::auth::AuthMode::None;
    config.amqp.rabbitmq_url = amqp_url.into();
    config.amqp.topology = env.topology.clone();
    config.confirm_timeout = Duration::from_secs(3);
    config.reconnect_max_backoff = Duration::from_millis(300);
    config.retry_after = Duration::from_secs(2);
    config
}

/// The value of the series `series` (name and labels, as /metrics prints them) on the admin
/// server at `admin`.
pub async fn metric(admin: SocketAddr, series: &str) -> f64 {
    let (status, text) = http_request(admin, "GET", "/metrics", "text/plain", b"").await;
    assert_eq!(status, 200, "{text}");
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in {text}"))
}

/// The events' `r`s of each message on the queue, in order.
pub async fn messages_by_r(env: &TestEnv) -> Vec<Vec<String>> {
    env.drain(&env.topology.queue)
        .await
        .iter()
        .map(|(body, _)| {
            let mut rs: Vec<String> = dedup_message::message::lines(body)
                .map(|l| {
                    serde_json::from_slice::<Value>(l).expect("JSON")["r"]
                        .as_str()
                        .expect("r")
                        .to_owned()
                })
                .collect();
            rs.sort();
            rs
        })
        .collect()
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
    pub async fn start(config: &crate::Config, wait: bool) -> Self {
        let metrics = Metrics::new();
        let publisher = Publisher::new(crate::publisher_config(config), metrics.clone());
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
        let coalescer = crate::coalesce::Coalescer::start(
            publisher.clone(),
            &crate::coalesce_settings(config),
            &stop,
        );
        let batch_bytes = crate::batch_gate(config);
        let body_bytes = crate::body_gate(config);
        let guard = crate::auth::Guard::new(crate::guard_settings(config), &metrics)
            .expect("the write keys load");
        tokio::spawn(guard.clone().watch(stop.clone()));
        let state = AppState {
            guard,
            publisher: publisher.clone(),
            coalescer,
            limits: Arc::new(crate::limits(config)),
            metrics: metrics.clone(),
            ready,
            body_bytes: body_bytes.clone(),
            batch_bytes: batch_bytes.clone(),
        };
        Self {
            router: crate::http::app(state),
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

/// A real ingest server on loopback ports, serving until [`IngestServer::shutdown`]. It runs
/// on a runtime of its own, dropped when `serve` returns, as the process would exit: whatever
/// it leaves behind (a connection still open, a task still waiting) goes with it.
pub struct IngestServer {
    pub addr: SocketAddr,
    /// The admin server (metrics, health), which stops when shutdown starts.
    pub admin_addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub task: JoinHandle<anyhow::Result<()>>,
}

impl IngestServer {
    /// Binds ephemeral ports, starts `crate::serve` and waits (10 s at most) until ready.
    pub async fn start(config: crate::Config) -> Self {
        let bind = || {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            listener.set_nonblocking(true).expect("non-blocking");
            listener
        };
        let (listener, admin) = (bind(), bind());
        let (addr, admin_addr) = (
            listener.local_addr().expect("addr"),
            admin.local_addr().expect("addr"),
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::task::spawn_blocking(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            let served = runtime.block_on(async {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let admin = tokio::net::TcpListener::from_std(admin).expect("listener");
                crate::serve(config, listener, admin, async {
                    let _ = stopped.await;
                })
                .await
            });
            drop(runtime);
            served
        });
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

    /// Waits for the server to end, cleanly, within `within`; `what` names the wait when it
    /// runs out.
    pub async fn exits_within(self, within: Duration, what: &str) {
        tokio::time::timeout(within, self.task)
            .await
            .unwrap_or_else(|_| panic!("{what}: not within {within:?}"))
            .expect("the server's task")
            .expect("a clean exit");
    }

    /// Starts the graceful shutdown (as SIGTERM would).
    pub fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
