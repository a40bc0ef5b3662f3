//! Crash tests: the runtime dies at random points (mid-batch, after commit before ack, after
//! publish before the outbox delete, before a broker ack) and restarts on the same store with a
//! fresh in-memory broker (the embedded broker dies with the process). Every run must still end,
//! each task result recorded exactly once, with no gap in any run's event sequence. A second
//! test kills `capstan demo` with SIGKILL and starts it again on the same folder.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use capstan::runtime::{Faults, RandomFaults, RuntimeConfig, TriggerRequest};
use capstan_engine::run::Event;
use capstan_proto::TaskResult;
use capstan_store::Store;
use capstan_store::sqlite::SqliteStore;

use crate::support::{Behaviour, Script, WorkerLog, engine, history, scripted_worker};

pub(crate) const DAG: &str = r#"
apiVersion: capstan.dev/v1
kind: Shipyard
metadata: {name: crashy}
spec:
  stages:
    - name: dev
      sequences:
        - name: dag
          tasks:
            - {name: build, type: work, timeouts: {startToClose: 1s, heartbeat: 400ms, scheduleToStart: 1s}, retry: {maxAttempts: 10, initialInterval: 50ms, maxInterval: 200ms}}
            - {name: unit, type: work, dependsOn: [build], timeouts: {startToClose: 1s, heartbeat: 400ms, scheduleToStart: 1s}, retry: {maxAttempts: 10, initialInterval: 50ms, maxInterval: 200ms}}
            - {name: lint, type: work, dependsOn: [build], dispatch: queue, timeouts: {startToClose: 1s, heartbeat: 400ms, scheduleToStart: 1s}, retry: {maxAttempts: 10, initialInterval: 50ms, maxInterval: 200ms}}
            - {name: package, type: work, dependsOn: [unit, lint], timeouts: {startToClose: 1s, heartbeat: 400ms, scheduleToStart: 1s}, retry: {maxAttempts: 10, initialInterval: 50ms, maxInterval: 200ms}}
"#;

const RUNS: usize = 24;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_survive_crashes_at_random_points() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("c.db")).await.expect("sqlite"));
    let script: Script = Arc::new(|_, _| Behaviour::Complete {
        after: Duration::from_millis(15),
        result: TaskResult::Pass,
        error: None,
    });
    let log = Arc::new(Mutex::new(WorkerLog::default()));

    // Incarnation 0 triggers every run, then dies at once.
    let (rt, _) = engine(store.clone(), RuntimeConfig::default()).await;
    rt.apply_definition("p", DAG).await.expect("definition");
    let mut run_ids = Vec::new();
    for i in 0..RUNS {
        run_ids.push(rt.trigger(dag_trigger(i)).await.expect("trigger"));
    }
    rt.abort();

    let mut crashes: HashMap<String, usize> = HashMap::new();
    let started = Instant::now();
    for incarnation in 1u64.. {
        let all_over = all_over(&*store, &run_ids).await;
        if all_over {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "runs did not finish; crashes so far: {crashes:?}");
        // The last incarnations run without faults so that the test always terminates.
        let faulty = incarnation <= 40;
        let faults =
            if faulty { Faults::with(Arc::new(RandomFaults::new(incarnation * 7919, 0.03))) } else { Faults::none() };
        let config = RuntimeConfig { faults, ..RuntimeConfig::default() };
        let (rt, broker) = engine(store.clone(), config).await;
        let workers = scripted_worker(broker, "w", BTreeMap::new(), &["work"], script.clone(), log.clone()).await;
        let crashed = tokio::select! {
            p = rt.crashed() => Some(p),
            _ = wait_all_over(&*store, &run_ids) => None,
            _ = tokio::time::sleep(Duration::from_secs(if faulty { 3 } else { 60 })) => None,
        };
        rt.abort();
        for w in workers {
            w.abort();
        }
        if let Some(point) = crashed {
            *crashes.entry(format!("{point:?}")).or_default() += 1;
        }
    }
    let total: usize = crashes.values().sum();
    assert!(total >= 10, "too few crashes were injected to mean anything: {crashes:?}");

    for run_id in &run_ids {
        let events = history(&*store, run_id).await;
        check_recorded_once(run_id, &events);
    }
}

/// The trigger of run `i` of `DAG` in project `p`, idempotent by its request id.
pub(crate) fn dag_trigger(i: usize) -> TriggerRequest {
    TriggerRequest {
        project: "p".into(),
        stage: "dev".into(),
        sequence: "dag".into(),
        request_id: Some(format!("run-{i}")),
        ..Default::default()
    }
}

pub(crate) async fn all_over(store: &dyn Store, run_ids: &[String]) -> bool {
    for id in run_ids {
        match store.get_run(id).await.expect("get_run") {
            Some(r) if r.is_over() => {}
            _ => return false,
        }
    }
    true
}

