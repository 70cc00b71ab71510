//! ingest: the HTTP front door of the dedup pipeline.
//!
//! It validates product events with the original service's contract and publishes them to
//! RabbitMQ, answering `202` only once the broker has confirmed each message.
//!
//! # Layout
//!
//! - [`config`]: settings (flags, environment, YAML).
//! - [`http`]: the router: routes, limits, timeouts, request metrics.
//! - [`server`]: the public port's connections: their number, header timeout and size.
//! - [`auth`]: write keys and rate limits.
//! - [`body`]: reading bodies: content types, JSON, NDJSON batches.
//! - [`coalesce`]: packing concurrent single events into shared messages.
//! - [`publish`]: the broker connection, confirm-mode channels, reconnection.
//! - [`error`]: every outcome a client can see, as HTTP answers.
//! - [`metrics`]: Prometheus metrics.
//! - `tests`: ingest's tests against the real broker.

mod auth;
// The fuzz targets (cargo-fuzz builds with `--cfg fuzzing`) split batch bodies.
#[cfg(fuzzing)]
pub mod body;
#[cfg(not(fuzzing))]
mod body;
mod coalesce;
pub mod config;
mod error;
mod http;
mod https;
mod metrics;
mod publish;
mod server;

use std::sync::Arc;

use dedup_runtime::admin::{self, Readiness};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::auth::{Guard, GuardSettings, Rate};
use crate::coalesce::{CoalesceSettings, Coalescer};
pub use crate::config::Config;
use crate::http::{AppState, Limits};
use crate::metrics::Metrics;
use crate::publish::{Publisher, PublisherConfig};

/// Binds the configured addresses and serves until `shutdown` resolves.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = admin::bind(config.listen_addr, "LISTEN_ADDR").await?;
    let admin_listener = admin::bind(config.admin_listen_addr, "ADMIN_LISTEN_ADDR").await?;
    serve(config, listener, admin_listener, shutdown).await
}

/// Serves the public API and the admin server on the given listeners until `shutdown`
/// resolves, then drains in-flight requests for at most the configured grace period.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    admin_listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    config.check()?;
    let mut connections = connection_limits(&config);
    connections.max_connections = server::fit_open_files(connections.max_connections)?;
    let metrics = Metrics::new();
    let guard = Guard::new(guard_settings(&config), &metrics)?;
    // Loaded before anything connects: a bad certificate stops ingest at once.
    let https = cert_files(&config)
        .map(https::Https::new)
        .transpose()?
        .map(Arc::new);
    let publisher = Publisher::new(publisher_config(&config), metrics.clone());
    let stop_publisher = CancellationToken::new();
    let supervisor = tokio::spawn(publisher.clone().supervise(stop_publisher.clone()));
    let ready = readiness(&publisher);
    let coalescer = Coalescer::start(
        publisher.clone(),
        &coalesce_settings(&config),
        &stop_publisher,
    );
    let state = AppState {
        guard: guard.clone(),
        publisher,
        coalescer,
        limits: Arc::new(limits(&config)),
        metrics: metrics.clone(),
        ready: ready.clone(),
        body_bytes: body_gate(&config),
        batch_bytes: batch_gate(&config),
    };

    let stop = CancellationToken::new();
    tokio::spawn({
        let stop = stop.clone();
        async move {
            shutdown.await;
            stop.cancel();
        }
    });
    let scheme = if https.is_some() { "https" } else { "http" };
    tracing::info!(addr = %listener.local_addr()?, scheme, "ingest listening on /product_events/.");
    let admin_router = admin::router(metrics.registry.clone(), ready);
    let admin_task = admin::spawn(admin_listener, admin_router, stop.clone());
    let watcher = tokio::spawn(guard.watch(stop.clone()));
    if let Some(https) = &https {
        tokio::spawn(
            https
                .clone()
                .watch(config.tls_reload_interval, stop.clone()),
        );
    }
    let server = server::serve(
        listener,
        https,
        http::app(state),
        connections,
        metrics.clone(),
        stop.clone(),
    );
    let grace = config.shutdown_grace;
    tokio::select! {
        () = server => {}
        () = async { stop.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(?grace, "Shutdown grace period ran out; closing with requests still in flight.");
        }
    }
    stop_publisher.cancel();
    let _ = supervisor.await;
    admin_task.abort();
    watcher.abort();
    tracing::info!("ingest stopped.");
    Ok(())
}

