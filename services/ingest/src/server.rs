//! The public port's server: the router on hyper's HTTP/1.1 connections through
//! [`dedup_runtime::serve`], over TLS when ingest serves HTTPS, with the limits on connections
//! from the configuration:
//!
//! - at most `MAX_CONNECTIONS` connections are open at once, TLS handshakes included; further
//!   clients wait in the kernel's accept queue until one closes;
//! - a connection must bring a whole request head within `HEADER_READ_TIMEOUT` of opening or
//!   of its last answer (an idle keep-alive connection too), or it is closed; over TLS, the
//!   handshake must finish within that time first;
//! - a request head holds at most `MAX_HEADER_BYTES` (more gets 431).
//!
//! So slow, silent or idle clients hold at most `MAX_CONNECTIONS` small buffers, each for a
//! bounded time; the request body limits (`crate::http`) bound the rest. And the connections
//! fit the process's limit on open files ([`fit_open_files`]), so they never take the file
//! descriptors the admin port and the broker need.

use std::sync::Arc;

use axum::Router;
pub use dedup_runtime::serve::ConnectionLimits;
use dedup_runtime::serve::{Closed, ConnectionEvents, Plain};
use prometheus::IntGauge;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::https::Https;
use crate::metrics::{ClosedConnections, Metrics};

/// Open files ingest keeps for itself beside client connections: its broker connections, the
/// admin server and its clients (at most `dedup_runtime::admin::LIMITS`' 64), the trace
/// exporter's connections, certificate and key files.
pub const RESERVED_FILES: u64 = 256;

/// Raises this process's soft limit on open files to its hard limit (as Go's runtime does at
/// start), then returns the connection limit that fits beside [`RESERVED_FILES`]: `wanted`, or
/// less, with a warning that says what to change. Without this, client connections past the
/// limit take every file descriptor: accept fails (EMFILE), and the admin port stops
/// answering its probes and Prometheus.
pub fn fit_open_files(wanted: usize) -> anyhow::Result<usize> {
    let soft = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(soft) => soft,
        // A sandbox may refuse the raise; the limit as it is still decides what fits.
        Err(e) => {
            let (soft, _) = rlimit::Resource::NOFILE.get().map_err(|e| {
                anyhow::anyhow!("cannot read the limit on open files (RLIMIT_NOFILE): {e}")
            })?;
            tracing::warn!(error = %e, open_file_limit = soft, "Cannot raise the soft limit on open files to the hard one; keeping it.");
            soft
        }
    };
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

/// Serves `app` on `listener` (over TLS with `https`) until `stop`, then stops accepting,
/// lets each connection finish the request it is in, and returns once all are closed.
pub async fn serve(
    listener: TcpListener,
    https: Option<Arc<Https>>,
    app: Router,
    limits: ConnectionLimits,
    metrics: Metrics,
    stop: CancellationToken,
) {
    let events = Connections {
        open: metrics.connections,
        limit: metrics.connections_limit,
        closed: metrics.connections_closed,
    };
    // Two instances of the server, so a plain connection's task is not sized for a TLS
    // handshake.
    match https {
        None => {
            dedup_runtime::serve::serve(listener, Arc::new(Plain), app, limits, events, stop).await
        }
        Some(https) => {
            dedup_runtime::serve::serve(listener, https, app, limits, events, stop).await
        }
    }
}

/// `dedup_ingest_connections`, `dedup_ingest_connections_limit` and
/// `dedup_ingest_connections_closed_total`.
#[derive(Clone)]
struct Connections {
    open: IntGauge,
    limit: IntGauge,
    closed: ClosedConnections,
}

impl ConnectionEvents for Connections {
    fn limit(&self, max_connections: usize) {
        self.limit
            .set(i64::try_from(max_connections).unwrap_or(i64::MAX));
    }

    fn opened(&self) {
        self.open.inc();
    }

    fn gone(&self) {
        self.open.dec();
    }

    fn closed(&self, why: Closed) {
        match why {
            Closed::HeaderTimeout => self.closed.header_timeout.inc(),
            Closed::HeaderTooLarge => self.closed.header_too_large.inc(),
            Closed::Handshake => self.closed.tls_handshake.inc(),
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
