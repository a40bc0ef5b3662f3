//! Drives the bench load: in-process echo workers, a bounded number of runs in flight, and a
//! watcher that learns of finished runs from the engine's own `sequence.finished` notifications
//! (the path a real watcher takes), with a progress line to stderr every second.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use capstan_brokers::{Broker, SubscriptionMode};
use capstan_proto::{SequenceFinished, TaskResult, topics};
use capstan_workers::{EchoWorker, Worker, WorkerConfig};
use serde_json::json;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tracing::warn;

use super::shipyard::{SEQUENCE, STAGE, TASK_TYPE};
use crate::runtime::{Clock, RuntimeHandle, SystemClock, TriggerRequest};

/// How much load to drive.
#[derive(Debug, Clone)]
pub struct Load {
    pub project: String,
    /// Stop after this many runs; `None`: until `duration` is over.
    pub runs: Option<u64>,
    pub duration: Duration,
    /// Runs in flight at once.
    pub concurrency: usize,
    /// Tasks per run, for the progress line.
    pub tasks_per_run: u64,
    /// Longest a single run may take before the bench gives up.
    pub run_timeout: Duration,
}

/// What the drive saw from the client's side.
#[derive(Debug, Default)]
pub struct Driven {
    /// Client wall-clock ms of each trigger call, per run id.
    pub triggered_ms: HashMap<String, i64>,
    /// Runs that finished with a result other than pass.
    pub not_passed: u64,
    /// From the first trigger to the last finish.
    pub elapsed: Duration,
}

/// Starts `count` echo workers with `slots` slots each; they stop when `stop` turns true.
pub fn spawn_workers(
    broker: &Arc<dyn Broker>,
    count: usize,
    slots: u32,
    started_after: Duration,
    stop: &watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    (0..count.max(1))
        .map(|i| {
            let config = WorkerConfig::new(format!("bench-echo-{}", i + 1), [TASK_TYPE])
                .slots(slots)
                .started_after(started_after);
            let worker = Worker::new(config, EchoWorker::new());
            let broker = broker.clone();
            let mut stop = stop.clone();
            tokio::spawn(async move {
                let shutdown = async move {
                    while !*stop.borrow_and_update() {
                        if stop.changed().await.is_err() {
                            break;
                        }
                    }
                };
                if let Err(e) = worker.run(broker, shutdown).await {
                    warn!(error = %e, "bench worker stopped");
                }
            })
        })
        .collect()
}

/// Who waits for which run; a finish may be heard before its trigger call returned.
#[derive(Default)]
struct Finishes {
    waiting: HashMap<String, oneshot::Sender<TaskResult>>,
    early: HashMap<String, TaskResult>,
}

/// Listens to `sequence.finished` and wakes the waiting drivers.
async fn watch_finishes(broker: &Arc<dyn Broker>) -> anyhow::Result<(Arc<Mutex<Finishes>>, JoinHandle<()>)> {
    let mut sub = broker.subscribe(topics::RUN_EVENTS, SubscriptionMode::Broadcast).await?;
    let finishes = Arc::new(Mutex::new(Finishes::default()));
    let shared = finishes.clone();
    let task = tokio::spawn(async move {
        while let Ok(delivery) = sub.next().await {
            let _ = delivery.ack().await;
            let Ok(done) = delivery.message.event.payload::<SequenceFinished>() else { continue };
            let mut f = shared.lock().unwrap_or_else(|e| e.into_inner());
            match f.waiting.remove(&done.run_id) {
                Some(tx) => {
                    let _ = tx.send(done.result);
                }
                None => {
                    f.early.insert(done.run_id, done.result);
                }
            }
        }
    });
    Ok((finishes, task))
}

/// Counters the progress line reads.
#[derive(Default)]
struct Progress {
    started: AtomicU64,
    finished: AtomicU64,
}

