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

/// Serves `router` on `addr` until `shutdown` resolves.
pub async fn serve(
    addr: SocketAddr,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!("cannot listen on {addr} for the admin server: {e}; set ADMIN_LISTEN_ADDR")
    })?;
    tracing::info!(%addr, "Admin server listening (/metrics, /healthz, /readyz).");
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
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
