//! The workers of `capstan demo` (and the built-in ones of `capstan dev`), running in process
//! over the in-memory broker: deployers with certification labels, testers, a quality gate and a
//! releaser. Each demo task sleeps for its `sleepMs` property; `failAttempts: N` makes its first N
//! attempts fail with a retryable error.
//!
//! Also the delivery workers of a `[workers]` configuration ([`delivery_workers`]): evaluation,
//! Prometheus and static SLI providers, webhook and get-action, for `capstan server` and
//! `capstan worker --kind`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use capstan_brokers::Broker;
use capstan_workers::{
    BidTerms, EchoWorker, EvaluationConfig, EvaluationWorker, GetActionConfig, GetActionWorker, Handler, Outcome,
    PrometheusConfig, PrometheusSliWorker, ScopedFiles, ShellWorker, SliProvider, StaticSliWorker, TaskContext,
    WebhookConfig, WebhookWorker, Worker, WorkerConfig,
};
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::warn;

use crate::config::{ScopedPaths, WorkersConfig};

/// The only deployer certified for production.
pub const PRODUCTION_DEPLOYER: &str = "deployer-prod";

/// The demo's tool: waits, maybe fails on purpose, passes.
struct DemoTool;

#[async_trait]
impl Handler for DemoTool {
    async fn handle(&self, task: TaskContext) -> Outcome {
        let sleep_ms = task.property("sleepMs").and_then(|v| v.as_u64()).unwrap_or(200);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(sleep_ms)) => {}
            _ = task.cancelled() => return Outcome::error("cancelled", "the engine cancelled the attempt"),
        }
        let fail_attempts = task.property("failAttempts").and_then(|v| v.as_u64()).unwrap_or(0);
        if u64::from(task.attempt()) <= fail_attempts {
            return Outcome::error("flaky", format!("attempt {} failed on purpose", task.attempt()));
        }
        let name = task.award().attempt.task.clone();
        Outcome::pass(json!({ name: { "worker": task.worker_id(), "attempt": task.attempt() } }))
    }
}

/// Starts every demo worker; they stop when `stop` turns true.
pub fn spawn_all(broker: Arc<dyn Broker>, stop: watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
    let certified = |id: &str, stage: &str| WorkerConfig::new(id, ["deployment"]).label("certified", stage).slots(4);
    let general = Worker::new(certified("deployer-general", "staging"), DemoTool).bid_with(|offer, free| {
        let wanted = offer.requires.get("certified");
        if wanted.is_some_and(|w| w != "staging") {
            // Capstan's protocol: a worker declines by not bidding.
            println!(
                "           deployer-general declines {}/{} {}: not certified for {}",
                offer.stage,
                offer.sequence,
                offer.attempt.task,
                wanted.map(String::as_str).unwrap_or("-")
            );
            return None;
        }
        Some(BidTerms { cost: f64::from(4 - free.min(4)), estimated_ms: 500 })
    });
    let workers = vec![
        general,
        Worker::new(certified(PRODUCTION_DEPLOYER, "production"), DemoTool),
        Worker::new(WorkerConfig::new("tester-1", ["test"]).slots(4), DemoTool),
        Worker::new(WorkerConfig::new("tester-2", ["test"]).slots(4), DemoTool),
        Worker::new(WorkerConfig::new("quality-gate", ["evaluation"]).slots(8), DemoTool),
        Worker::new(WorkerConfig::new("releaser", ["release"]).slots(8), DemoTool),
    ];
    workers.into_iter().map(|w| spawn(w, broker.clone(), stop.clone())).collect()
}

/// The built-in workers of `capstan dev`: `shell` runs commands, `echo` passes at once.
pub fn spawn_builtin(broker: Arc<dyn Broker>, stop: watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
    vec![
        spawn(
            Worker::new(WorkerConfig::new("shell-1", ["shell"]).slots(4), ShellWorker::new()),
            broker.clone(),
            stop.clone(),
        ),
        spawn(Worker::new(WorkerConfig::new("echo-1", ["echo"]).slots(64), EchoWorker::new()), broker, stop),
    ]
}

/// The kinds of delivery worker, as `capstan worker --kind` names them.
pub const DELIVERY_KINDS: [&str; 5] = ["evaluation", "prometheus", "static-sli", "webhook", "get-action"];

