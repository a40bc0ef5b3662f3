//! `capstan demo`: the bundled delivery example on the embedded default (SQLite in a folder,
//! in-memory broker, built-in workers in the same process), with live progress and a summary.
//! Started again on the same folder after a crash, it resumes the unfinished runs.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use capstan_brokers::memory::MemoryBroker;
use capstan_engine::TaskResult;
use capstan_engine::run::{Event, RunStatus};
use capstan_store::{RunFilter, Store};
use serde_json::json;
use tokio::sync::watch;

use super::demo_workers;
use super::progress::{ProgressPrinter, short};
use crate::runtime::{Runtime, RuntimeConfig, SystemClock, TriggerRequest, codec};

/// The example definition, bundled into the binary.
pub const DEMO_SHIPYARD: &str = include_str!("../../examples/demo/shipyard.yaml");
/// The demo's project.
pub const DEMO_PROJECT: &str = "demo";

/// Arguments of `capstan demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Folder for the SQLite database (kept); default: a temporary folder (removed).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// How many services to deliver at once.
    #[arg(long, default_value_t = 1)]
    pub services: usize,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
}

/// What the demo saw happen, per run and task, read back from the event log.
#[derive(Default)]
struct Ledger {
    runs: BTreeMap<String, RunLine>,
}

#[derive(Default, Clone)]
struct RunLine {
    context: String,
    service: String,
    stage: String,
    sequence: String,
    started_ms: i64,
    ended_ms: Option<i64>,
    result: Option<TaskResult>,
    status: Option<RunStatus>,
    tasks: BTreeMap<String, TaskLine>,
}

#[derive(Default, Clone)]
struct TaskLine {
    attempts: u32,
    worker: Option<String>,
    result: Option<TaskResult>,
}

impl Ledger {
    fn apply(&mut self, run_id: &str, at_ms: i64, event: &Event) {
        if let Event::RunStarted { meta, .. } = event {
            self.runs.insert(
                run_id.to_string(),
                RunLine {
                    context: meta.context_id.clone(),
                    service: meta.service.clone().unwrap_or_default(),
                    stage: meta.stage.clone(),
                    sequence: meta.sequence.clone(),
                    started_ms: at_ms,
                    ..RunLine::default()
                },
            );
            return;
        }
        let Some(run) = self.runs.get_mut(run_id) else { return };
        match event {
            Event::TaskAwarded { task, attempt, worker, .. } => {
                let t = run.tasks.entry(task.clone()).or_default();
                t.attempts = t.attempts.max(*attempt);
                t.worker = Some(worker.id.clone());
            }
            Event::TaskEnded { task, result, .. } => {
                run.tasks.entry(task.clone()).or_default().result = Some(*result);
            }
            Event::RunFinished { status, result, .. } => {
                run.status = Some(*status);
                run.result = Some(*result);
                run.ended_ms = Some(at_ms);
            }
            _ => {}
        }
    }

    fn in_context<'a>(&'a self, contexts: &'a HashSet<String>) -> impl Iterator<Item = &'a RunLine> {
        self.runs.values().filter(move |r| contexts.contains(&r.context))
    }
}

/// Runs the demo; exit 0 when every delivery ended as the example expects.
pub async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let (dir, _temp) = match &args.data {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
            (d.clone(), None)
        }
        None => {
            let t = tempfile::tempdir().context("cannot create a temporary folder")?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    let db = dir.join("capstan.db");
    let store: Arc<dyn Store> = Arc::new(
        capstan_store::sqlite::SqliteStore::open(&db).await.with_context(|| format!("cannot open {}", db.display()))?,
    );
    let broker = Arc::new(MemoryBroker::new());
    println!("capstan demo: embedded engine, SQLite at {}, in-memory broker", db.display());

    // Read what the log already holds before anything new happens, to know where we stand.
    let mut ledger = Ledger::default();
    let mut position = 0;
    loop {
        let batch = store.read_all(position, 5_000).await?;
        let Some(last) = batch.last() else { break };
        position = last.position;
        for s in &batch {
            ledger.apply(&s.run_id, s.recorded_at_ms, &codec::decode_event(s)?);
        }
    }

    let runtime = Runtime::start(RuntimeConfig::default(), store.clone(), broker.clone(), Arc::new(SystemClock))
        .await
        .context("cannot start the runtime")?;
    let (stop_workers, workers_stop_rx) = watch::channel(false);
    let worker_tasks = demo_workers::spawn_all(broker.clone(), workers_stop_rx);

    let unfinished = store.unfinished_runs().await?;
    let mut contexts: HashSet<String> = HashSet::new();
    let start = Instant::now();
    let start_ms = chrono_now_ms();
    let mut printer = ProgressPrinter::new(start_ms);
    if unfinished.is_empty() {
        let (name, version) = runtime.apply_definition(DEMO_PROJECT, DEMO_SHIPYARD).await?;
        println!("definition {name} v{version}: dev -> staging -> production");
        for i in 0..args.services.max(1) {
            let service = if args.services <= 1 { "carts".to_string() } else { format!("carts-{}", i + 1) };
            let run_id = runtime
                .trigger(TriggerRequest {
                    project: DEMO_PROJECT.into(),
                    definition: Some(name.clone()),
                    stage: "dev".into(),
                    sequence: "delivery".into(),
                    service: Some(service.clone()),
                    data: json!({"service": service, "image": format!("docker.io/demo/{service}:1.2.{i}")}),
                    ..TriggerRequest::default()
                })
                .await?;
            println!("triggered dev.delivery for {service}: run {}", short(&run_id));
        }
    } else {
        println!("resuming {} unfinished run(s) found in {}:", unfinished.len(), dir.display());
        for r in &unfinished {
            println!(
                "  {} {}.{} ({}), {}",
                short(&r.run_id),
                r.stage,
                r.sequence,
                r.service.as_deref().unwrap_or("-"),
                r.status
            );
            contexts.insert(r.context_id.clone());
        }
    }

    let deadline = Duration::from_secs(args.timeout);
    let verdict = loop {
        let batch = store.read_all(position, 1_000).await?;
        for s in &batch {
            position = s.position;
            let event = codec::decode_event(s)?;
            if let Event::RunStarted { meta, .. } = &event
                && meta.triggered_by.is_none()
                && unfinished.is_empty()
            {
                contexts.insert(meta.context_id.clone());
            }
            ledger.apply(&s.run_id, s.recorded_at_ms, &event);
            if let Some(line) = printer.line(s, &event) {
                println!("{line}");
            }
        }
        if let Some(v) = settled(&ledger, &contexts, args.services.max(1)) {
            break Some(v);
        }
        if start.elapsed() > deadline {
            break None;
        }
        if batch.is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };

    let _ = stop_workers.send(true);
    runtime.shutdown().await;
    for t in worker_tasks {
        let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
    }
    print_summary(&ledger, &contexts, &*store).await?;
    let elapsed = start.elapsed().as_secs_f64();
    match verdict {
        Some(true) => {
            println!("demo finished in {elapsed:.1}s: every delivery ended as expected");
            Ok(ExitCode::SUCCESS)
        }
        Some(false) => {
            println!("demo finished in {elapsed:.1}s, but not as expected (see above)");
            Ok(ExitCode::from(1))
        }
        None => {
            println!("demo gave up after {}s; rerun with --data DIR to resume", args.timeout);
            Ok(ExitCode::from(1))
        }
    }
}

