//! `capstan bench` as a user runs it: a tiny load on the embedded default and on the in-memory
//! store, each ending with one valid JSON line. Speeds are reported, never asserted.

use std::process::Command;

use serde_json::Value;

/// Runs the bench with `args` and returns its last stdout line as JSON.
fn bench(args: &[&str]) -> Value {
    bench_with(&[], args)
}

/// [`bench`] with environment variables set for the bench.
fn bench_with(env: &[(&str, &str)], args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_capstan"))
        .arg("bench")
        .args(args)
        .arg("--json")
        .envs(env.iter().copied())
        .output()
        .expect("capstan runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed:\n{stdout}\n{stderr}");
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("last line is not JSON ({e}): {last}\n{stdout}"))
}

fn assert_complete(report: &Value, runs: u64, tasks_per_run: u64) {
    for key in ["tasks_per_s", "runs_per_s", "p50_ms", "p99_ms", "server_cpu_s", "peak_rss_mb", "inputs_per_commit"] {
        assert!(report[key].is_number(), "`{key}` missing or not a number: {report}");
    }
    assert!(report["config"].is_object(), "{report}");
    assert_eq!(report["runs"], runs, "{report}");
    assert_eq!(report["tasks"], runs * tasks_per_run, "{report}");
    assert_eq!(report["tasks_ended"], runs * tasks_per_run, "every task's end is in the log: {report}");
    assert_eq!(report["not_passed"], 0, "{report}");
    assert!(report["inputs_per_commit"].as_f64().unwrap_or(0.0) >= 1.0, "{report}");
}

#[test]
fn bench_chain_on_the_embedded_default_prints_json_last() {
    let report = bench(&["--runs", "12", "--tasks", "3", "--concurrency", "4"]);
    assert_complete(&report, 12, 3);
    assert_eq!(report["config"]["store"], "sqlite");
    assert_eq!(report["config"]["dispatch"], "queue");
    assert_eq!(report["latency_ms"]["step"]["count"], 12 * 2, "two steps per 3-task chain: {report}");
    assert_eq!(report["latency_ms"]["first_award"]["count"], 12, "one first award per run: {report}");
    let (admit, award) = (&report["latency_ms"]["admit"]["p50"], &report["latency_ms"]["first_award"]["p50"]);
    assert!(award.as_f64() >= admit.as_f64(), "a run is awarded after it started: {report}");
}

#[test]
fn bench_fanout_auction_in_memory_prints_json_last() {
    let report = bench(&[
        "--store",
        "memory:",
        "--shape",
        "fanout",
        "--tasks",
        "4",
        "--dispatch",
        "auction",
        "--runs",
        "6",
        "--workers",
        "3",
    ]);
    assert_complete(&report, 6, 4);
    assert_eq!(report["config"]["shape"], "fanout");
    // start -> (p1, p2) -> join: the parallel tasks and the join each wait for predecessors.
    assert_eq!(report["latency_ms"]["step"]["count"], 6 * 3, "{report}");
}

/// Workers that report `started` only after 10 s: the bench's no-op tasks all end before, so
/// the engine records no `TaskStarted`, takes every `finished` straight from the award's
/// holder, and every run still passes.
#[test]
fn bench_with_workers_that_skip_started_for_quick_tasks() {
    let report = bench(&["--runs", "12", "--tasks", "3", "--concurrency", "4", "--started-after-ms", "10000"]);
    assert_eq!(report["config"]["started_after_ms"], 10_000, "{report}");
    assert_eq!((report["tasks_ended"].as_u64(), report["not_passed"].as_u64()), (Some(36), Some(0)), "{report}");
    assert_eq!(report["latency_ms"]["start"]["count"], 0, "no TaskStarted expected: {report}");
    assert_eq!(report["latency_ms"]["task"]["count"], 36, "{report}");
}

/// Claim-free queue offers through the whole runtime: the workers start each offer at once, the
/// engine records each award from the first report, and every run passes.
#[test]
fn bench_claim_free_runs_every_task_once() {
    let report = bench(&["--runs", "12", "--tasks", "3", "--concurrency", "4", "--dispatch", "claim-free"]);
    assert_complete(&report, 12, 3);
    assert_eq!(report["config"]["dispatch"], "claim-free", "{report}");
    assert_eq!(report["latency_ms"]["first_award"]["count"], 12, "one first award per run: {report}");
    assert_eq!(report["latency_ms"]["task"]["count"], 36, "{report}");
}

