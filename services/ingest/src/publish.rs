//! Publishing to RabbitMQ with publisher confirms.
//!
//! One connection carries a few channels in confirm mode; every request publishes on the next
//! channel round-robin and awaits its own confirm, so thousands of requests share the channels
//! without waiting for each other. A supervisor task owns the connection: it connects with
//! backoff, declares the topology, and starts over when the connection drops.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use dedup_message::message::Envelope;
use dedup_message::topology::{
    SETUP_WAIT, Topology, close_channel, close_connection, describe_declare_error,
};
use dedup_runtime::backoff::Backoff;
use lapin::Confirmation;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{Channel, Connection};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Why a publish did not end in a broker confirm.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PublishError {
    #[error("the message broker is unreachable")]
    NotConnected,
    #[error("too many events are waiting for the broker ({0} in flight)")]
    Backpressure(usize),
    #[error("the message broker did not confirm within {0:?}")]
    ConfirmTimeout(Duration),
    #[error("the message broker refused the message")]
    Nacked,
    #[error("the message broker could not route the message to queue {0:?}")]
    Unroutable(String),
    #[error("the broker connection failed while publishing: {0}")]
    Connection(String),
}

/// Settings for [`Publisher`].
#[derive(Debug, Clone)]
pub struct PublisherConfig {
    pub url: dedup_runtime::secret::SecretUrl,
    /// `TLS_CA_FILE`'s PEM text, for `amqps://`.
    pub ca_pem: Option<String>,
    pub topology: Topology,
    pub channels: usize,
    pub max_in_flight: usize,
    pub confirm_timeout: Duration,
    pub reconnect_max_backoff: Duration,
    pub compression: dedup_message::message::Compression,
}

/// A live connection and its confirm-mode channels.
struct Link {
    connection: Connection,
    channels: Vec<Channel>,
}

impl Link {
    fn is_healthy(&self) -> bool {
        self.connection.status().connected() && self.channels.iter().all(|c| c.status().connected())
    }
}

/// Publishes event messages and reports whether the broker is reachable.
pub struct Publisher {
    config: PublisherConfig,
    /// The current link; `None` while (re)connecting. Requests clone the `Arc` and release the
    /// lock at once, so a reconnect never waits on a publish.
    link: RwLock<Option<Arc<Link>>>,
    /// Round-robin cursor over the channels.
    next_channel: AtomicUsize,
    /// Bounds publishes awaiting confirms: past it requests get 503 instead of queueing
    /// unboundedly in memory while the broker is slow (back-pressure).
    in_flight: Arc<Semaphore>,
    /// Woken by a publish that saw the connection fail, so the supervisor reconnects at once.
    broken: Notify,
    connected: AtomicBool,
    metrics: Metrics,
}

impl Publisher {
    pub fn new(config: PublisherConfig, metrics: Metrics) -> Arc<Self> {
        Arc::new(Self {
            in_flight: Arc::new(Semaphore::new(config.max_in_flight)),
            config,
            link: RwLock::new(None),
            next_channel: AtomicUsize::new(0),
            broken: Notify::new(),
            connected: AtomicBool::new(false),
            metrics,
        })
    }

