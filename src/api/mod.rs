//! The server's APIs: gRPC (`capstan.v1`, with health and reflection) and HTTP (CloudEvents
//! intake, health) on their own ports, both over the same [`Api`] operations and access policy.
//! Error mapping to gRPC and HTTP codes lives only here ([`error`]).
//!
//! Config -> Service -> Handle: [`ApiServer::start`] binds both listeners (so the addresses are
//! known, even with port 0), serves them, and returns a handle whose [`ApiServer::stop`] stops
//! intake gracefully.

pub mod auth;
mod convert;
pub mod error;
mod events;
pub mod grpc;
pub mod http;
pub mod ops;
pub mod tls;
mod view;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::warn;

pub use convert::stored_event;
pub use error::ApiError;
pub use events::Published;
pub use ops::Api;

/// Why the API servers could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind { what: &'static str, addr: SocketAddr, source: std::io::Error },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("cannot build gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// The running gRPC and HTTP servers.
pub struct ApiServer {
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl ApiServer {
    /// Binds both addresses and serves `api` on them until [`ApiServer::stop`].
    pub async fn start(
        api: Api,
        grpc: SocketAddr,
        http: SocketAddr,
        tls: Option<&tls::TlsFiles>,
    ) -> Result<ApiServer, ServeError> {
        let tls = tls.map(tls::TlsMaterial::load).transpose().map_err(ServeError::Tls)?.map(Arc::new);
        let grpc_listener =
            TcpListener::bind(grpc).await.map_err(|source| ServeError::Bind { what: "gRPC", addr: grpc, source })?;
        let http_listener =
            TcpListener::bind(http).await.map_err(|source| ServeError::Bind { what: "HTTP", addr: http, source })?;
        let grpc_addr =
            grpc_listener.local_addr().map_err(|source| ServeError::Bind { what: "gRPC", addr: grpc, source })?;
        let http_addr =
            http_listener.local_addr().map_err(|source| ServeError::Bind { what: "HTTP", addr: http, source })?;
        let (stop, stop_rx) = watch::channel(false);
        let routes = grpc::Grpc::new(api.clone(), stop_rx.clone()).router()?;
        let stopped = |mut rx: watch::Receiver<bool>| async move {
            // The guard `wait_for` returns is not Send; keep only whether it happened.
            let _ = rx.wait_for(|s| *s).await.is_ok();
        };
        let mut builder = tonic::transport::Server::builder();
        if let Some(t) = &tls {
            builder = builder.tls_config(t.grpc()).map_err(|e| ServeError::Tls(e.to_string()))?;
        }
        let grpc_task = tokio::spawn({
            let stopped = stopped(stop_rx.clone());
            async move {
                let result = builder
                    .add_routes(routes)
                    // Without TCP_NODELAY a response written in several segments waits ~40 ms for the
                    // client's delayed ACK (Nagle); tonic sets it only on listeners it binds itself.
                    .serve_with_incoming_shutdown(
                        tonic::transport::server::TcpIncoming::from(grpc_listener).with_nodelay(Some(true)),
                        stopped,
                    )
                    .await;
                if let Err(e) = result {
                    warn!(error = %e, "gRPC server stopped with an error");
                }
            }
        });
        let http_task = tokio::spawn({
            let stopped = stopped(stop_rx);
            async move {
                match tls {
                    Some(t) => t.serve_http(http_listener, http::router(api), stopped).await,
                    None => {
                        let result =
                            axum::serve(http_listener, http::router(api)).with_graceful_shutdown(stopped).await;
                        if let Err(e) = result {
                            warn!(error = %e, "HTTP server stopped with an error");
                        }
                    }
                }
            }
        });
        Ok(ApiServer { grpc_addr, http_addr, stop, tasks: vec![grpc_task, http_task] })
    }

    /// The address gRPC listens on.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// The address HTTP listens on.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Stops accepting requests, ends watch streams and waits (a bounded time) for requests in
    /// flight to finish.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            if tokio::time::timeout(Duration::from_secs(10), t).await.is_err() {
                warn!("an API server did not stop within 10 s");
            }
        }
    }
}