/// `Some(ok)` once every followed context has settled: production delivered (ok when everything
/// ended as expected), or a failure with nothing left running.
fn settled(ledger: &Ledger, contexts: &HashSet<String>, expected: usize) -> Option<bool> {
    if contexts.len() < expected && contexts.is_empty() {
        return None;
    }
    let mut all_ok = true;
    for context in contexts {
        let runs: Vec<&RunLine> = ledger.runs.values().filter(|r| &r.context == context).collect();
        let production_done =
            runs.iter().any(|r| r.stage == "production" && r.sequence == "delivery" && r.ended_ms.is_some());
        let any_failed = runs.iter().any(|r| r.result == Some(TaskResult::Fail));
        let open = runs.iter().any(|r| r.ended_ms.is_none());
        if open || !(production_done || any_failed) {
            return None;
        }
        all_ok &= expected_outcome(&runs);
    }
    Some(all_ok)
}

/// The example's expectations: all three stages pass, the flaky test needed a retry, and the
/// production deployment went to the certified deployer.
fn expected_outcome(runs: &[&RunLine]) -> bool {
    let pass = |stage: &str| {
        runs.iter().any(|r| r.stage == stage && r.sequence == "delivery" && r.result == Some(TaskResult::Pass))
    };
    let retried = runs.iter().any(|r| {
        r.stage == "dev"
            && r.tasks.get("api-test").is_some_and(|t| t.attempts >= 2 && t.result == Some(TaskResult::Pass))
    });
    let certified = runs.iter().any(|r| {
        r.stage == "production"
            && r.tasks.get("deploy").and_then(|t| t.worker.as_deref()) == Some(demo_workers::PRODUCTION_DEPLOYER)
    });
    pass("dev") && pass("staging") && pass("production") && retried && certified
}

async fn print_summary(ledger: &Ledger, contexts: &HashSet<String>, store: &dyn Store) -> anyhow::Result<()> {
    println!();
    println!(
        "{:<10} {:<11} {:<10} {:<8} {:>8}  tasks (attempts, worker)",
        "service", "stage", "sequence", "result", "seconds"
    );
    let mut runs: Vec<&RunLine> = ledger.in_context(contexts).collect();
    runs.sort_by_key(|r| (r.service.clone(), r.started_ms));
    for r in runs {
        let secs =
            r.ended_ms.map(|e| format!("{:.1}", (e - r.started_ms) as f64 / 1000.0)).unwrap_or_else(|| "-".into());
        let tasks: Vec<String> = r
            .tasks
            .iter()
            .map(|(name, t)| {
                format!(
                    "{name}={} ({}, {})",
                    t.result.map(|x| x.as_str()).unwrap_or("-"),
                    t.attempts,
                    t.worker.as_deref().unwrap_or("engine")
                )
            })
            .collect();
        println!(
            "{:<10} {:<11} {:<10} {:<8} {:>8}  {}",
            r.service,
            r.stage,
            r.sequence,
            r.result.map(|x| x.as_str()).unwrap_or("running"),
            secs,
            tasks.join(", ")
        );
    }
    let total = store
        .list_runs(&RunFilter { project: Some(DEMO_PROJECT.into()), limit: 10_000, ..RunFilter::default() })
        .await?;
    println!("{} run(s) in the store for project {DEMO_PROJECT}", total.len());
    Ok(())
}

fn chrono_now_ms() -> i64 {
    use crate::runtime::Clock;
    SystemClock.now_ms()
}