    /// True while a connection with open channels is in place.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
            && self.current_link().is_some_and(|link| link.is_healthy())
    }

    /// Places taken among those allowed in flight: events waiting to be published or awaiting
    /// their confirm.
    #[cfg(test)]
    pub(crate) fn places_taken(&self) -> usize {
        self.config.max_in_flight - self.in_flight.available_permits()
    }

    /// Takes one place among the publishes allowed in flight, or fails with back-pressure.
    pub fn acquire(&self) -> Result<OwnedSemaphorePermit, PublishError> {
        self.in_flight
            .clone()
            .try_acquire_owned()
            .map_err(|_| PublishError::Backpressure(self.config.max_in_flight))
    }

    /// Publishes one message to queue shard `shard` and waits for the broker's confirm.
    pub async fn publish(&self, message: &Envelope, shard: u16) -> Result<(), PublishError> {
        let _permit = self.acquire()?;
        self.publish_unbounded(message, shard).await
    }

    /// [`Publisher::publish`] for a caller that already holds in-flight places.
    #[tracing::instrument(level = "debug", skip_all, fields(events = message.events()))]
    pub async fn publish_unbounded(
        &self,
        message: &Envelope,
        shard: u16,
    ) -> Result<(), PublishError> {
        let link = self.current_link().ok_or(PublishError::NotConnected)?;
        let (body, properties) = message.seal(self.config.compression);
        self.metrics.message_bytes.observe(body.len() as f64);
        let index = self.next_channel.fetch_add(1, Ordering::Relaxed) % link.channels.len();
        let channel = &link.channels[index];
        let topology = &self.config.topology;
        let started = Instant::now();
        self.metrics.publishes_in_flight.inc();
        let outcome = tokio::time::timeout(self.config.confirm_timeout, async {
            channel
                .basic_publish(
                    topology.exchange.as_str().into(),
                    topology.shard_routing_key(shard),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &body,
                    properties,
                )
                .await?
                .await
        })
        .await;
        self.metrics.publishes_in_flight.dec();
        self.metrics
            .publish_confirm_seconds
            .observe(started.elapsed().as_secs_f64());
        match outcome {
            Err(_) => Err(PublishError::ConfirmTimeout(self.config.confirm_timeout)),
            Ok(Err(e)) => {
                self.mark_broken();
                Err(PublishError::Connection(e.to_string()))
            }
            Ok(Ok(Confirmation::Ack(None))) => Ok(()),
            Ok(Ok(Confirmation::Ack(Some(_returned)))) => {
                Err(PublishError::Unroutable(topology.shard_queue(shard)))
            }
            Ok(Ok(Confirmation::Nack(_))) => Err(PublishError::Nacked),
            // Confirm mode is set on every channel before it is used.
            Ok(Ok(Confirmation::NotRequested)) => Ok(()),
        }
    }

    fn current_link(&self) -> Option<Arc<Link>> {
        self.link.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_link(&self, link: Option<Arc<Link>>) {
        self.connected.store(link.is_some(), Ordering::Relaxed);
        self.metrics.broker_connected.set(i64::from(link.is_some()));
        *self.link.write().unwrap_or_else(|e| e.into_inner()) = link;
    }

    fn mark_broken(&self) {
        self.broken.notify_one();
    }

    /// Keeps a connection up until `stop` is cancelled, then closes it. Run it as a task.
    pub async fn supervise(self: Arc<Self>, stop: CancellationToken) {
        let mut backoff = Backoff::new(self.config.reconnect_max_backoff);
        loop {
            let attempt = tokio::select! {
                () = stop.cancelled() => break,
                link = self.connect() => link,
            };
            match attempt {
                Ok(link) => {
                    backoff.reset();
                    tracing::info!(channels = link.channels.len(), "Connected to the broker.");
                    let link = Arc::new(link);
                    self.set_link(Some(link.clone()));
                    tokio::select! {
                        () = stop.cancelled() => {
                            self.set_link(None);
                            close_connection(&link.connection, 200, "ingest shutting down").await;
                            break;
                        }
                        () = self.wait_until_broken(&link) => {}
                    }
                    self.set_link(None);
                    close_connection(&link.connection, 320, "reconnecting").await;
                    tracing::warn!("Broker connection lost; reconnecting.");
                }
                Err(error) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %error, retry_in = ?delay, "Cannot connect to the broker; retrying.");
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    async fn connect(&self) -> Result<Link, String> {
        let connect = dedup_message::topology::connect(
            self.config.url.expose(),
            self.config.ca_pem.as_deref(),
        );
        let connection = tokio::time::timeout(SETUP_WAIT, connect)
            .await
            .map_err(|_| format!("connecting timed out after {SETUP_WAIT:?}"))?
            .map_err(|e| format!("{e}"))?;
        match tokio::time::timeout(SETUP_WAIT, self.set_up(&connection)).await {
            Ok(Ok(channels)) => Ok(Link {
                connection,
                channels,
            }),
            Ok(Err(e)) => {
                close_connection(&connection, 320, "setup failed").await;
                Err(e)
            }
            Err(_) => {
                close_connection(&connection, 320, "setup timed out").await;
                Err(format!(
                    "the broker accepted the connection but did not answer its setup (channels, \
                     declaring the queues) within {SETUP_WAIT:?}"
                ))
            }
        }
    }

    /// Declares the topology and opens the confirmed channels on a new `connection`.
    async fn set_up(&self, connection: &Connection) -> Result<Vec<Channel>, String> {
        let declare_channel = connection
            .create_channel()
            .await
            .map_err(|e| e.to_string())?;
        self.config
            .topology
            .declare(&declare_channel)
            .await
            .map_err(|e| describe_declare_error(&self.config.topology, &e))?;
        close_channel(&declare_channel, 200, "declared").await;
        let mut channels = Vec::with_capacity(self.config.channels.max(1));
        for _ in 0..self.config.channels.max(1) {
            let channel = connection
                .create_channel()
                .await
                .map_err(|e| e.to_string())?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(|e| e.to_string())?;
            channels.push(channel);
        }
        Ok(channels)
    }

    /// Returns once the connection or one of its channels is no longer usable.
    async fn wait_until_broken(&self, link: &Link) {
        loop {
            if !link.is_healthy() {
                return;
            }
            tokio::select! {
                () = self.broken.notified() => {}
                () = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
    }
}