#[test]
fn bench_soak_leaves_runs_waiting_and_reports_memory_and_reads() {
    // 64 KiB of trigger data per run, 1 MiB of cache: about 15 states fit, the rest are evicted.
    let args = ["--soak", "200", "--samples", "3", "--concurrency", "16", "--data-kib", "64", "--cache-mib", "1"];
    let report = bench(&args);
    assert_eq!(report["config"]["mode"], "soak", "{report}");
    assert_eq!(
        (report["config"]["cache_bytes"].as_u64(), report["config"]["data_bytes"].as_u64()),
        (Some(1 << 20), Some(64 << 10))
    );
    let evicted = report["runs_evicted"].as_u64().expect("runs_evicted");
    assert!((170..=200).contains(&evicted), "{evicted} of 200 large states evicted from a 1 MiB cache: {report}");
    assert_eq!(report["config"]["store"], "sqlite", "{report}");
    assert_eq!(report["runs"], 200, "{report}");
    for key in ["trigger_s", "triggers_per_s", "rss_mb", "rss_end_mb", "peak_rss_mb"] {
        assert!(report[key].as_f64().is_some_and(|v| v > 0.0), "`{key}` missing or not positive: {report}");
    }
    // The first page is full: 200 runs wait, so the status filter finds more than a page.
    assert_eq!(report["list_page"], 50, "{report}");
    for key in ["list_ms", "get_ms", "watch_ms"] {
        assert_eq!(report[key]["count"], 3, "`{key}`: {report}");
        assert!(report[key]["p50"].is_number() && report[key]["max"].is_number(), "`{key}`: {report}");
    }
    assert_eq!(report["approve_to_watched_finish_ms"]["count"], 3, "{report}");
}

/// Over a real broker each run has a namespace of its own (NATS: its own stream), so what an
/// interrupted run left queued there never reaches the next run: a bench that shared the
/// default stream inherited 48,944 stale offers from a run cut off at 2,048 in flight, and
/// finished nothing.
#[test]
fn bench_over_nats_runs_in_a_namespace_of_its_own() {
    let run = || {
        let report = bench(&["--broker", "nats", "--runs", "6", "--tasks", "2", "--concurrency", "3"]);
        assert_complete(&report, 6, 2);
        let namespace = report["config"]["namespace"].as_str().unwrap_or_default().to_string();
        assert!(namespace.starts_with("bench-"), "{report}");
        namespace
    };
    let (first, second) = (run(), run());
    assert_ne!(first, second, "two runs shared a namespace");
    // A namespace of the run's own is deleted at its end; one given with --namespace is kept.
    for ns in [&first, &second] {
        assert!(!stream_exists(&capstan::backends::nats_stream_of(ns)), "the stream of {ns} was left behind");
    }
    let chosen = bench(&["--broker", "nats", "--runs", "2", "--tasks", "2", "--namespace", "bench-chosen"]);
    assert_eq!(chosen["config"]["namespace"], "bench-chosen", "{chosen}");
    assert!(stream_exists(&capstan::backends::nats_stream_of("bench-chosen")), "a chosen namespace is kept");
}

/// `CAPSTAN_NATS_STORAGE=memory` puts the stream in memory (the dead letters stay on file) and
/// the report says so; a storage with another name is refused before anything runs.
#[test]
fn bench_over_nats_with_the_stream_in_memory() {
    let ns = format!("bench-mem-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let storage = [("CAPSTAN_NATS_STORAGE", "memory")];
    let report = bench_with(&storage, &["--broker", "nats", "--runs", "4", "--tasks", "2", "--namespace", &ns]);
    assert_complete(&report, 4, 2);
    assert_eq!(report["config"]["nats_storage"], "memory", "{report}");
    let stream = capstan::backends::nats_stream_of(&ns);
    let dead = format!("{stream}_DEAD");
    let kept = jetstream(|js| async move {
        let mut kept = Vec::new();
        for name in [stream, dead] {
            let mut s = js.get_stream(&name).await.unwrap_or_else(|e| panic!("stream {name}: {e}"));
            kept.push(s.info().await.expect("stream info").config.storage);
            js.delete_stream(&name).await.expect("delete the stream");
        }
        kept
    });
    use async_nats::jetstream::stream::StorageType;
    assert_eq!(kept, [StorageType::Memory, StorageType::File]);

    let out = Command::new(env!("CARGO_BIN_EXE_capstan"))
        .args(["bench", "--broker", "nats", "--runs", "1"])
        .env("CAPSTAN_NATS_STORAGE", "disk")
        .output()
        .expect("capstan runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("NATS storage `disk`"), "{stderr}");
}

fn stream_exists(name: &str) -> bool {
    let name = name.to_string();
    jetstream(|js| async move { js.get_stream(name).await.is_ok() })
}

/// Runs `f` with a JetStream context on the shared NATS server.
fn jetstream<T, F: Future<Output = T>>(f: impl FnOnce(async_nats::jetstream::Context) -> F) -> T {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let client = async_nats::connect("nats://127.0.0.1:4222").await.expect("NATS at 127.0.0.1:4222");
        f(async_nats::jetstream::new(client)).await
    })
}
