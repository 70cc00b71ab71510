//! TLS to the backends. Every client verifies the server's certificate against the system's
//! trusted roots plus, when `TLS_CA_FILE` names one, a PEM file of private CAs: one setting
//! for RabbitMQ (`amqps://`), its management API (`https://`), Redis (`rediss://`) and
//! PostgreSQL (`sslmode=verify-full`).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// The TLS setting shared by the binaries.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// PEM file of CA certificates trusted, besides the system's, for TLS connections to
    /// RabbitMQ (amqps://), its management API (https://), Redis (rediss://) and PostgreSQL
    /// (sslmode=verify-full). For backends whose certificates a private CA signed.
    #[arg(long, env = "TLS_CA_FILE")]
    pub tls_ca_file: Option<PathBuf>,
}

impl TlsArgs {
    /// The CA file's PEM text, checked to hold at least one certificate.
    pub fn ca_pem(&self) -> anyhow::Result<Option<String>> {
        let Some(path) = &self.tls_ca_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read TLS_CA_FILE {}", path.display()))?;
        let certs = ca_certificates(&text)
            .with_context(|| format!("TLS_CA_FILE {} is not PEM certificates", path.display()))?;
        anyhow::ensure!(
            !certs.is_empty(),
            "TLS_CA_FILE {} holds no certificate (expected -----BEGIN CERTIFICATE----- blocks)",
            path.display()
        );
        Ok(Some(text))
    }

    /// A rustls client configuration trusting the system's roots and the CA file.
    pub fn client_config(&self) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        let mut roots = rustls::RootCertStore::empty();
        // Certificates the system store holds but rustls cannot parse are skipped.
        let native = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(native.certs);
        if let Some(pem) = self.ca_pem()? {
            for cert in ca_certificates(&pem)? {
                roots
                    .add(cert)
                    .context("a certificate in TLS_CA_FILE is not a usable CA")?;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Arc::new(config))
    }
}

fn ca_certificates(pem: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("{e:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_file_must_hold_certificates() {
        let dir = std::env::temp_dir().join(format!("dedup-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let args = TlsArgs {
            tls_ca_file: Some(empty),
        };
        let error = format!("{:#}", args.ca_pem().unwrap_err());
        assert!(error.contains("holds no certificate"), "{error}");
        let missing = TlsArgs {
            tls_ca_file: Some(dir.join("missing.pem")),
        };
        let error = format!("{:#}", missing.client_config().unwrap_err());
        assert!(error.contains("cannot read TLS_CA_FILE"), "{error}");
        assert!(TlsArgs::default().client_config().is_ok());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