async fn wait_all_over(store: &dyn Store, run_ids: &[String]) {
    while !all_over(store, run_ids).await {
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// One award per attempt, one result per attempt, one end per task, one end per run, all passed.
pub(crate) fn check_recorded_once(run_id: &str, events: &[Event]) {
    let mut awards: HashMap<(String, u32), usize> = HashMap::new();
    let mut attempt_ends: HashMap<(String, u32), usize> = HashMap::new();
    let mut task_ends: HashMap<String, Vec<TaskResult>> = HashMap::new();
    let mut run_ends = Vec::new();
    for e in events {
        match e {
            Event::TaskAwarded { task, attempt, .. } => *awards.entry((task.clone(), *attempt)).or_default() += 1,
            Event::AttemptEnded { task, attempt, .. } => {
                *attempt_ends.entry((task.clone(), *attempt)).or_default() += 1
            }
            Event::TaskEnded { task, result, .. } => task_ends.entry(task.clone()).or_default().push(*result),
            Event::RunFinished { result, .. } => run_ends.push(*result),
            _ => {}
        }
    }
    assert!(awards.values().all(|n| *n == 1), "run {run_id}: an attempt was awarded twice: {awards:?}");
    assert!(attempt_ends.values().all(|n| *n == 1), "run {run_id}: an attempt ended twice: {attempt_ends:?}");
    assert_eq!(task_ends.len(), 4, "run {run_id}: every task ends: {task_ends:?}");
    for (task, ends) in &task_ends {
        assert_eq!(ends, &vec![TaskResult::Pass], "run {run_id}: task {task} recorded {ends:?}");
    }
    assert_eq!(run_ends, vec![TaskResult::Pass], "run {run_id}: one end per run");
}

#[test]
fn the_demo_resumes_after_kill_minus_nine() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = env!("CARGO_BIN_EXE_capstan");
    let mut child = Command::new(bin)
        .args(["demo", "--data"])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("capstan demo starts");
    let stdout = child.stdout.take().expect("stdout");
    let mut seen = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("utf-8 output");
        let mid_run = line.contains("staging/delivery") && line.contains("awarded");
        seen.push(line);
        if mid_run {
            break;
        }
    }
    assert!(
        seen.iter().any(|l| l.contains("staging/delivery")),
        "the demo never reached staging:\n{}",
        seen.join("\n")
    );
    child.kill().expect("SIGKILL");
    let _ = child.wait();

    let out = Command::new(bin).args(["demo", "--data"]).arg(dir.path()).output().expect("capstan demo runs again");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("resuming"), "the second start must resume:\n{text}");
    assert!(!text.contains("triggered dev.delivery"), "the second start must not start new runs:\n{text}");
    assert!(out.status.success(), "the resumed demo must finish as expected:\n{text}");
}

/// Crashes at the `n`-th commit's `AfterCommit` point: after the commit, before its messages
/// reach the relay.
struct CrashAfterCommit {
    n: usize,
    seen: std::sync::atomic::AtomicUsize,
}

impl capstan::runtime::FaultInjector for CrashAfterCommit {
    fn should_crash(&self, point: capstan::runtime::FaultPoint) -> bool {
        matches!(point, capstan::runtime::FaultPoint::AfterCommit)
            && self.seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == self.n
    }
}

/// An award has no outbox row: a crash between its commit and its publication loses it, and the
/// restart sends it again from the run's state. The timeouts are an hour, so only the derived
/// award can move the run on; the worker and the broker live through the crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_award_lost_with_a_crash_is_sent_again_at_restart() {
    const ONE_TASK: &str = r#"
apiVersion: capstan.dev/v1
kind: Shipyard
metadata: {name: once}
spec:
  stages:
    - name: dev
      sequences:
        - name: one
          tasks:
            - {name: build, type: work, dispatch: queue, timeouts: {startToClose: 1h, scheduleToStart: 1h}}
"#;
    let dir = tempfile::tempdir().expect("tempdir");
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("a.db")).await.expect("sqlite"));
    let broker: Arc<dyn capstan_brokers::Broker> = Arc::new(capstan_brokers::memory::MemoryBroker::new());
    let script: Script =
        Arc::new(|_, _| Behaviour::Complete { after: Duration::from_millis(5), result: TaskResult::Pass, error: None });
    let log = Arc::new(Mutex::new(WorkerLog::default()));
    let _worker = scripted_worker(broker.clone(), "w", BTreeMap::new(), &["work"], script, log.clone()).await;

    // The run's start is the first commit, the worker's claim (the award) the second.
    let crash = Arc::new(CrashAfterCommit { n: 2, seen: Default::default() });
    let config = RuntimeConfig { faults: Faults::with(crash), ..RuntimeConfig::default() };
    let start = |config| {
        capstan::runtime::Runtime::start(config, store.clone(), broker.clone(), Arc::new(capstan::runtime::SystemClock))
    };
    let rt = start(config).await.expect("runtime starts");
    rt.apply_definition("p", ONE_TASK).await.expect("definition");
    let trigger =
        TriggerRequest { project: "p".into(), stage: "dev".into(), sequence: "one".into(), ..Default::default() };
    let run_id = rt.trigger(trigger).await.expect("trigger");
    let point = tokio::time::timeout(Duration::from_secs(10), rt.crashed()).await.expect("the award's commit crashes");
    assert_eq!(point, capstan::runtime::FaultPoint::AfterCommit);
    rt.abort();
    let awarded = |events: &[Event]| events.iter().filter(|e| matches!(e, Event::TaskAwarded { .. })).count();
    assert_eq!(awarded(&history(&*store, &run_id).await), 1, "the award is committed");
    assert!(log.lock().expect("log").awards.is_empty(), "the award never reached the worker");

    let rt = start(RuntimeConfig::default()).await.expect("runtime restarts");
    let record = crate::support::wait_run_over(&*store, &run_id, Duration::from_secs(20)).await;
    assert_eq!(record.result.as_deref(), Some("pass"));
    let events = history(&*store, &run_id).await;
    assert_eq!(awarded(&events), 1, "the award was sent again, not made again: {events:?}");
    assert_eq!(log.lock().expect("log").awards.len(), 1, "the worker got the award once");
    rt.shutdown().await;
}
