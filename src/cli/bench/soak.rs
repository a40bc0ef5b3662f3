//! `capstan bench --soak N`: N runs that wait on a manual approval, to show that the server's
//! memory stays bounded and that reading stays quick with many runs present. It triggers N runs
//! of a one-task sequence (`type: approval, properties: {pass: manual}`), so every run ends its
//! start commit waiting for a person; then it serves the gRPC API in the same process and times,
//! through a real client, the first page of `List` filtered by status, `Get` of one run, `Watch`
//! of one run up to its `approval-requested` event, and approve -> the watcher seeing the run
//! finish. Resident memory is read from /proc after the triggers and after the reads.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use capstan_proto::grpc::v1 as pb;
use pb::run_service_client::RunServiceClient;
use serde_json::{Value, json};
use tonic::transport::Channel;

use super::stats;
use crate::api::auth::Auth;
use crate::api::{Api, ApiServer};
use crate::config::Limits;
use crate::runtime::{RuntimeHandle, TriggerRequest};

/// The definition, stage, sequence and task of the soak's runs.
const DEFINITION: &str = "soak";
const STAGE: &str = "soak";
const SEQUENCE: &str = "wait";
const TASK: &str = "approve";

/// A `List` page as the CLI asks for it.
const PAGE: i32 = 50;

/// The sequence every soak run executes: one approval that waits for a person.
fn definition_yaml() -> String {
    format!(
        "apiVersion: capstan.dev/v1\nkind: Shipyard\nmetadata: {{name: {DEFINITION}}}\nspec:\n  stages:\n    \
         - name: {STAGE}\n      sequences:\n        - name: {SEQUENCE}\n          tasks:\n            \
         - {{name: {TASK}, type: approval, properties: {{pass: manual}}}}\n"
    )
}

/// What to drive.
#[derive(Debug, Clone)]
pub struct Soak {
    pub project: String,
    /// Runs to leave waiting.
    pub runs: u64,
    /// Triggers in flight at once.
    pub concurrency: usize,
    /// Timed calls of each read.
    pub samples: usize,
    /// Padding in each run's trigger data, in bytes.
    pub data_bytes: usize,
}

/// Timings of one kind of call, in milliseconds (sub-millisecond precision).
fn summary(mut ms: Vec<f64>) -> Value {
    if ms.is_empty() {
        return json!({"count": 0});
    }
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| {
        let rank = (q * ms.len() as f64).ceil() as usize;
        (ms[rank.clamp(1, ms.len()) - 1] * 1000.0).round() / 1000.0
    };
    json!({"count": ms.len(), "p50": at(0.5), "p90": at(0.9), "max": at(1.0)})
}

fn elapsed_ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

/// Runs the soak on a started runtime and returns its report (`config` is merged in).
pub async fn run(runtime: &RuntimeHandle, soak: &Soak, mut config: Value) -> anyhow::Result<Value> {
    let rss_start_mb = stats::rss_mb();
    runtime.apply_definition(&soak.project, &definition_yaml()).await.context("cannot apply the soak definition")?;
    let cpu0 = stats::process_cpu_s().unwrap_or(0.0);
    let started = Instant::now();
    let samples = trigger_all(runtime, soak).await?;
    let trigger_s = started.elapsed().as_secs_f64();
    let cpu_s = stats::process_cpu_s().unwrap_or(0.0) - cpu0;
    let rss_after_trigger_mb = stats::rss_mb();
    eprintln!("soak: {} runs waiting after {trigger_s:.1}s; timing reads", soak.runs);

    let api = Api { runtime: runtime.clone(), auth: Auth::disabled(), limits: Limits::default() };
    let any = "127.0.0.1:0".parse().expect("a valid address");
    let server = ApiServer::start(api, any, any, None).await.context("cannot start the API")?;
    let reads = time_reads(server.grpc_addr(), soak, &samples).await;
    server.stop().await;
    let reads = reads?;

    let round = |x: f64| (x * 1000.0).round() / 1000.0;
    if let Some(c) = config.as_object_mut() {
        c.insert("mode".into(), json!("soak"));
        c.insert("samples".into(), json!(soak.samples));
        c.insert("data_bytes".into(), json!(soak.data_bytes));
    }
    let mut report = json!({
        "config": config,
        "runs": soak.runs,
        "trigger_s": round(trigger_s),
        "triggers_per_s": round(soak.runs as f64 / trigger_s.max(1e-9)),
        "trigger_cpu_s": round(cpu_s),
        "rss_start_mb": rss_start_mb.map(round),
        "rss_mb": rss_after_trigger_mb.map(round),
        "rss_end_mb": stats::rss_mb().map(round),
        "peak_rss_mb": stats::peak_rss_mb().map(round),
        "runs_evicted": runtime.metrics().runs_evicted.load(Ordering::Relaxed),
    });
    if let (Some(r), Some(extra)) = (report.as_object_mut(), reads.as_object()) {
        r.extend(extra.clone());
    }
    Ok(report)
}

