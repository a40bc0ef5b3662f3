//! `capstan dev`: the embedded engine as a long-running process (SQLite in a folder, in-memory
//! broker, built-in workers) serving the same gRPC and HTTP APIs as `capstan server` on loopback,
//! without auth; it resumes unfinished runs at start and shuts down gracefully on SIGTERM or Ctrl-C.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use capstan_brokers::memory::MemoryBroker;
use capstan_store::Store;
use tokio::sync::watch;

use super::demo_workers;
use crate::api::auth::Auth;
use crate::api::{Api, ApiServer};
use crate::config::Limits;
use crate::runtime::{Runtime, RuntimeConfig, SystemClock};

/// Arguments of `capstan dev`.
#[derive(Debug, clap::Args)]
pub struct DevArgs {
    /// Folder for the SQLite database.
    #[arg(long, default_value = ".capstan")]
    pub data: PathBuf,
    /// Apply these definition files to the project at start.
    #[arg(long = "apply", short = 'f')]
    pub apply: Vec<PathBuf>,
    /// The project the applied definitions belong to.
    #[arg(long, default_value = "default")]
    pub project: String,
    /// gRPC address (loopback; port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:7233")]
    pub grpc_addr: SocketAddr,
    /// HTTP address (loopback; port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub http_addr: SocketAddr,
}

/// Runs until SIGTERM / Ctrl-C.
pub async fn run(args: DevArgs) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(&args.data).with_context(|| format!("cannot create {}", args.data.display()))?;
    let db = args.data.join("capstan.db");
    let store: Arc<dyn Store> = Arc::new(
        capstan_store::sqlite::SqliteStore::open(&db).await.with_context(|| format!("cannot open {}", db.display()))?,
    );
    let broker = Arc::new(MemoryBroker::new());
    let runtime = Runtime::start(RuntimeConfig::default(), store.clone(), broker.clone(), Arc::new(SystemClock))
        .await
        .context("cannot start the runtime")?;
    for file in &args.apply {
        let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
        let (name, version) = runtime.apply_definition(&args.project, &text).await?;
        println!("applied {name} v{version} to project {}", args.project);
    }
    // Without auth, the APIs must not be reachable from other machines.
    anyhow::ensure!(
        args.grpc_addr.ip().is_loopback() && args.http_addr.ip().is_loopback(),
        "capstan dev runs without auth and listens on loopback only; use capstan server for other addresses"
    );
    let (stop, stop_rx) = watch::channel(false);
    let workers = demo_workers::spawn_builtin(broker.clone(), stop_rx);
    let unfinished = store.unfinished_runs().await?.len();
    let api = Api { runtime: runtime.clone(), auth: Auth::disabled(), limits: Limits::default() };
    let server = ApiServer::start(api, args.grpc_addr, args.http_addr, None).await?;
    println!("capstan dev: embedded engine, SQLite at {}, in-memory broker", db.display());
    println!("auth: off (no tokens needed; loopback only)");
    println!("resumed {unfinished} unfinished run(s)");
    println!("grpc: {}", server.grpc_addr());
    println!("http: {}", server.http_addr());
    println!("ready; Ctrl-C or SIGTERM stops");
    wait_for_signal().await;
    println!("shutting down: no new requests; finishing the open batch");
    server.stop().await;
    let _ = stop.send(true);
    runtime.shutdown().await;
    for w in workers {
        let _ = tokio::time::timeout(Duration::from_secs(2), w).await;
    }
    Ok(ExitCode::SUCCESS)
}

/// Waits for SIGTERM or Ctrl-C.
pub(super) async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