/// Runs the load to its end and returns what the client saw.
pub async fn drive(runtime: &RuntimeHandle, broker: &Arc<dyn Broker>, load: &Load) -> anyhow::Result<Driven> {
    let (finishes, watcher) = watch_finishes(broker).await?;
    let progress = Arc::new(Progress::default());
    let start = Instant::now();
    let deadline = start + load.duration;
    let ticker = tokio::spawn(print_progress(runtime.clone(), progress.clone(), load.tasks_per_run, start));
    let mut drivers = Vec::with_capacity(load.concurrency);
    for _ in 0..load.concurrency.max(1) {
        let (runtime, finishes, progress, load) = (runtime.clone(), finishes.clone(), progress.clone(), load.clone());
        drivers.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            let mut not_passed = 0;
            loop {
                let more = match load.runs {
                    Some(n) => progress.started.fetch_add(1, Ordering::Relaxed) < n,
                    None => {
                        let more = Instant::now() < deadline;
                        progress.started.fetch_add(u64::from(more), Ordering::Relaxed);
                        more
                    }
                };
                if !more {
                    return Ok::<_, anyhow::Error>((mine, not_passed));
                }
                let (run_id, at_ms, result) = one_run(&runtime, &finishes, &load).await?;
                progress.finished.fetch_add(1, Ordering::Relaxed);
                not_passed += u64::from(result != TaskResult::Pass);
                mine.push((run_id, at_ms));
            }
        }));
    }
    let mut driven = Driven::default();
    let mut failure = None;
    for d in drivers {
        match d.await.context("a bench driver panicked")? {
            Ok((mine, not_passed)) => {
                driven.triggered_ms.extend(mine);
                driven.not_passed += not_passed;
            }
            Err(e) => failure = Some(e),
        }
    }
    driven.elapsed = start.elapsed();
    ticker.abort();
    watcher.abort();
    match failure {
        Some(e) => Err(e),
        None => Ok(driven),
    }
}

/// Triggers one run and waits for its finish notification.
async fn one_run(
    runtime: &RuntimeHandle,
    finishes: &Arc<Mutex<Finishes>>,
    load: &Load,
) -> anyhow::Result<(String, i64, TaskResult)> {
    let at_ms = SystemClock.now_ms();
    let run_id = runtime
        .trigger(TriggerRequest {
            project: load.project.clone(),
            definition: Some("bench".into()),
            stage: STAGE.into(),
            sequence: SEQUENCE.into(),
            data: json!({"bench": true}),
            ..TriggerRequest::default()
        })
        .await
        .context("trigger failed")?;
    let rx = {
        let mut f = finishes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(result) = f.early.remove(&run_id) {
            return Ok((run_id, at_ms, result));
        }
        let (tx, rx) = oneshot::channel();
        f.waiting.insert(run_id.clone(), tx);
        rx
    };
    match tokio::time::timeout(load.run_timeout, rx).await {
        Ok(Ok(result)) => Ok((run_id, at_ms, result)),
        Ok(Err(_)) => bail!("the finish watcher stopped before run {run_id} finished"),
        Err(_) => bail!("run {run_id} did not finish within {:?}", load.run_timeout),
    }
}

/// One line a second to stderr: runs and tasks done, their rates, commits.
async fn print_progress(runtime: RuntimeHandle, progress: Arc<Progress>, tasks_per_run: u64, start: Instant) {
    let mut last = (0u64, 0u64, Instant::now());
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tick.tick().await;
        let done = progress.finished.load(Ordering::Relaxed);
        let commits = runtime.metrics().commits.load(Ordering::Relaxed);
        let secs = last.2.elapsed().as_secs_f64().max(1e-9);
        let runs_per_s = (done - last.0) as f64 / secs;
        eprintln!(
            "[{:>5.1}s] runs {done:>8} ({runs_per_s:>7.0}/s)  tasks/s {:>8.0}  commits/s {:>6.0}",
            start.elapsed().as_secs_f64(),
            runs_per_s * tasks_per_run as f64,
            (commits - last.1) as f64 / secs,
        );
        last = (done, commits, Instant::now());
    }
}
