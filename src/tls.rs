//! TLS on the public listener (`--tls-cert`, `--tls-key`, PROTOCOL.md
//! section 10): the certificate chain and key, read at start and again on
//! SIGHUP for new connections. A reload that fails keeps the pair in use.
//!
//! The rest of the server reads and writes plain `TcpStream`s (the writer
//! batches frames into one `sendmsg`), so a TLS connection is terminated
//! here and its plaintext relayed to the server over a private loopback
//! listener: the one extra hop is the price of leaving the hot path as it is
//! (docs/BENCHMARKS.md measures it).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

/// Why a certificate pair cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the certificate chain {path}: {reason}")]
    Certificate { path: String, reason: String },
    #[error("cannot read the private key {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("the certificate and key do not make a usable pair: {0}")]
    Pair(String),
}

/// The pair in use, swapped whole on reload.
#[derive(Debug)]
struct Resolver {
    current: ArcSwap<CertifiedKey>,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// The listener's TLS: an acceptor, and the files to read again on reload.
pub struct Tls {
    resolver: Arc<Resolver>,
    acceptor: TlsAcceptor,
    cert: PathBuf,
    key: PathBuf,
}

impl Tls {
    /// Reads both files; fails the start when they are not a usable pair.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let resolver = Arc::new(Resolver { current: ArcSwap::from_pointee(read_pair(cert, key)?) });
        let mut config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Pair(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(config));
        Ok(Self { resolver, acceptor, cert: cert.to_owned(), key: key.to_owned() })
    }

    pub fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }

    /// Reads both files again; new connections get the new pair. On error
    /// the pair in use stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let pair = read_pair(&self.cert, &self.key)?;
        self.resolver.current.store(Arc::new(pair));
        Ok(())
    }
}

fn read_pair(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let cert_error = |reason: String| TlsError::Certificate { path: cert.display().to_string(), reason };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| cert_error(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| cert_error(e.to_string()))?;
    if chain.is_empty() {
        return Err(cert_error("no certificate in it".into()));
    }
    let private = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| TlsError::Key { path: key.display().to_string(), reason: e.to_string() })?;
    let provider = ring::default_provider();
    let signing = provider.key_provider.load_private_key(private).map_err(|e| TlsError::Pair(e.to_string()))?;
    let pair = CertifiedKey::new(chain, signing);
    pair.keys_match().map_err(|e| TlsError::Pair(e.to_string()))?;
    Ok(pair)
}
