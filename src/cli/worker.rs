//! `capstan worker`: a worker as its own process over a real broker.
//!
//! `--kind evaluation|prometheus|static-sli|webhook|get-action` runs a built-in delivery
//! worker, configured by the `[workers.<kind>]` section of `--config FILE` (see
//! [`crate::config`]) and these flags on top: `--file KEY=PATH` (the kind's files: slo.yaml,
//! sli.yaml or remediation.yaml per scope key), `--prometheus-url`, `--sli-provider`,
//! `--allow-host`, `--allow-private`, `--types`.
//!
//! `--kind echo` (the default) is an echo-like worker for fault tests and trials. With `--ledger
//! FILE` it appends one JSON line per action (awarded, started, finished, cancelled) and fsyncs
//! it before going on, so a checker can compare what workers did with what the store recorded,
//! even after the worker was killed with SIGKILL.
//!
//! Each echo attempt sleeps `--delay-ms` (or the task's `sleepMs` property). A task property
//! `failAttempts: N` fails its first N attempts with a retryable error, and `stallAttempts: N`
//! makes its first N attempts sleep `stallMs` (default 3 s) so a start-to-close timeout fences
//! them off; their late `finished` must then be refused by the engine. `--answer-twice-every N`
//! (fault injection) sends every N-th `finished` a second time as a new CloudEvent, as a worker
//! that answers twice would; the engine must refuse the second answer.

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

use super::demo_workers::{DELIVERY_KINDS, delivery_workers};
use crate::backends;
use crate::config::{Config, WorkersConfig};

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
    /// What it does: echo (default) or a delivery worker: evaluation, prometheus, static-sli,
    /// webhook, get-action.
    #[arg(long, default_value = "echo")]
    pub kind: String,
    /// The task types it performs, comma-separated (required for echo; a delivery worker has
    /// its kind's default).
    #[arg(long, value_delimiter = ',')]
    pub types: Vec<String>,
    /// A configuration file whose `[workers.<kind>]` section configures a delivery worker.
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// KEY=PATH: the kind's file for a scope key (`project`, `project/stage`,
    /// `project/stage/service`): slo.yaml, sli.yaml or remediation.yaml. Repeatable.
    #[arg(long = "file", value_name = "KEY=PATH")]
    pub files: Vec<String>,
    /// Prometheus's base URL (kind prometheus, or an evaluation asking Prometheus).
    #[arg(long)]
    pub prometheus_url: Option<String>,
    /// Evaluation: who is asked for values an evaluation lacks: prometheus, static or none.
    #[arg(long)]
    pub sli_provider: Option<String>,
    /// Webhook: a host allowed even if it resolves to an internal address. Repeatable.
    #[arg(long = "allow-host")]
    pub allow_hosts: Vec<String>,
    /// Webhook: allow every target, loopback and private networks included.
    #[arg(long)]
    pub allow_private: bool,
    /// How many attempts it runs at once.
    #[arg(long, default_value_t = 4)]
    pub slots: u32,
    /// Auction bids it keeps open per slot (default 4; a delivery worker: its configuration's
    /// `bids_per_slot`).
    #[arg(long)]
    pub bids_per_slot: Option<u32>,
    /// Report `started` only for attempts still running after this many ms, saving a message
    /// per quick task (default 0: every start; a delivery worker: its configuration's
    /// `started_after`).
    #[arg(long, value_name = "MS")]
    pub started_after_ms: Option<u64>,
    /// How long each attempt takes unless the task's `sleepMs` says otherwise.
    #[arg(long, default_value_t = 50)]
    pub delay_ms: u64,
    /// Append one fsynced JSON line per action to this file.
    #[arg(long)]
    pub ledger: Option<PathBuf>,
    /// Record every award in this file before starting it, so that the worker, restarted with
    /// the same --id, never starts an award twice (one file per worker id).
    #[arg(long)]
    pub journal: Option<PathBuf>,
    /// Fault injection: send every N-th `finished` twice, the second time as a new CloudEvent.
    #[arg(long, hide = true)]
    pub answer_twice_every: Option<u64>,
    /// Share the broker with other deployments under this namespace (a topic prefix).
    #[arg(long)]
    pub namespace: Option<String>,
}

