//! Native remediation runbooks end to end: a problem starts the runbook sequence; each action is
//! performed by the worker of its type, then the SLIs are measured and the real quality gate
//! decides; the run stops "resolved" at the first gate that passes, and escalates and ends
//! "unresolved" when the actions run out. Every step is in the event log.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use capstan::runtime::{Runtime, RuntimeConfig, RuntimeHandle, SystemClock, TriggerRequest};
use capstan_brokers::Broker;
use capstan_brokers::memory::MemoryBroker;
use capstan_engine::run::{Event, TaskStatus};
use capstan_proto::TaskResult;
use capstan_store::Store;
use capstan_store::memory::MemoryStore;
use capstan_workers::{
    EvaluationConfig, EvaluationWorker, Handler, Outcome, ScopedFiles, TaskContext, Worker, WorkerConfig,
};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::support::{history, spawn_worker, wait_run_over};

const SHIPYARD: &str = r#"
apiVersion: capstan.dev/v1
kind: Shipyard
metadata: {name: carts}
spec:
  stages:
    - name: production
      sequences:
        - name: remediation
          runbook:
            evaluateAfter: 200ms
            escalation: {type: page, properties: {team: carts-oncall}}
            remediations:
              - problemType: Response time degradation
                actionsOnOpen:
                  - {action: scaling, name: scale up, description: Add a replica, value: 1}
                  - {action: toggle-feature, name: promotion off, value: {EnablePromotion: "off"}}
"#;

const SLO: &str = r#"
spec_version: "1.0"
comparison: {compare_with: single_result, include_result_with_score: pass, aggregate_function: avg}
objectives:
  - sli: response_time_p95
    key_sli: true
    pass: [{criteria: ["<600"]}]
total_score: {pass: "90%", warning: "75%"}
"#;

/// The service under repair: its response time, what was done to it, and who was paged.
#[derive(Default)]
struct Service {
    p95: Mutex<f64>,
    actions: Mutex<Vec<String>>,
    pages: Mutex<Vec<Value>>,
}

/// Performs an action on the service: scaling does not help; the feature toggle does when the
/// problem is the promotion feature (`cause: promotion` in the trigger data).
struct ActionTool(Arc<Service>);

#[async_trait]
impl Handler for ActionTool {
    async fn handle(&self, task: TaskContext) -> Outcome {
        let action = task.input()["action"]["action"].as_str().unwrap_or_default().to_string();
        self.0.actions.lock().expect("lock").push(action.clone());
        if action == "toggle-feature" && task.input()["cause"] == "promotion" {
            *self.0.p95.lock().expect("lock") = 210.0;
        }
        Outcome::pass(json!({"performed": action}))
    }
}

/// The SLI provider: measures the service now.
struct Measure(Arc<Service>);

#[async_trait]
impl Handler for Measure {
    async fn handle(&self, _task: TaskContext) -> Outcome {
        Outcome::pass(json!({"sli": {"response_time_p95": *self.0.p95.lock().expect("lock")}}))
    }
}

/// The escalation: pages the on-call team.
struct Pager(Arc<Service>);

#[async_trait]
impl Handler for Pager {
    async fn handle(&self, task: TaskContext) -> Outcome {
        self.0.pages.lock().expect("lock").push(task.input().clone());
        Outcome::pass(json!({"paged": task.input()["team"]}))
    }
}

struct Setup {
    rt: RuntimeHandle,
    store: Arc<dyn Store>,
    service: Arc<Service>,
    _stops: Vec<watch::Sender<bool>>,
    _dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let slo = dir.path().join("slo.yaml");
    std::fs::write(&slo, SLO).expect("write slo");
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::new());
    let rt = Runtime::start(RuntimeConfig::default(), store.clone(), broker.clone(), Arc::new(SystemClock))
        .await
        .expect("runtime starts");
    let service = Arc::new(Service { p95: Mutex::new(900.0), ..Default::default() });
    let gate = EvaluationWorker::new(EvaluationConfig {
        slo_files: ScopedFiles::new().with("p/production/carts", slo),
        ..Default::default()
    });
    let stops = vec![
        spawn_worker(
            Worker::new(WorkerConfig::new("ops", ["scaling", "toggle-feature"]), ActionTool(service.clone())),
            broker.clone(),
        ),
        spawn_worker(
            Worker::new(WorkerConfig::new("prometheus", ["get-sli"]), Measure(service.clone())),
            broker.clone(),
        ),
        spawn_worker(Worker::new(WorkerConfig::new("gate", ["evaluation"]), gate), broker.clone()),
        spawn_worker(Worker::new(WorkerConfig::new("pager", ["page"]), Pager(service.clone())), broker.clone()),
    ];
    rt.apply_definition("p", SHIPYARD).await.expect("definition");
    Setup { rt, store, service, _stops: stops, _dir: dir }
}

async fn problem(s: &Setup, cause: &str) -> (String, Vec<Event>) {
    let run_id =
        s.rt.trigger(TriggerRequest {
            project: "p".into(),
            stage: "production".into(),
            sequence: "remediation".into(),
            service: Some("carts".into()),
            data: json!({
                "problem": {"problemTitle": "Response time degradation", "rootCause": "unknown", "state": "OPEN"},
                "cause": cause,
            }),
            ..Default::default()
        })
        .await
        .expect("trigger");
    wait_run_over(&*s.store, &run_id, Duration::from_secs(30)).await;
    let events = history(&*s.store, &run_id).await;
    (run_id, events)
}

