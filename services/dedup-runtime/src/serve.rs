//! Serving a router on HTTP/1.1 connections from hyper, with the limits on connections
//! themselves that `axum::serve` leaves unset (it gives hyper no timer, so hyper's header
//! timeout is off, and it accepts every connection it can). ingest's public port and every
//! binary's admin port are served this way.
//!
//! - At most `max_connections` connections are open at once, handshakes included; further
//!   clients wait in the kernel's accept queue until one closes.
//! - A connection must bring a whole request head within `header_read_timeout` of opening or
//!   of its last answer (an idle keep-alive connection too), or it is closed; a handshake
//!   (TLS) must finish within that time first.
//! - A request head holds at most `max_header_bytes` (more gets 431), and hyper's read buffer
//!   stays within [`read_buffer_bytes`] a connection instead of its ~400 KB default.
//!
//! So slow, silent or idle clients hold at most `max_connections` small buffers, each for a
//! bounded time.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::serve::Listener;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// Limits on client connections (see the module's documentation).
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
}

/// Why a connection was closed before it was done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// No whole request head within the header timeout.
    HeaderTimeout,
    /// A request head past `max_header_bytes` (answered 431).
    HeaderTooLarge,
    /// The handshake failed or did not finish within the header timeout.
    Handshake,
}

/// What a server reports about its connections (metrics); `()` reports nothing.
pub trait ConnectionEvents: Clone + Send + Sync + 'static {
    /// The server's connection limit, once at start.
    fn limit(&self, _max_connections: usize) {}
    /// A connection was accepted.
    fn opened(&self) {}
    /// A connection is gone, however it ended.
    fn gone(&self) {}
    /// A connection was closed for `_why`, just before it is gone.
    fn closed(&self, _why: Closed) {}
}

impl ConnectionEvents for () {}

/// How a connection's bytes are reached once accepted: as they come (plain TCP), or after a
/// handshake (TLS), which gets `timeout` and answers `None` when it fails.
pub trait Handshake: Send + Sync + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    fn handshake(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
        timeout: Duration,
    ) -> impl Future<Output = Option<Self::Io>> + Send;
}

/// Plain TCP: no handshake.
pub struct Plain;

impl Handshake for Plain {
    type Io = TcpStream;

    async fn handshake(&self, tcp: TcpStream, _: SocketAddr, _: Duration) -> Option<TcpStream> {
        Some(tcp)
    }
}

/// hyper's read buffer a connection, at most: a whole request head must fit in it, and body
/// bytes pass through it in pieces of up to its size.
pub fn read_buffer_bytes(limits: &ConnectionLimits) -> usize {
    (limits.max_header_bytes + 8 * 1024).max(64 * 1024)
}

/// Serves `app` on `listener` until `stop`, each connection reached through `handshake`,
/// then stops accepting, lets each connection finish the request it is in, and returns once
/// all are closed. Requests carry the client's address as `ConnectInfo<SocketAddr>`.
pub async fn serve<H: Handshake, E: ConnectionEvents>(
    mut listener: TcpListener,
    handshake: Arc<H>,
    app: Router,
    limits: ConnectionLimits,
    events: E,
    stop: CancellationToken,
) {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_header_size(limits.max_header_bytes)
        .max_buf_size(read_buffer_bytes(&limits));
    let http = Arc::new(http);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    events.limit(limits.max_connections);
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
            watcher: graceful.watcher(),
            open: Open::new(slot, events.clone()),
        };
        let (handshake, timeout) = (handshake.clone(), limits.header_read_timeout);
        tokio::spawn(async move {
            match handshake.handshake(tcp, peer, timeout).await {
                Some(io) => connection.serve(io).await,
                None => connection.open.events.closed(Closed::Handshake),
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// One accepted connection and what serving it needs.
struct Connection<E: ConnectionEvents> {
    peer: SocketAddr,
    app: Router,
    http: Arc<http1::Builder>,
    watcher: Watcher,
    open: Open<E>,
}

/// A connection's slot, and its report, until it is dropped.
struct Open<E: ConnectionEvents> {
    _slot: OwnedSemaphorePermit,
    events: E,
}

impl<E: ConnectionEvents> Open<E> {
    fn new(slot: OwnedSemaphorePermit, events: E) -> Self {
        events.opened();
        Self {
            _slot: slot,
            events,
        }
    }
}

impl<E: ConnectionEvents> Drop for Open<E> {
    fn drop(&mut self) {
        self.events.gone();
    }
}

impl<E: ConnectionEvents> Connection<E> {
    async fn serve<Io>(self, io: Io)
    where
        Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (app, peer) = (self.app, self.peer);
        let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            let mut request = request.map(axum::body::Body::new);
            request.extensions_mut().insert(ConnectInfo(peer));
            app.clone().oneshot(request)
        });
        let served = self
            .watcher
            .watch(self.http.serve_connection(TokioIo::new(io), service))
            .await;
        if let Err(e) = served {
            if e.is_timeout() {
                self.open.events.closed(Closed::HeaderTimeout);
            } else if e.is_parse_too_large() {
                self.open.events.closed(Closed::HeaderTooLarge);
            }
            tracing::debug!(%peer, error = %e, "Connection closed.");
        }
    }
}
