//! The public port's server: the router on HTTP/1.1 connections from hyper, with the limits on
//! connections themselves that `axum::serve` leaves unset (it gives hyper no timer, so hyper's
//! header timeout is off, and it accepts every connection it can).
//!
//! - At most `MAX_CONNECTIONS` connections are open at once, TLS handshakes included; further
//!   clients wait in the kernel's accept queue until one closes.
//! - A connection must bring a whole request head within `HEADER_READ_TIMEOUT` of opening or
//!   of its last answer (an idle keep-alive connection too), or it is closed; over TLS, the
//!   handshake must finish within that time first.
//! - A request head holds at most `MAX_HEADER_BYTES` (more gets 431), and hyper's read buffer
//!   stays within [`read_buffer_bytes`] a connection instead of its ~400 KB default.
//!
//! So slow, silent or idle clients hold at most `MAX_CONNECTIONS` small buffers, each for a
//! bounded time; the request body limits (`crate::http`) bound the rest.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::serve::Listener;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use prometheus::IntGauge;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::auth::Peer;
use crate::https::Https;
use crate::metrics::{ClosedConnections, Metrics};

/// Limits on client connections (see the module's documentation).
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
}

/// Open files ingest keeps for itself beside client connections: its broker connections, the
/// admin server and its clients, the trace exporter's connections, certificate and key files.
pub const RESERVED_FILES: u64 = 256;

/// Raises this process's soft limit on open files to its hard limit (as Go's runtime does at
/// start), then returns the connection limit that fits beside [`RESERVED_FILES`]: `wanted`, or
/// less, with a warning that says what to change. Without this, client connections past the
/// limit take every file descriptor: accept fails (EMFILE), and the admin port stops
/// answering its probes and Prometheus.
pub fn fit_open_files(wanted: usize) -> anyhow::Result<usize> {
    let soft = rlimit::increase_nofile_limit(u64::MAX)
        .map_err(|e| anyhow::anyhow!("cannot read the limit on open files (RLIMIT_NOFILE): {e}"))?;
    let fitted = fit(wanted, soft)?;
    if fitted < wanted {
        tracing::warn!(
            max_connections = wanted,
            serving = fitted,
            open_file_limit = soft,
            "MAX_CONNECTIONS does not fit the limit on open files beside the {RESERVED_FILES} \
             ingest keeps for itself; serving at most {fitted} connections. Raise the limit \
             (ulimit -n, the container runtime's nofile) or lower MAX_CONNECTIONS."
        );
    }
    Ok(fitted)
}

/// `wanted` connections, or as many as fit `open_file_limit` beside [`RESERVED_FILES`].
fn fit(wanted: usize, open_file_limit: u64) -> anyhow::Result<usize> {
    let room = open_file_limit.saturating_sub(RESERVED_FILES);
    anyhow::ensure!(
        room > 0,
        "this process may open only {open_file_limit} files (RLIMIT_NOFILE, hard limit \
         included), and ingest keeps {RESERVED_FILES} for itself: no client connection would \
         fit. Raise the limit (ulimit -n, the container runtime's nofile) to at least \
         {RESERVED_FILES} + MAX_CONNECTIONS ({})",
        RESERVED_FILES + wanted as u64
    );
    Ok(wanted.min(usize::try_from(room).unwrap_or(usize::MAX)))
}

/// hyper's read buffer a connection, at most: a whole request head must fit in it, and body
/// bytes pass through it in pieces of up to its size.
fn read_buffer_bytes(limits: &ConnectionLimits) -> usize {
    (limits.max_header_bytes + 8 * 1024).max(64 * 1024)
}

/// Serves `app` on `listener` (over TLS with `https`) until `stop`, then stops accepting,
/// lets each connection finish the request it is in, and returns once all are closed.
pub async fn serve(
    mut listener: TcpListener,
    https: Option<Arc<Https>>,
    app: Router,
    limits: ConnectionLimits,
    metrics: Metrics,
    stop: CancellationToken,
) {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_header_size(limits.max_header_bytes)
        .max_buf_size(read_buffer_bytes(&limits));
    let http = Arc::new(http);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    metrics
        .connections_limit
        .set(i64::try_from(limits.max_connections).unwrap_or(i64::MAX));
    let graceful = GracefulShutdown::new();
    loop {
        let slot = tokio::select! {
            () = stop.cancelled() => break,
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
        };
        // axum's accept retries after errors such as running out of file descriptors.
        let (tcp, peer) = tokio::select! {
            () = stop.cancelled() => break,
            accepted = Listener::accept(&mut listener) => accepted,
        };
        let connection = Connection {
            peer,
            app: app.clone(),
            http: http.clone(),
            closed: metrics.connections_closed.clone(),
            watcher: graceful.watcher(),
            _open: Open::new(slot, &metrics.connections),
        };
        // Two kinds of task, so a plain connection's task is not sized for a TLS handshake.
        match &https {
            None => {
                tokio::spawn(connection.serve(tcp));
            }
            Some(https) => {
                let timeout = limits.header_read_timeout;
                tokio::spawn(connection.serve_tls(https.clone(), tcp, timeout));
            }
        }
    }
    drop(listener);
    graceful.shutdown().await;
}

/// One accepted connection and what serving it needs.
struct Connection {
    peer: SocketAddr,
    app: Router,
    http: Arc<http1::Builder>,
    closed: ClosedConnections,
    watcher: hyper_util::server::graceful::Watcher,
    _open: Open,
}

/// A connection's slot, and its count in `dedup_ingest_connections`, until it is dropped.
struct Open {
    _slot: OwnedSemaphorePermit,
    gauge: IntGauge,
}

impl Open {
    fn new(slot: OwnedSemaphorePermit, gauge: &IntGauge) -> Self {
        gauge.inc();
        Self {
            _slot: slot,
            gauge: gauge.clone(),
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

impl Connection {
    async fn serve_tls(self, https: Arc<Https>, tcp: TcpStream, handshake_timeout: Duration) {
        match https.handshake(tcp, self.peer, handshake_timeout).await {
            Some(tls) => self.serve(tls).await,
            None => self.closed.tls_handshake.inc(),
        }
    }

    async fn serve<Io>(self, io: Io)
    where
        Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (app, peer) = (self.app, self.peer);
        let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            let mut request = request.map(axum::body::Body::new);
            request.extensions_mut().insert(ConnectInfo(Peer(peer)));
            app.clone().oneshot(request)
        });
        let served = self
            .watcher
            .watch(self.http.serve_connection(TokioIo::new(io), service))
            .await;
        if let Err(e) = served {
            if e.is_timeout() {
                self.closed.header_timeout.inc();
            } else if e.is_parse_too_large() {
                self.closed.header_too_large.inc();
            }
            tracing::debug!(%peer, error = %e, "Connection closed.");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_fit_beside_the_reserved_files() {
        assert_eq!(fit(4096, 1_048_576).unwrap(), 4096);
        assert_eq!(fit(4096, 4096 + RESERVED_FILES).unwrap(), 4096);
        assert_eq!(fit(4096, 1024).unwrap(), 1024 - 256);
        assert_eq!(fit(10, RESERVED_FILES + 1).unwrap(), 1);
        let error = fit(4096, RESERVED_FILES).unwrap_err().to_string();
        assert!(error.contains("RLIMIT_NOFILE"), "{error}");
        assert!(
            error.contains("at least 256 + MAX_CONNECTIONS (4352)"),
            "{error}"
        );
    }
}
