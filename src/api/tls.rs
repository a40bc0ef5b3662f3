//! TLS for both APIs from PEM certificate and key files: tonic's own rustls support for gRPC,
//! and a rustls accept loop in front of the HTTP router (axum's `serve` speaks plain TCP only).

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

/// Certificate chain and private key files (PEM) for TLS on gRPC and HTTP.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The loaded TLS material.
pub struct TlsMaterial {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    acceptor: TlsAcceptor,
}

impl TlsMaterial {
    /// Reads and checks the files; every problem names the file.
    pub fn load(files: &TlsFiles) -> Result<TlsMaterial, String> {
        let read = |p: &PathBuf| std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
        let cert_pem = read(&files.cert)?;
        let key_pem = read(&files.key)?;
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(&cert_pem)
                .collect::<Result<_, _>>()
                .map_err(|e| format!("{}: not a PEM certificate chain: {e}", files.cert.display()))?;
        if certs.is_empty() {
            return Err(format!("{}: no certificate in the file", files.cert.display()));
        }
        let key = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| format!("{}: not a PEM private key: {e}", files.key.display()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS versions: {e}"))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| {
                format!("{} and {} do not make a usable identity: {e}", files.cert.display(), files.key.display())
            })?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(TlsMaterial { cert_pem, key_pem, acceptor: TlsAcceptor::from(Arc::new(config)) })
    }

    /// tonic's server TLS configuration.
    pub fn grpc(&self) -> tonic::transport::ServerTlsConfig {
        tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(&self.cert_pem, &self.key_pem))
    }

    /// Serves `app` over TLS on `listener` until `stopped` completes.
    pub async fn serve_http(&self, listener: TcpListener, app: axum::Router, stopped: impl Future<Output = ()>) {
        tokio::pin!(stopped);
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(c) => c,
                    Err(e) => {
                        warn!(error = %e, "accepting an HTTPS connection failed");
                        continue;
                    }
                },
                _ = &mut stopped => return,
            };
            let acceptor = self.acceptor.clone();
            let app = app.clone();
            tokio::spawn(async move {
                let tls = match acceptor.accept(tcp).await {
                    Ok(s) => s,
                    Err(e) => {
                        debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                };
                let service = hyper_util::service::TowerToHyperService::new(app);
                let builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
                if let Err(e) = builder.serve_connection(hyper_util::rt::TokioIo::new(tls), service).await {
                    debug!(%peer, error = %e, "HTTPS connection ended with an error");
                }
            });
        }
    }
}
