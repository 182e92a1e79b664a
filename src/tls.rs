//! TLS (rustls, ring provider) for the HTTP and gRPC ports: the certificate and key come from
//! PEM files and are reloaded when the files change (cert-manager rotates them), without a
//! restart and without dropping open connections. Optional client-certificate verification
//! (mutual TLS) for the gRPC port.
//!
//! The reloading resolver is written here because rustls only offers a static certificate; it
//! is the `ResolvesServerCert` hook rustls provides for exactly this.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        self, RootCertStore, ServerConfig,
        crypto::CryptoProvider,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
        server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier},
        sign::CertifiedKey,
    },
};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {reason}")]
    Load { path: String, reason: String },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("client CA {path}: {reason}")]
    ClientCa { path: String, reason: String },
}

fn load_error(path: &Path, reason: impl std::fmt::Display) -> TlsError {
    TlsError::Load { path: path.display().to_string(), reason: reason.to_string() }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server certificate, reloaded from its files when they change.
#[derive(Debug)]
pub struct ReloadingCert {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
    /// Modification times of the two files when last loaded.
    loaded: RwLock<(Option<SystemTime>, Option<SystemTime>)>,
}

impl ReloadingCert {
    pub fn load(cert_file: PathBuf, key_file: PathBuf) -> Result<Arc<Self>, TlsError> {
        let key = Self::read(&cert_file, &key_file)?;
        let loaded = (crate::reload::modified(&cert_file), crate::reload::modified(&key_file));
        Ok(Arc::new(Self { cert_file, key_file, current: RwLock::new(key), loaded: RwLock::new(loaded) }))
    }

    fn read(cert_file: &Path, key_file: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
        let chain = CertificateDer::pem_file_iter(cert_file)
            .map_err(|e| load_error(cert_file, e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| load_error(cert_file, e))?;
        if chain.is_empty() {
            return Err(load_error(cert_file, "no certificate in the file"));
        }
        let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| load_error(key_file, e))?;
        let key = CertifiedKey::from_der(chain, key, &provider()).map_err(|e| load_error(key_file, e))?;
        Ok(Arc::new(key))
    }

    /// Reloads if either file changed. A file that cannot be used (half-written, mismatched)
    /// keeps the previous certificate in service and is logged; the next check retries.
    pub fn refresh(&self) {
        let now = (crate::reload::modified(&self.cert_file), crate::reload::modified(&self.key_file));
        if now == *self.loaded.read().unwrap_or_else(|e| e.into_inner()) {
            return;
        }
        match Self::read(&self.cert_file, &self.key_file) {
            Ok(key) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = key;
                *self.loaded.write().unwrap_or_else(|e| e.into_inner()) = now;
                tracing::info!(cert = %self.cert_file.display(), "TLS certificate reloaded");
            }
            Err(e) => tracing::error!(error = %e, "TLS certificate not reloaded; keeping the previous one"),
        }
    }

    /// Checks the files every `every` until `stop`, on a task of `tracker`.
    pub fn watch(self: &Arc<Self>, every: Duration, stop: &CancellationToken, tracker: &TaskTracker) {
        let this = self.clone();
        crate::reload::every(every, stop, tracker, move || this.refresh());
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

/// A TLS acceptor serving `cert`, offering `alpn` protocols, and, with `client_ca`, requiring
/// a client certificate signed by that CA.
pub fn acceptor(cert: Arc<ReloadingCert>, client_ca: Option<&Path>, alpn: &[&[u8]]) -> Result<TlsAcceptor, TlsError> {
    let builder = ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let ca_error = |reason: String| TlsError::ClientCa { path: path.display().to_string(), reason };
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(path).map_err(|e| ca_error(e.to_string()))? {
                roots.add(cert.map_err(|e| ca_error(e.to_string()))?).map_err(|e| ca_error(e.to_string()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| ca_error(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(cert);
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(TlsAcceptor::from(Arc::new(config)))
}