/// Runs until SIGTERM / Ctrl-C. A broker failure does not end it: the worker connects again,
/// as a supervised worker process would be restarted. A configuration the broker refuses (an
/// unknown kind, a NATS stream of the other storage) ends it at once with the reason.
pub async fn run(args: WorkerArgs) -> anyhow::Result<ExitCode> {
    let delivery = if args.kind == "echo" { None } else { Some(delivery_config(&args)?) };
    let ledger = match &args.ledger {
        Some(path) => Some(Ledger::open(path)?),
        None => None,
    };
    let handler = LedgerEcho { ledger: ledger.map(Arc::new), default_delay: Duration::from_millis(args.delay_ms) };
    let config = echo_config(&args);
    let types = match &delivery {
        // Built once here so that a bad configuration stops the process before it connects.
        Some(d) => one_delivery_worker(d, &args)?.config().task_types.join(","),
        None => {
            config.validate()?;
            args.types.join(",")
        }
    };
    let signal = super::dev::wait_for_signal();
    tokio::pin!(signal);
    println!("worker {} ({}) ready for {types}", args.id, args.kind);
    loop {
        let broker = match backends::connect_broker_in(&args.broker, &args.broker_url, args.namespace.as_deref()).await
        {
            Ok(b) => b,
            Err(e) if e.is_permanent() => return Err(e).context("cannot use the broker"),
            Err(e) => {
                warn!(error = %e, "cannot reach the broker; trying again");
                tokio::select! {
                    _ = &mut signal => return Ok(ExitCode::SUCCESS),
                    _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                }
            }
        };
        let broker: Arc<dyn capstan_brokers::Broker> = match args.answer_twice_every {
            Some(every) if every > 0 => Arc::new(AnswerTwice::new(broker, every)),
            _ => broker,
        };
        let worker = match &delivery {
            Some(d) => one_delivery_worker(d, &args)?,
            None => Worker::new(config.clone(), handler.clone()),
        };
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

/// The echo worker's configuration from the flags.
fn echo_config(args: &WorkerArgs) -> WorkerConfig {
    let mut config = WorkerConfig::new(args.id.clone(), args.types.clone()).slots(args.slots);
    config.journal = args.journal.clone();
    if let Some(bids) = args.bids_per_slot {
        config.bids_per_slot = bids;
    }
    if let Some(ms) = args.started_after_ms {
        config.started_after = Duration::from_millis(ms);
    }
    config
}

/// The `[workers]` configuration of a delivery worker: the file's section, then the flags.
fn delivery_config(args: &WorkerArgs) -> anyhow::Result<WorkersConfig> {
    anyhow::ensure!(
        DELIVERY_KINDS.contains(&args.kind.as_str()),
        "--kind {}: expected echo or one of {}",
        args.kind,
        DELIVERY_KINDS.join(", ")
    );
    let env: std::collections::HashMap<String, String> =
        std::env::vars().filter(|(k, _)| k.starts_with("CAPSTAN_")).collect();
    let mut config = Config::load(args.config.as_deref(), &env)?;
    let w = &mut config.workers;
    w.slots = args.slots;
    if let Some(bids) = args.bids_per_slot {
        w.bids_per_slot = bids;
    }
    if let Some(ms) = args.started_after_ms {
        w.started_after = format!("{ms}ms");
    }
    let mut files = crate::config::ScopedPaths::new();
    for f in &args.files {
        let (key, path) = f.split_once('=').with_context(|| format!("--file {f}: expected KEY=PATH"))?;
        files.insert(key.to_string(), PathBuf::from(path));
    }
    let types = |t: &mut Vec<String>| {
        if !args.types.is_empty() {
            t.clone_from(&args.types);
        }
    };
    if let Some(url) = &args.prometheus_url {
        w.prometheus.get_or_insert_with(Default::default).url.clone_from(url);
    }
    match args.kind.as_str() {
        "evaluation" => {
            let e = w.evaluation.get_or_insert_with(Default::default);
            e.slo.extend(files);
            types(&mut e.types);
            if args.sli_provider.is_some() {
                e.sli_provider.clone_from(&args.sli_provider);
            }
        }
        "prometheus" => {
            let p = w.prometheus.get_or_insert_with(Default::default);
            p.sli.extend(files);
            types(&mut p.types);
        }
        "static-sli" => types(&mut w.static_sli.get_or_insert_with(Default::default).types),
        "webhook" => {
            let h = w.webhook.get_or_insert_with(Default::default);
            h.allowed_hosts.extend(args.allow_hosts.iter().cloned());
            h.allow_private |= args.allow_private;
            types(&mut h.types);
        }
        _ => {
            let g = w.get_action.get_or_insert_with(Default::default);
            g.remediation.extend(files);
            types(&mut g.types);
        }
    }
    // Checked again: the flags may have changed what the file said.
    config.check()?;
    Ok(config.workers)
}

/// The one delivery worker `--kind` names, with the id `--id`.
fn one_delivery_worker(config: &WorkersConfig, args: &WorkerArgs) -> anyhow::Result<Worker> {
    let mut workers = delivery_workers(config, |_| args.id.clone(), Some(&args.kind))?;
    let worker = workers.pop().with_context(|| format!("no [workers] section configures a {} worker", args.kind))?;
    Ok(match &args.journal {
        Some(path) => worker.journal(path),
        None => worker,
    })
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

/// A worker that answers twice: every `every`-th `task.finished` goes out again as a new
/// CloudEvent (same attempt, token and result), which the engine must refuse.
struct AnswerTwice {
    inner: Arc<dyn capstan_brokers::Broker>,
    every: u64,
    finished: std::sync::atomic::AtomicU64,
}

impl AnswerTwice {
    fn new(inner: Arc<dyn capstan_brokers::Broker>, every: u64) -> Self {
        AnswerTwice { inner, every, finished: std::sync::atomic::AtomicU64::new(0) }
    }

    /// The messages, each `every`-th `task.finished` followed by its copy.
    fn doubled(&self, messages: Vec<capstan_brokers::Message>) -> Vec<capstan_brokers::Message> {
        let mut out = Vec::with_capacity(messages.len() + 1);
        for m in messages {
            let twice = m.event.ty == capstan_proto::types::TASK_FINISHED
                && (self.finished.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1).is_multiple_of(self.every);
            if twice {
                let mut again = m.clone();
                again.event.id = uuid::Uuid::now_v7().to_string();
                info!(id = %again.event.id, first = %m.event.id, "answered twice");
                out.push(m);
                out.push(again);
            } else {
                out.push(m);
            }
        }
        out
    }
}

#[async_trait]
impl capstan_brokers::Broker for AnswerTwice {
    async fn publish(&self, messages: Vec<capstan_brokers::Message>) -> capstan_brokers::Result<()> {
        self.inner.publish(self.doubled(messages)).await
    }

    fn packs(&self) -> bool {
        self.inner.packs()
    }

    async fn publish_packed(&self, messages: &[capstan_brokers::Message]) -> capstan_brokers::Result<()> {
        self.inner.publish_packed(&self.doubled(messages.to_vec())).await
    }

    async fn subscribe(
        &self,
        topic: &str,
        mode: capstan_brokers::SubscriptionMode,
    ) -> capstan_brokers::Result<Box<dyn capstan_brokers::Subscription>> {
        self.inner.subscribe(topic, mode).await
    }

    async fn subscribe_with_credit(
        &self,
        topic: &str,
        mode: capstan_brokers::SubscriptionMode,
        credit: capstan_brokers::Credit,
    ) -> capstan_brokers::Result<Box<dyn capstan_brokers::Subscription>> {
        self.inner.subscribe_with_credit(topic, mode, credit).await
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: WorkerArgs,
    }

    fn args(flags: &[&str]) -> WorkerArgs {
        Cli::parse_from(std::iter::once("worker").chain(flags.iter().copied())).args
    }

    /// `--bids-per-slot` and `--started-after-ms` reach the echo worker and a delivery worker;
    /// without them each keeps its default (the SDK's, or the `[workers]` section's).
    #[test]
    fn bids_and_started_after_reach_every_kind_of_worker() {
        let echo =
            echo_config(&args(&["--id", "w", "--types", "t", "--bids-per-slot", "2", "--started-after-ms", "20"]));
        assert_eq!((echo.bids_per_slot, echo.started_after), (2, Duration::from_millis(20)));
        let plain = echo_config(&args(&["--id", "w", "--types", "t"]));
        let defaults = WorkerConfig::new("w", ["t"]);
        assert_eq!((plain.bids_per_slot, plain.started_after), (defaults.bids_per_slot, defaults.started_after));

        let flags = ["--id", "w", "--kind", "static-sli", "--bids-per-slot", "3", "--started-after-ms", "25"];
        let delivery = args(&flags);
        let worker = one_delivery_worker(&delivery_config(&delivery).unwrap(), &delivery).unwrap();
        assert_eq!((worker.config().bids_per_slot, worker.config().started_after), (3, Duration::from_millis(25)));

        let zero = args(&["--id", "w", "--kind", "static-sli", "--bids-per-slot", "0"]);
        let err = delivery_config(&zero).unwrap_err().to_string();
        assert!(err.contains("bids_per_slot: must be at least 1"), "{err}");
    }
}
