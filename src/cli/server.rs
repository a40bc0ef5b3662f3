//! `capstan server --config capstan.toml`: the production process. Opens the configured store and
//! broker, starts the runtime and the gRPC and HTTP APIs, prints the addresses when ready, and on
//! SIGTERM stops intake first, then lets the runtime finish its batches.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use capstan_store::Store;
use tokio::sync::watch;
use tracing::warn;

use super::{demo_workers, dev};
use crate::api::auth::Auth;
use crate::api::{Api, ApiServer};
use crate::backends;
use crate::config::{AuthMode, Config, StoreConfig};
use crate::runtime::{Runtime, RuntimeConfig, SystemClock};

/// An input retention below this is shorter than some brokers' redelivery window can be.
const SHORT_RETENTION: Duration = Duration::from_secs(3_600);

/// Arguments of `capstan server`.
#[derive(Debug, clap::Args)]
pub struct ServerArgs {
    /// The TOML configuration; without it, defaults and CAPSTAN_* variables only.
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
}

/// Runs until SIGTERM / Ctrl-C.
pub async fn run(args: ServerArgs) -> anyhow::Result<ExitCode> {
    let env: HashMap<String, String> = std::env::vars().filter(|(k, _)| k.starts_with("CAPSTAN_")).collect();
    let config = Config::load(args.config.as_deref(), &env)?;
    let store = open_store(&config.store).await?;
    let broker = backends::connect_broker(&config.broker.kind, &config.broker.url)
        .await
        .with_context(|| format!("cannot connect to the {} broker", config.broker.kind))?;
    let input_retention = config.store.input_retention().map_err(anyhow::Error::msg)?;
    if input_retention.is_some_and(|r| r < SHORT_RETENTION) {
        warn!(
            "store.input_retention is under an hour: a redelivery arriving later is no longer dropped as a duplicate"
        );
    }
    let runtime_config = RuntimeConfig { input_retention, ..RuntimeConfig::default() };
    let runtime = Runtime::start(runtime_config, store, broker.clone(), Arc::new(SystemClock))
        .await
        .context("cannot start the runtime")?;
    let (stop_workers, stop_rx) = watch::channel(false);
    let mut workers =
        if config.builtin_workers { demo_workers::spawn_builtin(broker.clone(), stop_rx.clone()) } else { Vec::new() };
    // The delivery workers of [workers]; each process needs its own ids, so the host name
    // goes in front unless configured (a replica restarted on the same host takes its old
    // inboxes back).
    let prefix = config.workers.id_prefix.clone().unwrap_or_else(|| format!("{}-", host_name()));
    workers.extend(demo_workers::spawn_delivery(&config.workers, &prefix, broker, stop_rx)?);
    let auth = Auth::from_config(config.auth, &config.tokens);
    if config.auth == AuthMode::None {
        warn!("auth = \"none\": every caller may do everything; use only on a trusted network");
    } else if config.tokens.is_empty() {
        warn!("auth is on but no [[tokens]] are configured: every call will be refused");
    }
    let api = Api { runtime: runtime.clone(), auth, limits: config.limits };
    let server = ApiServer::start(api, config.listen.grpc, config.listen.http, config.tls.as_ref()).await?;
    println!("grpc: {}", server.grpc_addr());
    println!("http: {}", server.http_addr());
    println!("ready; SIGTERM or Ctrl-C stops");
    dev::wait_for_signal().await;
    // Whoever read stdout may be gone by now; a closed pipe must not stop the shutdown.
    let _ = writeln!(std::io::stdout(), "shutting down: no new requests; finishing the open batch");
    server.stop().await;
    let _ = stop_workers.send(true);
    for w in workers {
        let _ = tokio::time::timeout(Duration::from_secs(2), w).await;
    }
    runtime.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

/// The host name (`HOSTNAME`, else /etc/hostname), or `capstan`.
fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "capstan".into())
}

/// Opens the store; a PostgreSQL `schema` is created and used when configured.
async fn open_store(config: &StoreConfig) -> anyhow::Result<Arc<dyn Store>> {
    match &config.schema {
        Some(schema) => open_postgres_schema(&config.url, schema).await,
        None => {
            backends::open_store(&config.url).await.with_context(|| format!("cannot open the store {}", config.url))
        }
    }
}

#[cfg(feature = "postgres")]
async fn open_postgres_schema(url: &str, schema: &str) -> anyhow::Result<Arc<dyn Store>> {
    anyhow::ensure!(
        url.starts_with("postgres://") || url.starts_with("postgresql://"),
        "store.schema is for PostgreSQL only; the store URL is {url}"
    );
    let store = capstan_store::postgres::PostgresStore::connect_with_schema(url, schema)
        .await
        .with_context(|| format!("cannot open schema {schema} of {url}"))?;
    Ok(Arc::new(store))
}

#[cfg(not(feature = "postgres"))]
async fn open_postgres_schema(_: &str, _: &str) -> anyhow::Result<Arc<dyn Store>> {
    anyhow::bail!("this build has no PostgreSQL support (cargo feature `postgres`)")
}