fn readiness(publisher: &Arc<Publisher>) -> Readiness {
    let publisher = publisher.clone();
    Arc::new(move || {
        if publisher.is_connected() {
            Ok(())
        } else {
            Err("not connected to RabbitMQ".to_owned())
        }
    })
}

/// The publisher settings in `config`.
pub fn publisher_config(config: &Config) -> PublisherConfig {
    PublisherConfig {
        url: config.amqp.rabbitmq_url.clone(),
        // Checked readable at start (Config::check).
        ca_pem: config.tls.ca_pem().ok().flatten(),
        topology: config.amqp.topology.clone(),
        channels: config.publish_channels,
        max_in_flight: config.max_in_flight_publishes,
        confirm_timeout: config.confirm_timeout,
        reconnect_max_backoff: config.reconnect_max_backoff,
        compression: config.message_compression,
    }
}

/// The certificate files, when ingest serves HTTPS.
fn cert_files(config: &Config) -> Option<https::CertFiles> {
    Some(https::CertFiles {
        cert: config.tls_cert_file.clone()?,
        key: config.tls_key_file.clone()?,
    })
}

/// A new write key for `source` and its entry for the key file.
pub fn new_write_key(source: &str) -> anyhow::Result<(String, String)> {
    auth::new_key(source)
}

/// Who may send events, and how fast, in `config`.
pub(crate) fn guard_settings(config: &Config) -> GuardSettings {
    GuardSettings {
        mode: config.auth,
        keys_path: config.write_keys_path.clone(),
        reload_interval: config.write_keys_reload_interval,
        key_rate: Rate {
            per_second: config.rate_limit,
            burst: config.rate_limit_burst,
        },
        address_rate: Rate {
            per_second: config.address_rate_limit,
            burst: config.address_rate_limit_burst,
        },
        trusted_proxies: config.trusted_proxies.clone(),
    }
}

/// The packing settings in `config`.
pub fn coalesce_settings(config: &Config) -> CoalesceSettings {
    CoalesceSettings {
        max_events: config.max_events_per_message,
        flushers: config.coalesce_flushers,
        shards: config.amqp.topology.shards,
        timeout: config.confirm_timeout + std::time::Duration::from_secs(1),
    }
}

/// The gate on single-event bodies in flight.
pub fn body_gate(config: &Config) -> Arc<tokio::sync::Semaphore> {
    Arc::new(tokio::sync::Semaphore::new(
        http::kib_permits(config.max_body_bytes_in_flight) as usize,
    ))
}

/// The gate on batch bodies in flight.
pub fn batch_gate(config: &Config) -> Arc<tokio::sync::Semaphore> {
    Arc::new(tokio::sync::Semaphore::new(
        http::kib_permits(config.max_batch_bytes_in_flight) as usize,
    ))
}

/// The limits on client connections in `config`.
fn connection_limits(config: &Config) -> server::ConnectionLimits {
    server::ConnectionLimits {
        max_connections: config.max_connections,
        header_read_timeout: config.header_read_timeout,
        max_header_bytes: config.max_header_bytes,
    }
}

/// The request limits in `config`.
pub fn limits(config: &Config) -> Limits {
    Limits {
        max_body_bytes: config.max_body_bytes,
        max_batch_body_bytes: config.max_batch_body_bytes,
        max_batch_events: config.max_batch_events,
        max_events_per_message: config.max_events_per_message,
        window: dedup_event::event::Window {
            max_age: config.event_max_age,
            max_future: config.event_max_future,
        },
        // Checked valid at start (Config::check).
        key: config.key_spec().unwrap_or_default(),
        shards: config.amqp.topology.shards,
        request_timeout: config.request_timeout,
        retry_after: config.retry_after,
    }
}

#[cfg(test)]
mod tests;
