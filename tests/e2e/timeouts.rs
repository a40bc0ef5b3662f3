//! Every timeout path end to end through the runtime's durable timers: a worker that never
//! starts, one that stops heartbeating, one that runs too long; a retry with backoff; a worker
//! that answers twice. Each time the task must still end, recorded exactly once.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capstan::runtime::{RuntimeConfig, TriggerRequest};
use capstan_engine::run::{AttemptOutcome, Event, TimeoutKind};
use capstan_proto::TaskResult;
use capstan_store::Store;
use capstan_store::memory::MemoryStore;

use crate::support::{Behaviour, Script, WorkerLog, engine, history, scripted_worker, wait_run_over};

const ONE_TASK: &str = r#"
apiVersion: capstan.dev/v1
kind: Shipyard
metadata: {name: timeouts}
spec:
  stages:
    - name: dev
      sequences:
        - name: run
          tasks:
            - name: work
              type: work
              retry: {maxAttempts: 3, initialInterval: 100ms, backoffCoefficient: 2, maxInterval: 400ms}
              timeouts: {scheduleToStart: 700ms, startToClose: 900ms, heartbeat: 300ms}
"#;

/// Runs the one-task sequence with a script; returns the run's history and the workers' log.
async fn run_with(script: Script) -> (Vec<Event>, WorkerLog, TaskResult) {
    run_until(script, |_| true).await
}

/// Like `run_with`, and after the run ended also waits (bounded) until the workers' log satisfies
/// `settled`, so late answers are in before the history is read.
async fn run_until(script: Script, settled: impl Fn(&WorkerLog) -> bool) -> (Vec<Event>, WorkerLog, TaskResult) {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let (rt, broker) = engine(store.clone(), RuntimeConfig::default()).await;
    let log = Arc::new(Mutex::new(WorkerLog::default()));
    let workers = scripted_worker(broker, "w1", BTreeMap::new(), &["work"], script, log.clone()).await;
    rt.apply_definition("p", ONE_TASK).await.expect("definition applies");
    let run_id = rt
        .trigger(TriggerRequest {
            project: "p".into(),
            stage: "dev".into(),
            sequence: "run".into(),
            ..Default::default()
        })
        .await
        .expect("trigger");
    let record = wait_run_over(&*store, &run_id, Duration::from_secs(20)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !settled(&log.lock().expect("log")) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Give the last message sent (second answers, stale tokens) time to be refused.
    tokio::time::sleep(Duration::from_millis(200)).await;
    rt.shutdown().await;
    for w in workers {
        w.abort();
    }
    let events = history(&*store, &run_id).await;
    let result = TaskResult::parse(record.result.as_deref().unwrap_or("")).expect("a result");
    let log = log.lock().expect("log").clone();
    (events, log, result)
}

fn attempt_outcomes(events: &[Event]) -> Vec<(u32, AttemptOutcome, bool)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::AttemptEnded { attempt, outcome, retry_at, .. } => {
                Some((*attempt, outcome.clone(), retry_at.is_some()))
            }
            _ => None,
        })
        .collect()
}

fn ended_once(events: &[Event]) -> TaskResult {
    let ends: Vec<TaskResult> = events
        .iter()
        .filter_map(|e| match e {
            Event::TaskEnded { result, .. } => Some(*result),
            _ => None,
        })
        .collect();
    assert_eq!(ends.len(), 1, "the task must end exactly once: {events:#?}");
    let finishes = events.iter().filter(|e| matches!(e, Event::RunFinished { .. })).count();
    assert_eq!(finishes, 1, "the run must end exactly once");
    ends[0]
}

