//! The workers of `capstan demo` (and the built-in ones of `capstan dev`), running in process
//! over the in-memory broker: deployers with certification labels, testers, a quality gate and a
//! releaser. Each demo task sleeps for its `sleepMs` property; `failAttempts: N` makes its first N
//! attempts fail with a retryable error.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use capstan_brokers::Broker;
use capstan_workers::{BidTerms, EchoWorker, Handler, Outcome, ShellWorker, TaskContext, Worker, WorkerConfig};
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::warn;

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