/// `task -> (status, result)` of every task end, in order.
fn ends(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::TaskEnded { task, status, result, .. } if *status == TaskStatus::Skipped => {
                let _ = result;
                Some(format!("{task}: skipped"))
            }
            Event::TaskEnded { task, result, .. } => Some(format!("{task}: {}", result.as_str())),
            _ => None,
        })
        .collect()
}

fn run_result(events: &[Event]) -> Option<TaskResult> {
    events.iter().find_map(|e| match e {
        Event::RunFinished { result, .. } => Some(*result),
        _ => None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn action_one_does_not_help_action_two_does_and_the_run_is_resolved() {
    let s = setup().await;
    let (_, events) = problem(&s, "promotion").await;
    assert_eq!(
        ends(&events),
        [
            "action-1: pass",
            "get-sli-1: pass",
            "evaluation-1: fail",
            "action-2: pass",
            "get-sli-2: pass",
            "evaluation-2: pass",
            "escalation: skipped"
        ]
    );
    assert_eq!(run_result(&events), Some(TaskResult::Pass));
    assert_eq!(*s.service.actions.lock().expect("lock"), ["scaling", "toggle-feature"]);
    assert!(s.service.pages.lock().expect("lock").is_empty(), "nobody is paged for a resolved problem");
    // The wait after each action is in the log: the measurement was delayed, not offered at once.
    let delays =
        events.iter().filter(|e| matches!(e, Event::TaskDelayed { task, .. } if task.starts_with("get-sli"))).count();
    assert_eq!(delays, 2);
    s.rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_actions_run_out_the_run_escalates_and_ends_unresolved() {
    let s = setup().await;
    let (_, events) = problem(&s, "memory leak").await;
    assert_eq!(
        ends(&events),
        [
            "action-1: pass",
            "get-sli-1: pass",
            "evaluation-1: fail",
            "action-2: pass",
            "get-sli-2: pass",
            "evaluation-2: fail",
            "escalation: pass"
        ]
    );
    assert_eq!(run_result(&events), Some(TaskResult::Fail), "unresolved");
    let pages = s.service.pages.lock().expect("lock").clone();
    assert_eq!(pages.len(), 1);
    assert_eq!(pages[0]["team"], "carts-oncall");
    // The pager sees what was tried: the last gate's verdict travels in its input.
    assert_eq!(pages[0]["evaluation"]["result"], "fail");
    s.rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_runbook_is_valid_and_picks_actions_by_root_cause_then_title() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/runbook");
    let text = std::fs::read_to_string(dir.join("shipyard.yaml")).expect("example shipyard");
    capstan_engine::slo::parse(&std::fs::read_to_string(dir.join("slo.yaml")).expect("example slo"))
        .expect("the example slo.yaml is valid");
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::new());
    let rt = Runtime::start(RuntimeConfig::default(), store.clone(), broker, Arc::new(SystemClock))
        .await
        .expect("runtime starts");
    rt.apply_definition("sockshop", &text).await.expect("the example applies");
    let tasks_for = async |problem: Value| {
        let run_id = rt
            .trigger(TriggerRequest {
                project: "sockshop".into(),
                stage: "production".into(),
                sequence: "remediation".into(),
                service: Some("carts".into()),
                data: json!({ "problem": problem }),
                ..Default::default()
            })
            .await
            .expect("trigger");
        // No workers: the run stays at its first task; cancel it so the lane frees up.
        let first = loop {
            let events = history(&*store, &run_id).await;
            if let Some(task) = events.iter().find_map(|e| match e {
                Event::TaskOffered { task, .. } => Some(task.clone()),
                _ => None,
            }) {
                break task;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        rt.command("sockshop", &run_id, capstan_engine::run::Input::Cancel { reason: "test".into() })
            .await
            .expect("cancel");
        wait_run_over(&*store, &run_id, Duration::from_secs(5)).await;
        let ended: Vec<String> = history(&*store, &run_id)
            .await
            .into_iter()
            .filter_map(|e| match e {
                Event::TaskEnded { task, .. } => Some(task),
                _ => None,
            })
            .collect();
        (first, ended)
    };
    let (first, tasks) =
        tasks_for(json!({"problemTitle": "Response time degradation", "rootCause": "response_time_p90"})).await;
    assert_eq!(first, "action-1");
    assert_eq!(
        tasks.len(),
        7,
        "two actions of the root cause, each measured and gated, then the escalation: {tasks:?}"
    );
    let (_, tasks) = tasks_for(json!({"problemTitle": "Response time degradation"})).await;
    assert_eq!(tasks, ["action-1", "get-sli-1", "evaluation-1", "escalation"]);
    let (first, tasks) = tasks_for(json!({"problemTitle": "Disk full"})).await;
    assert_eq!((first.as_str(), tasks.len()), ("escalation", 1));
    rt.shutdown().await;
}
