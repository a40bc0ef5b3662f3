//! `capstan worker`: an echo-like worker as its own process over a real broker, for fault tests
//! and trials. With `--ledger FILE` it appends one JSON line per action (awarded, started,
//! finished, cancelled) and fsyncs it before going on, so a checker can compare what workers did
//! with what the store recorded, even after the worker was killed with SIGKILL.
//!
//! Each attempt sleeps `--delay-ms` (or the task's `sleepMs` property). A task property
//! `failAttempts: N` fails its first N attempts with a retryable error, and `stallAttempts: N`
//! makes its first N attempts sleep `stallMs` (default 3 s) so a start-to-close timeout fences
//! them off; their late `finished` must then be refused by the engine.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use async_trait::async_trait;
use capstan_workers::{Handler, Outcome, TaskContext, Worker, WorkerConfig};
use serde_json::json;
use tracing::{info, warn};

use crate::backends;

/// Arguments of `capstan worker`.
#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    /// The broker kind: nats, kafka or rabbitmq (memory makes no sense across processes).
    #[arg(long, default_value = "nats")]
    pub broker: String,
    /// The broker's address; empty for the kind's local default.
    #[arg(long, default_value = "")]
    pub broker_url: String,
    /// The worker id, unique among running workers (a restarted worker keeps its id).
    #[arg(long)]
    pub id: String,
    /// The task types it performs, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub types: Vec<String>,
    /// How many attempts it runs at once.
    #[arg(long, default_value_t = 4)]
    pub slots: u32,
    /// How long each attempt takes unless the task's `sleepMs` says otherwise.
    #[arg(long, default_value_t = 50)]
    pub delay_ms: u64,
    /// Append one fsynced JSON line per action to this file.
    #[arg(long)]
    pub ledger: Option<PathBuf>,
    /// Share the broker with other deployments under this namespace (a topic prefix).
    #[arg(long)]
    pub namespace: Option<String>,
}

/// Runs until SIGTERM / Ctrl-C. A broker failure does not end it: the worker connects again,
/// as a supervised worker process would be restarted.
pub async fn run(args: WorkerArgs) -> anyhow::Result<ExitCode> {
    let ledger = match &args.ledger {
        Some(path) => Some(Ledger::open(path)?),
        None => None,
    };
    let handler = LedgerEcho { ledger: ledger.map(Arc::new), default_delay: Duration::from_millis(args.delay_ms) };
    let config = WorkerConfig::new(args.id.clone(), args.types.clone()).slots(args.slots);
    config.validate()?;
    let signal = super::dev::wait_for_signal();
    tokio::pin!(signal);
    println!("worker {} ready for {}", args.id, args.types.join(","));
    loop {
        let broker = match backends::connect_broker_in(&args.broker, &args.broker_url, args.namespace.as_deref()).await
        {
            Ok(b) => b,
            Err(e) => {
                warn!(error = %e, "cannot reach the broker; trying again");
                tokio::select! {
                    _ = &mut signal => return Ok(ExitCode::SUCCESS),
                    _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                }
            }
        };
        let worker = Worker::new(config.clone(), handler.clone());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(worker.run(broker, async move {
            let _ = stop_rx.await;
        }));
        tokio::pin!(running);
        tokio::select! {
            _ = &mut signal => {
                let _ = stop_tx.send(());
                let _ = tokio::time::timeout(Duration::from_secs(6), &mut running).await;
                info!(worker = %args.id, "worker stopped");
                return Ok(ExitCode::SUCCESS);
            }
            ended = &mut running => {
                warn!(worker = %args.id, outcome = ?ended.map(|r| r.map_err(|e| e.to_string())), "worker loop ended; reconnecting");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    }
}

/// An append-only JSON-lines file, fsynced after every line.
struct Ledger {
    file: Mutex<File>,
}

impl Ledger {
    fn open(path: &Path) -> anyhow::Result<Ledger> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open the ledger {}", path.display()))?;
        Ok(Ledger { file: Mutex::new(file) })
    }

    /// Appends one action. A ledger that cannot be written makes the worker's evidence
    /// worthless, so the process stops rather than act without a record.
    fn record(&self, action: &str, task: &TaskContext, extra: serde_json::Value) {
        let a = &task.award().attempt;
        let at_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        let mut line = json!({
            "action": action,
            "worker": task.worker_id(),
            "project": a.project,
            "run": a.run_id,
            "task": a.task,
            "attempt": a.attempt,
            "token": task.award().token,
            "at_ms": at_ms,
        });
        if let (Some(line), serde_json::Value::Object(extra)) = (line.as_object_mut(), extra) {
            line.extend(extra);
        }
        let mut text = line.to_string();
        text.push('\n');
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = file.write_all(text.as_bytes()).and_then(|()| file.sync_data()) {
            tracing::error!(error = %e, "cannot write the ledger; stopping");
            std::process::exit(3);
        }
    }
}

/// Echoes after a delay, with deliberate failures and stalls, writing the ledger.
#[derive(Clone)]
struct LedgerEcho {
    ledger: Option<Arc<Ledger>>,
    default_delay: Duration,
}

impl LedgerEcho {
    fn record(&self, action: &str, task: &TaskContext, extra: serde_json::Value) {
        if let Some(ledger) = &self.ledger {
            ledger.record(action, task, extra);
        }
    }
}

#[async_trait]
impl Handler for LedgerEcho {
    async fn handle(&self, task: TaskContext) -> Outcome {
        // The SDK calls the handler once the award arrived and `started` was sent, so both
        // actions are recorded here, in that order.
        self.record("awarded", &task, json!({}));
        self.record("started", &task, json!({}));
        let attempt = u64::from(task.attempt());
        let number = |name: &str| task.property(name).and_then(|v| v.as_u64());
        let mut delay = number("sleepMs").map(Duration::from_millis).unwrap_or(self.default_delay);
        if attempt <= number("stallAttempts").unwrap_or(0) {
            delay = Duration::from_millis(number("stallMs").unwrap_or(3_000));
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = task.cancelled() => {
                self.record("cancelled", &task, json!({}));
                return Outcome::error("cancelled", "the engine cancelled the attempt");
            }
        }
        let outcome = if attempt <= number("failAttempts").unwrap_or(0) {
            Outcome::error("flaky", format!("attempt {attempt} fails on purpose"))
        } else {
            Outcome::pass(json!({ "echo": { "worker": task.worker_id(), "attempt": attempt } }))
        };
        let result = match &outcome {
            Outcome::Finished { result, .. } => result.as_str().to_string(),
            Outcome::Error(e) => format!("error:{}", e.kind),
        };
        // Written before the SDK sends `finished`: a kill in between leaves a ledger line the
        // store never saw, which the checker counts as a lost report, not a lost record.
        self.record("finished", &task, json!({ "result": result }));
        outcome
    }
}