/// The delivery workers of a `[workers]` configuration, with ids `id(kind)`; only `kind`'s
/// when given.
pub fn delivery_workers(
    config: &WorkersConfig,
    id: impl Fn(&str) -> String,
    kind: Option<&str>,
) -> anyhow::Result<Vec<Worker>> {
    let wanted = |k: &str| kind.is_none_or(|w| w == k);
    let started_after = config.started_after().map_err(anyhow::Error::msg)?;
    let make = |k: &str, types: &[String]| {
        let id = id(k);
        let journal = config.journal_dir.as_ref().map(|d| d.join(format!("{id}.journal")));
        let worker = WorkerConfig::new(id, types.to_vec())
            .slots(config.slots)
            .bids_per_slot(config.bids_per_slot)
            .started_after(started_after);
        match journal {
            Some(path) => worker.journal(path),
            None => worker,
        }
    };
    let mut workers = Vec::new();
    let prometheus = match &config.prometheus {
        Some(p) => {
            let timeout = capstan_engine::parse_duration(&p.query_timeout).map_err(anyhow::Error::msg)?;
            let worker = PrometheusSliWorker::new(PrometheusConfig {
                sli_files: scoped(&p.sli),
                query_timeout: Duration::from_millis(timeout),
                ..PrometheusConfig::new(p.url.clone())
            })
            .context("[workers.prometheus]")?;
            if wanted("prometheus") {
                workers.push(Worker::new(make("prometheus", &p.types), worker.clone()));
            }
            Some(worker)
        }
        None => None,
    };
    if let Some(e) = &config.evaluation
        && wanted("evaluation")
    {
        let sli_provider = match config.sli_provider() {
            "prometheus" => prometheus.map(SliProvider::new),
            "static" => Some(SliProvider::new(StaticSliWorker::new())),
            _ => None,
        };
        let handler = EvaluationWorker::new(EvaluationConfig { slo_files: scoped(&e.slo), sli_provider });
        workers.push(Worker::new(make("evaluation", &e.types), handler));
    }
    if let Some(s) = &config.static_sli
        && wanted("static-sli")
    {
        workers.push(Worker::new(make("static-sli", &s.types), StaticSliWorker::new()));
    }
    if let Some(w) = &config.webhook
        && wanted("webhook")
    {
        let timeout = capstan_engine::parse_duration(&w.default_timeout).map_err(anyhow::Error::msg)?;
        let handler = WebhookWorker::with_config(WebhookConfig {
            allow_private: w.allow_private,
            allowed_hosts: w.allowed_hosts.clone(),
            max_response_bytes: w.max_response_bytes,
            default_timeout: Duration::from_millis(timeout),
            ..WebhookConfig::default()
        })
        .context("[workers.webhook]")?;
        workers.push(Worker::new(make("webhook", &w.types), handler));
    }
    if let Some(g) = &config.get_action
        && wanted("get-action")
    {
        let handler = GetActionWorker::new(GetActionConfig { remediation_files: scoped(&g.remediation) });
        workers.push(Worker::new(make("get-action", &g.types), handler));
    }
    for w in &workers {
        w.config().validate()?;
    }
    Ok(workers)
}

/// Starts the delivery workers of a `[workers]` configuration; they stop when `stop` turns true.
pub fn spawn_delivery(
    config: &WorkersConfig,
    prefix: &str,
    broker: Arc<dyn Broker>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let workers = delivery_workers(config, |kind| format!("{prefix}{kind}"), None)?;
    for w in &workers {
        tracing::info!(worker = %w.config().id, types = ?w.config().task_types, "delivery worker starting");
    }
    Ok(workers.into_iter().map(|w| spawn(w, broker.clone(), stop.clone())).collect())
}

fn scoped(paths: &ScopedPaths) -> ScopedFiles {
    paths.iter().fold(ScopedFiles::new(), |files, (key, path)| files.with(key.clone(), path.clone()))
}

fn spawn(worker: Worker, broker: Arc<dyn Broker>, mut stop: watch::Receiver<bool>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let id = worker.config().id.clone();
        let shutdown = async move {
            while !*stop.borrow_and_update() {
                if stop.changed().await.is_err() {
                    break;
                }
            }
        };
        if let Err(e) = worker.run(broker, shutdown).await {
            warn!(worker = %id, error = %e, "worker stopped");
        }
    })
}
