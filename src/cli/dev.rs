//! `capstan dev`: the embedded engine as a long-running process (SQLite in a folder, in-memory
//! broker, built-in workers), resuming unfinished runs at start and shutting down gracefully on
//! SIGTERM or Ctrl-C.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use capstan_brokers::memory::MemoryBroker;
use capstan_store::Store;
use tokio::sync::watch;

use super::demo_workers;
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
    let (stop, stop_rx) = watch::channel(false);
    let workers = demo_workers::spawn_builtin(broker.clone(), stop_rx);
    let unfinished = store.unfinished_runs().await?.len();
    println!("capstan dev: embedded engine, SQLite at {}, in-memory broker", db.display());
    println!("resumed {unfinished} unfinished run(s)");
    println!("ready; Ctrl-C or SIGTERM stops");
    wait_for_signal().await;
    println!("shutting down: finishing the open batch");
    let _ = stop.send(true);
    runtime.shutdown().await;
    for w in workers {
        let _ = tokio::time::timeout(Duration::from_secs(2), w).await;
    }
    Ok(ExitCode::SUCCESS)
}

async fn wait_for_signal() {
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
