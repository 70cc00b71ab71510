//! HTTPS on the public port, for setups without a TLS-terminating Ingress (compose, a bare VM):
//! rustls with the certificate chain and key from PEM files, read again when they change, so
//! a renewed certificate (cert-manager, certbot) is served without a restart.
//!
//! Each handshake runs in its connection's own task (`crate::server`), bounded in time: one slow
//! or silent client never holds up the accept loop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

/// Where the certificate chain and its key are.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CertFiles {
    fn read(&self) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
        let read = |path: &Path, what: &str| {
            std::fs::read(path).with_context(|| format!("cannot read {what} {}", path.display()))
        };
        Ok((
            read(&self.cert, "TLS_CERT_FILE")?,
            read(&self.key, "TLS_KEY_FILE")?,
        ))
    }

    /// The certificate chain and key, checked to belong together.
    fn load(&self, cert: &[u8], key: &[u8]) -> anyhow::Result<CertifiedKey> {
        let chain = CertificateDer::pem_slice_iter(cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("{e:?}"))
            .with_context(|| format!("TLS_CERT_FILE {} is not PEM", self.cert.display()))?;
        anyhow::ensure!(
            !chain.is_empty(),
            "TLS_CERT_FILE {} holds no certificate",
            self.cert.display()
        );
        let key = PrivateKeyDer::from_pem_slice(key)
            .map_err(|e| anyhow::anyhow!("{e:?}"))
            .with_context(|| {
                format!(
                    "TLS_KEY_FILE {} holds no PEM private key",
                    self.key.display()
                )
            })?;
        let provider = rustls::crypto::ring::default_provider();
        let certified = CertifiedKey::from_der(chain, key, &provider).with_context(|| {
            format!(
                "TLS_KEY_FILE {} is not the key of the certificate in TLS_CERT_FILE {}",
                self.key.display(),
                self.cert.display()
            )
        })?;
        Ok(certified)
    }
}

/// The certificate every handshake gets: the last one that loaded.
#[derive(Debug)]
struct Current(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

/// Serves TLS with the certificate in `files`.
pub struct Https {
    files: CertFiles,
    current: Arc<Current>,
    acceptor: TlsAcceptor,
}

impl Https {
    /// Loads the certificate; an unreadable or mismatched pair is an error that says which.
    pub fn new(files: CertFiles) -> anyhow::Result<Self> {
        let (cert, key) = files.read()?;
        let current = Arc::new(Current(RwLock::new(Arc::new(files.load(&cert, &key)?))));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            files,
            current,
            acceptor: TlsAcceptor::from(Arc::new(config)),
        })
    }

    /// Re-reads the files every `interval` and serves a changed pair once it loads (a pair
    /// caught half-written is retried at the next look); until `stop`.
    pub async fn watch(self: Arc<Self>, interval: Duration, stop: CancellationToken) {
        let mut last = self.files.read().ok();
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let pair = match self.files.read() {
                Ok(pair) if last.as_ref() == Some(&pair) => continue,
                Ok(pair) => pair,
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "TLS certificate not reloaded; the one in use stays.");
                    continue;
                }
            };
            match self.files.load(&pair.0, &pair.1) {
                Ok(certified) => {
                    *self.current.0.write().unwrap_or_else(|e| e.into_inner()) =
                        Arc::new(certified);
                    tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded.");
                    last = Some(pair);
                }
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "TLS certificate not reloaded; the one in use stays.");
                }
            }
        }
    }
}

impl dedup_runtime::serve::Handshake for Https {
    type Io = TlsStream<TcpStream>;

    /// The TLS side of a connection from `peer`, once its handshake finished within `timeout`;
    /// `None` (logged) when it failed or took longer.
    async fn handshake(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        timeout: Duration,
    ) -> Option<TlsStream<TcpStream>> {
        match tokio::time::timeout(timeout, self.acceptor.accept(stream)).await {
            Ok(Ok(tls)) => Some(tls),
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "TLS handshake failed.");
                None
            }
            Err(_) => {
                tracing::debug!(%peer, "TLS handshake timed out.");
                None
            }
        }
    }
}