/// Triggers every run, `concurrency` at a time; returns up to `samples` run ids spread over
/// the whole load (the first runs and later ones), for the reads to use.
async fn trigger_all(runtime: &RuntimeHandle, soak: &Soak) -> anyhow::Result<Vec<String>> {
    let next = Arc::new(AtomicU64::new(0));
    let ticker = tokio::spawn({
        let next = next.clone();
        let total = soak.runs;
        async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                eprintln!("soak: {} / {total} runs triggered", next.load(Ordering::Relaxed).min(total));
            }
        }
    });
    // Every `stride`-th run is kept as a sample, so samples are not all among the oldest runs.
    let stride = (soak.runs / soak.samples.max(1) as u64).max(1);
    let padding = "x".repeat(soak.data_bytes);
    let mut drivers = Vec::new();
    for _ in 0..soak.concurrency.max(1) {
        let (runtime, next, soak, padding) = (runtime.clone(), next.clone(), soak.clone(), padding.clone());
        drivers.push(tokio::spawn(async move {
            let mut kept = Vec::new();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= soak.runs {
                    return Ok::<_, anyhow::Error>(kept);
                }
                let run_id = runtime
                    .trigger(TriggerRequest {
                        project: soak.project.clone(),
                        definition: Some(DEFINITION.into()),
                        stage: STAGE.into(),
                        sequence: SEQUENCE.into(),
                        data: json!({"soak": n, "padding": padding}),
                        ..TriggerRequest::default()
                    })
                    .await
                    .with_context(|| format!("trigger {n} failed"))?;
                if n % stride == 0 {
                    kept.push(run_id);
                }
            }
        }));
    }
    let mut samples = Vec::new();
    let mut failure = None;
    for d in drivers {
        match d.await.context("a soak driver panicked")? {
            Ok(kept) => samples.extend(kept),
            Err(e) => failure = Some(e),
        }
    }
    ticker.abort();
    if let Some(e) = failure {
        return Err(e);
    }
    samples.truncate(soak.samples.max(1));
    ensure!(!samples.is_empty(), "no run was triggered; give --soak at least 1");
    Ok(samples)
}

/// Times List, Get, Watch and approve -> watched finish through a gRPC client.
async fn time_reads(addr: std::net::SocketAddr, soak: &Soak, samples: &[String]) -> anyhow::Result<Value> {
    let mut client = RunServiceClient::connect(format!("http://{addr}")).await.context("cannot reach the API")?;
    let expected_page = soak.runs.min(PAGE as u64) as usize;
    let list_request = || pb::ListRunsRequest {
        project: soak.project.clone(),
        status: "running".into(),
        page_size: PAGE,
        ..pb::ListRunsRequest::default()
    };
    // One untimed call of each kind first: connection set-up and first-use caches.
    client.list(list_request()).await.context("List failed")?;
    client.get(get_request(&soak.project, &samples[0])).await.context("Get failed")?;

    let mut list_ms = Vec::new();
    for _ in 0..soak.samples.max(1) {
        let t0 = Instant::now();
        let page = client.list(list_request()).await.context("List failed")?.into_inner();
        list_ms.push(elapsed_ms(t0));
        ensure!(page.runs.len() == expected_page, "List returned {} runs, not {expected_page}", page.runs.len());
        ensure!(page.runs.iter().all(|r| r.status == "running"), "List returned a run that is not running");
    }
    let mut get_ms = Vec::new();
    for i in 0..soak.samples.max(1) {
        let run_id = &samples[i % samples.len()];
        let t0 = Instant::now();
        let run = client.get(get_request(&soak.project, run_id)).await.context("Get failed")?.into_inner();
        get_ms.push(elapsed_ms(t0));
        let waiting = run.tasks.iter().any(|t| t.name == TASK && t.state == "waiting-approval");
        ensure!(run.status == "running" && waiting, "run {run_id} is not waiting for its approval: {run:?}");
    }
    let mut watch_ms = Vec::new();
    for i in 0..soak.samples.max(1) {
        let run_id = &samples[i % samples.len()];
        let t0 = Instant::now();
        let mut stream = watch(&mut client, &soak.project, run_id).await?;
        wait_for_kind(&mut stream, run_id, "approval-requested").await?;
        watch_ms.push(elapsed_ms(t0));
    }
    // Approving ends a run, so only a few are: the soak's population stays as triggered.
    let mut approve_ms = Vec::new();
    for run_id in samples.iter().take(5) {
        let mut stream = watch(&mut client, &soak.project, run_id).await?;
        wait_for_kind(&mut stream, run_id, "approval-requested").await?;
        let t0 = Instant::now();
        client
            .approve(pb::ApproveRequest {
                project: soak.project.clone(),
                run_id: run_id.clone(),
                task: TASK.into(),
                reject: false,
            })
            .await
            .context("Approve failed")?;
        wait_for_kind(&mut stream, run_id, "run-finished").await?;
        approve_ms.push(elapsed_ms(t0));
    }
    Ok(json!({
        "list_page": expected_page,
        "list_ms": summary(list_ms),
        "get_ms": summary(get_ms),
        "watch_ms": summary(watch_ms),
        "approve_to_watched_finish_ms": summary(approve_ms),
    }))
}

fn get_request(project: &str, run_id: &str) -> pb::GetRunRequest {
    pb::GetRunRequest { project: project.into(), run_id: run_id.into() }
}

async fn watch(
    client: &mut RunServiceClient<Channel>,
    project: &str,
    run_id: &str,
) -> anyhow::Result<tonic::Streaming<pb::RunEvent>> {
    let request = pb::WatchRunRequest { project: project.into(), run_id: run_id.into(), from_seq: 1 };
    Ok(client.watch(request).await.context("Watch failed")?.into_inner())
}

/// Reads the stream until an event of `kind` arrives (the stream must not end first).
async fn wait_for_kind(stream: &mut tonic::Streaming<pb::RunEvent>, run_id: &str, kind: &str) -> anyhow::Result<()> {
    let limit = Duration::from_secs(30);
    loop {
        match tokio::time::timeout(limit, stream.message()).await {
            Err(_) => bail!("no `{kind}` event of run {run_id} within {limit:?}"),
            Ok(Err(status)) => bail!("Watch of run {run_id} failed: {status}"),
            Ok(Ok(None)) => bail!("Watch of run {run_id} ended before a `{kind}` event"),
            Ok(Ok(Some(e))) if e.kind == kind => return Ok(()),
            Ok(Ok(Some(_))) => {}
        }
    }
}