fn ok_after(ms: u64) -> Behaviour {
    Behaviour::Complete { after: Duration::from_millis(ms), result: TaskResult::Pass, error: None }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_never_starts_times_out_and_the_retry_passes() {
    let script: Script = Arc::new(|_, attempt| if attempt == 1 { Behaviour::NeverStart } else { ok_after(20) });
    let (events, _, result) = run_with(script).await;
    let outcomes = attempt_outcomes(&events);
    assert!(
        matches!(
            outcomes[0],
            (1, AttemptOutcome::TimedOut { timeout: TimeoutKind::ScheduleToStart | TimeoutKind::StartToClose }, true)
        ),
        "{outcomes:?}"
    );
    assert_eq!(ended_once(&events), TaskResult::Pass);
    assert_eq!(result, TaskResult::Pass);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_stops_heartbeating_is_detected() {
    let script: Script = Arc::new(|_, attempt| if attempt == 1 { Behaviour::StopHeartbeating } else { ok_after(20) });
    let (events, _, _) = run_with(script).await;
    let outcomes = attempt_outcomes(&events);
    assert!(
        matches!(outcomes[0], (1, AttemptOutcome::TimedOut { timeout: TimeoutKind::Heartbeat }, true)),
        "{outcomes:?}"
    );
    assert_eq!(ended_once(&events), TaskResult::Pass);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_runs_too_long_is_cut_off_and_its_late_answer_refused() {
    let script: Script = Arc::new(|_, attempt| {
        if attempt == 1 { Behaviour::RunTooLong { after: Duration::from_millis(1_500) } } else { ok_after(20) }
    });
    let (events, log, _) = run_until(script, |log| log.finished.iter().any(|f| f.2 == 1)).await;
    let outcomes = attempt_outcomes(&events);
    assert!(
        matches!(outcomes[0], (1, AttemptOutcome::TimedOut { timeout: TimeoutKind::StartToClose }, true)),
        "{outcomes:?}"
    );
    assert_eq!(outcomes.len(), 2, "the late answer of attempt 1 must not count: {outcomes:?}");
    assert_eq!(ended_once(&events), TaskResult::Pass);
    // The late answer of attempt 1 arrives after the run ended or after attempt 2 took over:
    // either way it must not count.
    assert!(log.finished.iter().any(|(_, _, attempt, _)| *attempt == 1), "the slow worker did answer late");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retryable_error_is_retried_after_a_backoff_within_bounds() {
    let script: Script = Arc::new(|_, attempt| {
        if attempt == 1 {
            Behaviour::Complete { after: Duration::from_millis(10), result: TaskResult::Fail, error: Some("flaky") }
        } else {
            ok_after(10)
        }
    });
    let (events, _, result) = run_with(script).await;
    let retry = events.iter().find_map(|e| match e {
        Event::AttemptEnded { attempt: 1, retry_at: Some(r), at, .. } => Some(r.since(*at)),
        _ => None,
    });
    let delay = retry.expect("attempt 1 scheduled a retry");
    assert!((50..=400).contains(&delay), "backoff {delay} ms outside [initial/2, max]");
    assert_eq!(ended_once(&events), TaskResult::Pass);
    assert_eq!(result, TaskResult::Pass);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_answer_is_refused_and_recorded() {
    let script: Script = Arc::new(|_, _| Behaviour::AnswerTwice);
    let (events, log, _) = run_until(script, |log| log.finished.len() >= 2).await;
    assert_eq!(log.finished.len(), 2, "the worker answered twice");
    assert_eq!(ended_once(&events), TaskResult::Pass);
    let accepted = events.iter().filter(|e| matches!(e, Event::AttemptEnded { .. })).count();
    assert_eq!(accepted, 1, "exactly one result recorded");
}

/// The one-task sequence on the queue with timeouts long enough to be kept in memory, and
/// re-offers `reoffer` seconds away at first.
fn long_timeouts(reoffer: u64) -> String {
    let retry = format!(
        "dispatch: queue\n              retry: {{maxAttempts: 2, initialInterval: {reoffer}s, backoffCoefficient: 2, maxInterval: {}s}}",
        reoffer * 4
    );
    let yaml = ONE_TASK
        .replace("retry: {maxAttempts: 3, initialInterval: 100ms, backoffCoefficient: 2, maxInterval: 400ms}", &retry)
        .replace(
            "{scheduleToStart: 700ms, startToClose: 900ms, heartbeat: 300ms}",
            "{scheduleToStart: 1m, startToClose: 2500ms}",
        );
    assert!(yaml.contains("dispatch: queue") && yaml.contains("startToClose: 2500ms"), "{yaml}");
    yaml
}

/// A partition keeps a new timer in memory for up to a second. A runtime that crashes in that
/// second loses it, and the next one must derive it again from the run's events: here the
/// start-to-close deadline of a worker that took the task and fell silent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_kept_in_memory_still_fires_after_a_crash() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let (rt, broker) = engine(store.clone(), RuntimeConfig::default()).await;
    let log = Arc::new(Mutex::new(WorkerLog::default()));
    let script: Script = Arc::new(|_, attempt| if attempt == 1 { Behaviour::NeverStart } else { ok_after(10) });
    let workers = scripted_worker(broker, "w1", BTreeMap::new(), &["work"], script.clone(), log.clone()).await;
    rt.apply_definition("p", &long_timeouts(1)).await.expect("definition applies");
    let request =
        TriggerRequest { project: "p".into(), stage: "dev".into(), sequence: "run".into(), ..Default::default() };
    let run_id = rt.trigger(request).await.expect("trigger");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while log.lock().expect("log").awards.is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "the task was never awarded");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    rt.abort();
    for w in workers {
        w.abort();
    }
    let stored: Vec<String> =
        store.timers_due(i64::MAX, 100).await.expect("timers").into_iter().map(|t| t.key).collect();
    assert!(
        !stored.iter().any(|k| k.starts_with("start-to-close/")),
        "the deadline must still be in memory only when the runtime dies: {stored:?}"
    );

    let (rt, broker) = engine(store.clone(), RuntimeConfig::default()).await;
    let workers = scripted_worker(broker, "w2", BTreeMap::new(), &["work"], script, log.clone()).await;
    let record = wait_run_over(&*store, &run_id, Duration::from_secs(20)).await;
    rt.shutdown().await;
    for w in workers {
        w.abort();
    }
    let events = history(&*store, &run_id).await;
    let outcomes = attempt_outcomes(&events);
    assert!(
        matches!(outcomes[0], (1, AttemptOutcome::TimedOut { timeout: TimeoutKind::StartToClose }, true)),
        "{outcomes:?}"
    );
    assert_eq!(ended_once(&events), TaskResult::Pass);
    assert_eq!(record.result.as_deref(), Some("pass"));
}

/// Timers moot within a second never reach the store: runs whose tasks finish at once write
/// no timer rows at all, though each task sets three (re-offer, schedule-to-start and
/// start-to-close deadlines). The timer checkpoints then reach the end of the log, those of
/// partitions that got few runs or none included, so a recovery would read nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_lived_timers_never_reach_the_store() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let (rt, broker) = engine(store.clone(), RuntimeConfig { partitions: 8, ..RuntimeConfig::default() }).await;
    let log = Arc::new(Mutex::new(WorkerLog::default()));
    let script: Script = Arc::new(|_, _| ok_after(0));
    let workers = scripted_worker(broker, "w1", BTreeMap::new(), &["work"], script, log.clone()).await;
    // A re-offer 5-10 s away: every timer of a task is written only if the task is still
    // under way a second after it was offered. One run at a time, so none waits for the worker.
    rt.apply_definition("p", &long_timeouts(10)).await.expect("definition applies");
    for _ in 0..10 {
        let request =
            TriggerRequest { project: "p".into(), stage: "dev".into(), sequence: "run".into(), ..Default::default() };
        let run_id = rt.trigger(request).await.expect("trigger");
        wait_run_over(&*store, &run_id, Duration::from_secs(20)).await;
    }
    // A checkpoint moves at most once a second, after a commit or when its partition idles.
    let end = store.last_position().await.expect("log end");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let checkpoints = store.timer_checkpoints().await.expect("checkpoints");
        if checkpoints.len() == 8 && checkpoints.iter().all(|(_, at)| *at == end) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "checkpoints {checkpoints:?} never reached {end}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    rt.shutdown().await;
    for w in workers {
        w.abort();
    }
    let metrics = rt.metrics();
    let kept = metrics.timers_kept.load(std::sync::atomic::Ordering::Relaxed);
    let written = metrics.timers_written.load(std::sync::atomic::Ordering::Relaxed);
    assert!(kept >= 30, "three timers per task are kept in memory, {kept} were ({written} written)");
    assert_eq!(written, 0, "no timer of these runs lived long enough to be written");
    assert!(store.timers_due(i64::MAX, 10).await.expect("timers").is_empty());
}
