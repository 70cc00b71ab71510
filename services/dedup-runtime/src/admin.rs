//! The admin server every binary runs beside its real work, on its own port: `/metrics` for
//! Prometheus, `/healthz` (the process is alive) and `/readyz` (its dependencies are reachable).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{Encoder, Registry, TextEncoder};

use crate::serve;

/// Answers whether the process can do its work right now, and if not, why.
pub type Readiness = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

#[derive(Clone)]
struct AdminState {
    registry: Registry,
    ready: Readiness,
}

/// `/metrics`, `/healthz` and `/readyz` over `registry` and `ready`.
pub fn router(registry: Registry, ready: Readiness) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AdminState { registry, ready })
}

/// Binds `addr`; when it is taken, the error names the setting to change.
pub async fn bind(addr: SocketAddr, setting: &str) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!("cannot listen on {addr}: {e}; set {setting} to a free address")
    })
}

/// The admin port's limits on connections. Its clients are Prometheus, the kubelet's probes
/// and an operator's curl, a handful at a time; the limits keep a client that holds
/// connections open (or many of them) from taking the process's file descriptors, and each
/// idle connection is closed after 10 s (Prometheus connects again at its next scrape).
pub const LIMITS: serve::ConnectionLimits = serve::ConnectionLimits {
    max_connections: 64,
    header_read_timeout: std::time::Duration::from_secs(10),
    max_header_bytes: 8 * 1024,
};

/// Serves the admin `router` on `listener` as a task, within [`LIMITS`], until `stop` is
/// cancelled; the task ends once the connections open then have finished.
pub fn spawn(
    listener: tokio::net::TcpListener,
    router: Router,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(serve::serve(
        listener,
        std::sync::Arc::new(serve::Plain),
        router,
        LIMITS,
        (),
        stop,
    ))
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    let mut body = Vec::new();
    let encoder = TextEncoder::new();
    match encoder.encode(&state.registry.gather(), &mut body) {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, encoder.format_type().to_owned())],
            body,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain".to_owned())],
            format!("cannot encode metrics: {e}").into_bytes(),
        ),
    }
}

/// Liveness: answering at all is the signal.
pub async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    readiness_response(&state.ready)
}

/// 200 `ready` or 503 with the reason.
pub fn readiness_response(ready: &Readiness) -> (StatusCode, String) {
    match ready() {
        Ok(()) => (StatusCode::OK, "ready".to_owned()),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}"),
        ),
    }
}

/// `probe`: asks this process's own admin server whether it is ready (for container health
/// checks in images without a shell or curl). Fails with the reason when it is not.
pub async fn probe(admin_addr: SocketAddr) -> anyhow::Result<()> {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::TokioExecutor;

    let host = if admin_addr.ip().is_unspecified() {
        "127.0.0.1".to_owned()
    } else {
        admin_addr.ip().to_string()
    };
    let uri = format!("http://{host}:{}/readyz", admin_addr.port());
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build_http::<Empty<axum::body::Bytes>>();
    let request = hyper::Request::get(&uri).body(Empty::new())?;
    let response = tokio::time::timeout(std::time::Duration::from_secs(3), client.request(request))
        .await
        .map_err(|_| anyhow::anyhow!("{uri} did not answer within 3s"))?
        .map_err(|e| anyhow::anyhow!("cannot reach {uri}: {e}"))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    if status.is_success() {
        Ok(())
    } else {
        anyhow::bail!(
            "{uri} answered {status}: {}",
            String::from_utf8_lossy(&body)
        )
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio_util::sync::CancellationToken;

    use super::*;

    /// With every one of the admin port's connections held idle, one more client's request
    /// waits unanswered instead of taking another file descriptor, and is answered once one
    /// of them closes; stopping then ends the server.
    #[tokio::test]
    async fn the_admin_port_holds_at_most_its_connection_limit() {
        let listener = bind("127.0.0.1:0".parse().expect("addr"), "ADMIN_LISTEN_ADDR")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stop = CancellationToken::new();
        let ready: Readiness = Arc::new(|| Ok(()));
        let task = spawn(listener, router(Registry::new(), ready), stop.clone());

        let mut held = Vec::new();
        for _ in 0..LIMITS.max_connections {
            held.push(TcpStream::connect(addr).await.expect("connect"));
        }
        let mut extra = TcpStream::connect(addr)
            .await
            .expect("the kernel queues it");
        extra
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("request");
        let mut answer = Vec::new();
        let waited =
            tokio::time::timeout(Duration::from_secs(1), extra.read_to_end(&mut answer)).await;
        assert!(waited.is_err(), "answered past the limit: {answer:?}");

        held.pop();
        tokio::time::timeout(Duration::from_secs(5), extra.read_to_end(&mut answer))
            .await
            .expect("answered once a connection closed")
            .expect("read");
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("ok"), "{answer}");

        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the server stops, closing the idle connections")
            .expect("task");
    }
}
