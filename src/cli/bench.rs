//! `capstan bench`: a throughput and latency benchmark of the whole engine in one process. It
//! opens the chosen store and broker, applies a generated K-task sequence (chain or fan-out;
//! queue, claim-free queue or auction dispatch), keeps a bounded number of runs in flight
//! through in-process echo workers, and reports tasks/s, runs/s, latency percentiles derived from the event log, CPU
//! time, peak memory and the runtime's commit counters. `--json` ends with one JSON line.
//! `--soak N` instead leaves N runs waiting on an approval and times reads (see [`soak`]).

mod driver;
mod shipyard;
mod soak;
mod stats;

use std::collections::HashSet;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, bail};
use capstan_store::Store;
use serde_json::{Value, json};
use tokio::sync::watch;

use self::driver::{Driven, Load};
use self::shipyard::{Dispatch, Shape};
use self::stats::{Collector, LatencySummary, Percentiles};
use crate::backends::{self, StoreUrl};
use crate::runtime::{Runtime, RuntimeConfig, SystemClock};

/// The project the bench's definition and runs belong to.
const PROJECT: &str = "bench";

/// Arguments of `capstan bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Store URL: sqlite:PATH, postgres://..., or memory:. Default: a temporary SQLite file.
    #[arg(long)]
    pub store: Option<String>,
    /// Broker kind: memory, nats, kafka or rabbitmq.
    #[arg(long, default_value = "memory")]
    pub broker: String,
    /// Broker URL (nats://..., Kafka bootstrap servers, amqp://...); unused for memory.
    #[arg(long, default_value = "")]
    pub broker_url: String,
    /// How the tasks of a run depend on each other.
    #[arg(long, value_enum, default_value_t = Shape::Chain)]
    pub shape: Shape,
    /// Tasks per run (K); a fanout has one start task, K-2 parallel ones and one join.
    #[arg(long, default_value_t = 5)]
    pub tasks: usize,
    /// How tasks reach workers: queue (claim, then award), claim-free (queue offers that
    /// carry their token, `claim: false`), or auction (the first bid wins).
    #[arg(long, value_enum, default_value_t = Dispatch::Queue)]
    pub dispatch: Dispatch,
    /// Runs to drive; default: as many as fit in --duration.
    #[arg(long)]
    pub runs: Option<u64>,
    /// Seconds to drive load when --runs is not given.
    #[arg(long, default_value_t = 15.0)]
    pub duration: f64,
    /// Runs in flight at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// In-process echo workers (M).
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Slots (attempts at once) of each worker.
    #[arg(long, default_value_t = 1024)]
    pub slots: u32,
    /// The workers report `started` only for attempts still running after this many ms
    /// (`WorkerConfig::started_after`); 0 reports every start.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    pub started_after_ms: u64,
    /// Runtime partitions (default: the runtime's own default).
    #[arg(long)]
    pub partitions: Option<usize>,
    /// Most inputs per commit (default: the runtime's own default).
    #[arg(long)]
    pub max_batch: Option<usize>,
    /// Batches partitions decide and commit at once over PostgreSQL, 0 for no limit (default:
    /// the runtime's own default).
    #[arg(long)]
    pub commit_slots: Option<usize>,
    /// Soak instead of throughput: leave this many runs waiting on a manual approval, then
    /// report resident memory and how fast List, Get and Watch answer.
    #[arg(long, value_name = "RUNS")]
    pub soak: Option<u64>,
    /// Timed calls of each read in a soak.
    #[arg(long, default_value_t = 20)]
    pub samples: usize,
    /// Trigger data of each soak run padded to about this many KiB (large states).
    #[arg(long, value_name = "KIB", default_value_t = 0)]
    pub data_kib: usize,
    /// MiB of run states the runtime caches (default: the runtime's own default).
    #[arg(long, value_name = "MIB")]
    pub cache_mib: Option<usize>,
    /// The broker namespace (NATS stream and subject prefix, RabbitMQ exchange and queues, Kafka
    /// topic prefix). Default: a fresh `bench-<8 hex>` per run, so that what an interrupted run
    /// left in the broker (queued offers, inputs) never reaches the next one, nor a deployment
    /// sharing the broker; it is deleted at the end (NATS, RabbitMQ). A namespace given here is
    /// kept.
    #[arg(long)]
    pub namespace: Option<String>,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
}

/// Counters of the runtime, read before and after the load.
#[derive(Debug, Clone, Copy, Default)]
struct Counters {
    commits: u64,
    inputs: u64,
    events: u64,
    published: u64,
    runs_evicted: u64,
    cpu_s: f64,
    postgres_cpu_s: Option<f64>,
}

impl Counters {
    fn read(runtime: &crate::runtime::RuntimeHandle, with_postgres: bool) -> Self {
        let m = runtime.metrics();
        Counters {
            commits: m.commits.load(Ordering::Relaxed),
            inputs: m.inputs.load(Ordering::Relaxed),
            events: m.events.load(Ordering::Relaxed),
            published: m.published.load(Ordering::Relaxed),
            runs_evicted: m.runs_evicted.load(Ordering::Relaxed),
            cpu_s: stats::process_cpu_s().unwrap_or(0.0),
            postgres_cpu_s: if with_postgres { stats::cpu_s_of_processes("postgres") } else { None },
        }
    }
}

/// Runs the benchmark and prints its report.
pub async fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    shipyard::check(args.shape, args.tasks).map_err(anyhow::Error::msg)?;
    let temp = tempfile::tempdir().context("cannot create a temporary folder")?;
    let store_url = match &args.store {
        Some(u) => u.clone(),
        None => format!("sqlite:{}", temp.path().join("bench.db").display()),
    };
    let store_kind = match StoreUrl::parse(&store_url)? {
        StoreUrl::Memory => "memory",
        StoreUrl::Sqlite(_) => "sqlite",
        StoreUrl::Postgres(_) => "postgres",
    };
    let store = backends::open_store(&store_url).await.context("cannot open the store")?;
    let namespace = match (&args.namespace, args.broker.as_str()) {
        (_, "memory") => None,
        (Some(ns), _) => Some(ns.clone()),
        (None, _) => Some(format!("bench-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])),
    };
    let broker = backends::connect_broker_in(&args.broker, &args.broker_url, namespace.as_deref())
        .await
        .context("cannot reach the broker")?;
    let mut config = RuntimeConfig::default();
    config.partitions = args.partitions.unwrap_or(config.partitions);
    config.max_batch = args.max_batch.unwrap_or(config.max_batch);
    config.commit_slots = args.commit_slots.unwrap_or(config.commit_slots);
    config.cache_bytes = args.cache_mib.map_or(config.cache_bytes, |mib| mib << 20);
    let config_json = json!({
        "store": store_kind, "broker": args.broker, "shape": args.shape, "tasks": args.tasks,
        "dispatch": args.dispatch, "runs": args.runs, "duration_s": args.duration,
        "concurrency": args.concurrency, "workers": args.workers, "slots": args.slots,
        "started_after_ms": args.started_after_ms,
        "partitions": config.partitions, "max_batch": config.max_batch, "commit_slots": config.commit_slots,
        "cache_bytes": config.cache_bytes, "namespace": namespace,
        "nats_storage": (args.broker == "nats").then(backends::nats_storage_name),
    });
    eprintln!("capstan bench: {config_json}");

    let runtime = Runtime::start(config, store.clone(), broker.clone(), Arc::new(SystemClock))
        .await
        .context("cannot start the runtime")?;
    if let Some(runs) = args.soak {
        let plan = soak::Soak {
            project: PROJECT.into(),
            runs,
            concurrency: args.concurrency.max(1),
            samples: args.samples.max(1),
            data_bytes: args.data_kib << 10,
        };
        let report = soak::run(&runtime, &plan, config_json).await;
        runtime.shutdown().await;
        remove_own_namespace(&args, &*broker).await;
        let report = report?;
        print_soak(&report);
        if args.json {
            println!("{report}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let bench = shipyard::generate(args.shape, args.tasks, args.dispatch);
    runtime.apply_definition(PROJECT, &bench.yaml).await.context("cannot apply the bench definition")?;
    let (stop_workers, stop_rx) = watch::channel(false);
    let workers = driver::spawn_workers(
        &broker,
        args.workers,
        args.slots,
        Duration::from_millis(args.started_after_ms),
        &stop_rx,
    );

    let load = Load {
        project: PROJECT.into(),
        runs: args.runs,
        duration: Duration::from_secs_f64(args.duration.max(0.0)),
        concurrency: args.concurrency.max(1),
        tasks_per_run: args.tasks as u64,
        run_timeout: Duration::from_secs(120),
    };
    let with_postgres = store_kind == "postgres";
    let before = Counters::read(&runtime, with_postgres);
    let driven = driver::drive(&runtime, &broker, &load).await;
    let after = Counters::read(&runtime, with_postgres);
    let peak_rss_mb = stats::peak_rss_mb();

    let _ = stop_workers.send(true);
    for w in workers {
        let _ = tokio::time::timeout(Duration::from_secs(2), w).await;
    }
    runtime.shutdown().await;
    remove_own_namespace(&args, &*broker).await;
    let driven = driven?;
    if driven.triggered_ms.is_empty() {
        bail!("no run was driven; give --runs or a longer --duration");
    }

    let latency = collect_latencies(&*store, &driven, &bench.depends_on, load.concurrency).await?;
    let report = report(&args, config_json, &driven, &before, &after, peak_rss_mb, latency);
    print_human(&report);
    if args.json {
        println!("{report}");
    }
    Ok(if driven.not_passed == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// Deletes the broker namespace the run made for itself (not one given with `--namespace`),
/// so that bench runs leave no streams, exchanges or queues behind (Kafka keeps its topics).
async fn remove_own_namespace(args: &BenchArgs, broker: &dyn capstan_brokers::Broker) {
    if args.namespace.is_some() || args.broker == "memory" {
        return;
    }
    if let Err(e) = broker.remove_namespace().await {
        tracing::warn!(error = %e, "the bench's broker namespace was not removed");
    }
}

/// Reads the followed runs' events back from the log. The log may hold other runs (a shared
/// PostgreSQL): reading starts at the earliest start among the first wave of runs, since every
/// later run was triggered after one of those had finished.
async fn collect_latencies(
    store: &dyn Store,
    driven: &Driven,
    depends_on: &std::collections::BTreeMap<String, Vec<String>>,
    first_wave: usize,
) -> anyhow::Result<(LatencySummary, usize, usize)> {
    let mut by_time: Vec<(&String, &i64)> = driven.triggered_ms.iter().collect();
    by_time.sort_by_key(|(_, at)| **at);
    let mut floor = i64::MAX;
    for (run_id, _) in by_time.iter().take(first_wave) {
        if let Some(first) = store.read_stream(run_id, 1).await?.first() {
            floor = floor.min(first.position);
        }
    }
    let followed: HashSet<String> = driven.triggered_ms.keys().cloned().collect();
    let mut collector = Collector::default();
    let mut position = floor.saturating_sub(1).max(0);
    loop {
        let page = store.read_all(position, 10_000).await?;
        let Some(last) = page.last() else { break };
        position = last.position;
        for stored in &page {
            collector.add(stored, &followed)?;
        }
    }
    let latencies = collector.finish(&driven.triggered_ms, depends_on);
    let (retries, tasks_ended) = (latencies.retries, latencies.tasks_ended);
    Ok((latencies.summary(), retries, tasks_ended))
}

fn report(
    args: &BenchArgs,
    config: Value,
    driven: &Driven,
    before: &Counters,
    after: &Counters,
    peak_rss_mb: Option<f64>,
    (latency, retries, tasks_ended): (LatencySummary, usize, usize),
) -> Value {
    let secs = driven.elapsed.as_secs_f64().max(1e-9);
    let runs = driven.triggered_ms.len() as u64;
    let tasks = runs * args.tasks as u64;
    let commits = after.commits - before.commits;
    let inputs = after.inputs - before.inputs;
    let events = after.events - before.events;
    let cpu_s = after.cpu_s - before.cpu_s;
    let round = |x: f64| (x * 1000.0).round() / 1000.0;
    json!({
        "config": config,
        "runs": runs,
        "tasks": tasks,
        "tasks_ended": tasks_ended,
        "not_passed": driven.not_passed,
        "retries": retries,
        "elapsed_s": round(secs),
        "tasks_per_s": round(tasks as f64 / secs),
        "runs_per_s": round(runs as f64 / secs),
        "p50_ms": latency.task.p50,
        "p90_ms": latency.task.p90,
        "p99_ms": latency.task.p99,
        "max_ms": latency.task.max,
        "run_p50_ms": latency.run.p50,
        "run_p99_ms": latency.run.p99,
        "step_p50_ms": latency.step.p50,
        "step_p99_ms": latency.step.p99,
        "trigger_award_p99_ms": latency.first_award.p99,
        "latency_ms": latency,
        "server_cpu_s": round(cpu_s),
        "cpu_us_per_task": round(cpu_s * 1e6 / tasks.max(1) as f64),
        "postgres_cpu_s": after.postgres_cpu_s.zip(before.postgres_cpu_s).map(|(a, b)| round(a - b)),
        "peak_rss_mb": peak_rss_mb.map(round),
        "commits": commits,
        "inputs": inputs,
        "events": events,
        "published": after.published - before.published,
        "runs_evicted": after.runs_evicted - before.runs_evicted,
        "events_per_s": round(events as f64 / secs),
        "commits_per_s": round(commits as f64 / secs),
        "inputs_per_commit": round(inputs as f64 / commits.max(1) as f64),
    })
}

fn print_soak(r: &Value) {
    let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
    println!();
    println!(
        "soak: {} runs waiting on an approval, triggered in {:.1}s ({:.0}/s)",
        r["runs"],
        f("trigger_s"),
        f("triggers_per_s")
    );
    println!(
        "memory       RSS {:.1} MiB after triggering, {:.1} MiB at the end, peak {:.1} MiB (start {:.1})",
        f("rss_mb"),
        f("rss_end_mb"),
        f("peak_rss_mb"),
        f("rss_start_mb")
    );
    println!("cache        {} run states evicted (each read back from the store at its next input)", r["runs_evicted"]);
    println!("reads (ms, gRPC in process)          p50      p90      max    count");
    for (label, key) in [
        ("List first page by status", "list_ms"),
        ("Get one run", "get_ms"),
        ("Watch to approval-requested", "watch_ms"),
        ("approve -> watched finish", "approve_to_watched_finish_ms"),
    ] {
        let p = &r[key];
        let g = |k: &str| p[k].as_f64().unwrap_or(0.0);
        println!("  {label:<32} {:>8.2} {:>8.2} {:>8.2} {:>8}", g("p50"), g("p90"), g("max"), p["count"]);
    }
}

fn print_human(r: &Value) {
    let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
    println!();
    println!("runs {} ({} tasks) in {:.2}s, {} not passed", r["runs"], r["tasks"], f("elapsed_s"), r["not_passed"]);
    println!("throughput   {:>10.0} tasks/s {:>10.0} runs/s", f("tasks_per_s"), f("runs_per_s"));
    println!(
        "store        {:>10.0} events/s {:>9.0} commits/s {:>6.1} inputs/commit",
        f("events_per_s"),
        f("commits_per_s"),
        f("inputs_per_commit")
    );
    let pg = r["postgres_cpu_s"].as_f64().map(|s| format!(", postgres {s:.2}s")).unwrap_or_default();
    println!(
        "resources    {:.2} CPU s ({:.0} us/task){pg}, peak RSS {:.1} MiB",
        f("server_cpu_s"),
        f("cpu_us_per_task"),
        f("peak_rss_mb")
    );
    println!("latency (ms, from the event log)    p50      p90      p99      max    count");
    let rows = [
        ("trigger -> run finished", "run"),
        ("trigger -> run started", "admit"),
        ("trigger -> first awarded", "first_award"),
        ("task offered -> awarded", "award"),
        ("task awarded -> started", "start"),
        ("task started -> ended", "finish"),
        ("task offered -> ended", "task"),
        ("step: prev ended -> started", "step"),
    ];
    for (label, key) in rows {
        let p: Percentiles = serde_json::from_value(r["latency_ms"][key].clone()).unwrap_or_default();
        println!("  {label:<30} {:>8.0} {:>8.0} {:>8.0} {:>8.0} {:>8}", p.p50, p.p90, p.p99, p.max, p.count);
    }
}
