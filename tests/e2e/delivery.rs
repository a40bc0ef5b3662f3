//! Keptn-grade delivery end to end, in process: the real delivery workers (evaluation, static
//! and Prometheus SLI providers, get-action) built from a `[workers]` configuration as
//! `capstan server` builds them, test workers for deployment, test, release, rollback, action
//! and notification, and a test clock that jumps over `triggeredAfter` waits.
//!
//! - examples/delivery/shipyard.yaml: a gate that passes promotes dev -> staging -> production,
//!   where a manual approval waits for a person; a failing gate blocks (staging never starts);
//!   a warning waits for a person whose rejection ends the delivery and rolls staging back.
//! - Keptn's own form with the sockshop shipyard UNCHANGED: the remediation sequence
//!   re-triggers itself on `evaluation.result: fail` until an action fixes the SLI, or until
//!   get-action runs out of actions (unresolved); the Capstan example escalates then.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use capstan::cli::demo_workers::spawn_delivery;
use capstan::config::Config;
use capstan::runtime::{Clock, Runtime, RuntimeConfig, RuntimeHandle, SystemClock, TriggerRequest};
use capstan_brokers::memory::MemoryBroker;
use capstan_brokers::{Broker, Message};
use capstan_engine::run::{Event, Input, NextSequence, render_history};
use capstan_proto::{CloudEvent, TaskResult, topics};
use capstan_store::memory::MemoryStore;
use capstan_store::{RunFilter, RunRecord, Store};
use capstan_workers::{Handler, Outcome, TaskContext, Worker, WorkerConfig};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::support::history;

fn path(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(path(relative)).expect("file")
}

/// The system clock plus an offset the test moves forward.
#[derive(Default)]
struct TestClock {
    offset_ms: AtomicI64,
}

impl Clock for TestClock {
    fn now_ms(&self) -> i64 {
        SystemClock.now_ms() + self.offset_ms.load(Ordering::SeqCst)
    }
}

/// What a test worker did.
#[derive(Debug, Clone)]
struct Call {
    stage: String,
    task: String,
    input: Value,
}

/// The monitored service: the Prometheus answers and the remediation actions act on it.
#[derive(Default)]
struct Service {
    /// 95th percentile response time in ms.
    p95: AtomicU64,
}

/// The test tools: deployment, test, release, rollback, action, notify. A `test` reports the
/// measurements the trigger data scripts for its stage (`measured.<stage>`) as `values`; an
/// `action` whose name is in `fixes` brings the service's response time back to 300 ms.
#[derive(Clone)]
struct Tools {
    calls: Arc<Mutex<Vec<Call>>>,
    service: Arc<Service>,
    fixes: Arc<BTreeSet<String>>,
}

#[async_trait]
impl Handler for Tools {
    async fn handle(&self, task: TaskContext) -> Outcome {
        let stage = task.place().map(|p| p.stage.clone()).unwrap_or_default();
        let name = task.award().attempt.task.clone();
        let input = task.input().clone();
        self.calls.lock().expect("calls").push(Call { stage: stage.clone(), task: name.clone(), input: input.clone() });
        match task.award().task_type.as_str() {
            "test" => Outcome::pass(json!({"values": input["measured"][&stage]})),
            "action" => {
                let action = capstan_workers::chosen_action(&input).unwrap_or_default().to_string();
                if self.fixes.contains(&action) {
                    self.service.p95.store(300, Ordering::SeqCst);
                }
                Outcome::pass(json!({"performed": action}))
            }
            _ => Outcome::pass(json!({ format!("{name}_by"): task.worker_id() })),
        }
    }
}

/// A fake Prometheus: every query answers the service's response time, except error-rate
/// queries (0) and throughput queries (42).
async fn fake_prometheus(service: Arc<Service>) -> (String, JoinHandle<()>) {
    use axum::extract::{RawQuery, State};
    let app = axum::Router::new()
        .route(
            "/api/v1/query",
            axum::routing::get(|State(s): State<Arc<Service>>, RawQuery(q): RawQuery| async move {
                // Form-encoded `query=...&time=...`; only the error-rate query names a status.
                let query = q.unwrap_or_default();
                let value = if query.contains("status") {
                    0.0
                } else if query.starts_with("query=sum") {
                    42.0
                } else {
                    s.p95.load(Ordering::SeqCst) as f64
                };
                axum::Json(json!({"status": "success", "data": {"resultType": "vector",
                    "result": [{"metric": {}, "value": [0, value.to_string()]}]}}))
            }),
        )
        .with_state(service);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    (url, tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") }))
}

/// One runtime with its workers.
struct Bench {
    rt: RuntimeHandle,
    store: Arc<dyn Store>,
    broker: Arc<dyn Broker>,
    clock: Arc<TestClock>,
    calls: Arc<Mutex<Vec<Call>>>,
    service: Arc<Service>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// Files of a bench: the shipyard, and the `[workers]` section's files.
struct Setup<'a> {
    shipyard: String,
    slo: &'a str,
    sli: &'a str,
    remediation: &'a str,
    /// Actions that fix the service.
    fixes: &'a [&'a str],
}

impl Bench {
    async fn start(setup: Setup<'_>) -> Bench {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::new());
        let clock = Arc::new(TestClock::default());
        let rt = Runtime::start(RuntimeConfig::default(), store.clone(), broker.clone(), clock.clone())
            .await
            .expect("runtime starts");
        rt.apply_definition("sockshop", &setup.shipyard).await.expect("the shipyard applies");
        let service = Arc::new(Service { p95: AtomicU64::new(900) });
        let (prometheus, server) = fake_prometheus(service.clone()).await;
        // The same configuration `capstan server` reads (paths relative to the repository).
        let toml = format!(
            r#"
            [workers]
            slots = 4
            [workers.evaluation]
            slo = {{ sockshop = "{slo}" }}
            sli_provider = "prometheus"
            [workers.prometheus]
            url = "{prometheus}"
            sli = {{ sockshop = "{sli}" }}
            # Delivery stages measure in their test task; get-sli passes the values on.
            types = ["get-sli-prometheus"]
            [workers.static_sli]
            [workers.get_action]
            remediation = {{ "sockshop/production" = "{remediation}" }}
            "#,
            slo = path(setup.slo).display(),
            sli = path(setup.sli).display(),
            remediation = path(setup.remediation).display(),
        );
        let config = Config::parse(&toml, "bench.toml").expect("config");
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = spawn_delivery(&config.workers, "bench-", broker.clone(), stop_rx.clone()).expect("workers");
        tasks.push(server);
        let calls = Arc::new(Mutex::new(Vec::new()));
        let tools = Tools {
            calls: calls.clone(),
            service: service.clone(),
            fixes: Arc::new(setup.fixes.iter().map(|s| s.to_string()).collect()),
        };
        let types = ["deployment", "test", "release", "rollback", "action", "webhook"];
        let worker = Worker::new(WorkerConfig::new("tools", types).slots(8), tools);
        let broker2 = broker.clone();
        let mut stop2 = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            let _ =
                worker.run(broker2, async move { while stop2.changed().await.is_ok() && !*stop2.borrow() {} }).await;
        }));
        Bench { rt, store, broker, clock, calls, service, stop, tasks }
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        self.rt.shutdown().await;
        for t in self.tasks {
            t.abort();
        }
    }

    async fn deliver(&self, service: &str, measured: Value) -> String {
        let data = json!({"project": "sockshop", "stage": "dev", "service": service, "measured": measured});
        let run = self
            .rt
            .trigger(TriggerRequest {
                project: "sockshop".into(),
                stage: "dev".into(),
                sequence: "delivery".into(),
                service: Some(service.into()),
                data,
                ..Default::default()
            })
            .await
            .expect("trigger");
        self.store.get_run(&run).await.expect("get").expect("run").context_id
    }

    /// Publishes Keptn's `sh.keptn.event.production.remediation.triggered` on the broker, as
    /// any producer may; returns its context id.
    async fn problem(&self, title: &str, root_cause: Option<&str>) -> String {
        let context = uuid::Uuid::new_v4().to_string();
        let data = json!({
            "project": "sockshop", "stage": "production", "service": "carts",
            "problem": {"problemTitle": title, "rootCause": root_cause, "state": "OPEN"},
        });
        let event = CloudEvent::new(uuid::Uuid::new_v4().to_string(), "prometheus-alerts", PROBLEM_TRIGGER)
            .with_data(data)
            .with_ext("shkeptncontext", &context);
        let message = Message { topic: topics::ENGINE_INPUTS.into(), key: context.clone(), event };
        self.broker.publish(vec![message]).await.expect("publish");
        context
    }

    async fn runs(&self, context: &str) -> Vec<RunRecord> {
        let filter = RunFilter { context_id: Some(context.into()), ..RunFilter::default() };
        let mut runs = self.store.list_runs(&filter).await.expect("list");
        runs.sort_by_key(|r| (r.created_at_ms, r.run_id.clone()));
        runs
    }

    /// Waits until `pred` holds for the context's runs (and their histories).
    async fn wait_for(&self, context: &str, what: &str, pred: impl Fn(&[(RunRecord, Vec<Event>)]) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let mut runs = Vec::new();
            for r in self.runs(context).await {
                let events = history(&*self.store, &r.run_id).await;
                runs.push((r, events));
            }
            if pred(&runs) {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}: {}", render(&runs));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Drives a context to its end: whenever a run waits for nothing but its `triggeredAfter`
    /// delay, the clock jumps past it; done when every run ended and every promotion a run
    /// recorded has started. Returns the runs in order with their histories.
    async fn drive(&self, context: &str) -> Vec<(RunRecord, Vec<Event>)> {
        let mut jumped = BTreeSet::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
        loop {
            let mut runs = Vec::new();
            for r in self.runs(context).await {
                let events = history(&*self.store, &r.run_id).await;
                runs.push((r, events));
            }
            for (r, events) in &runs {
                if let Some(Event::TaskDelayed { task, until, .. }) = events.last()
                    && !r.is_over()
                    && jumped.insert((r.run_id.clone(), task.clone()))
                {
                    let ahead = until.0 as i64 - self.clock.now_ms() + 1_000;
                    self.clock.offset_ms.fetch_add(ahead.max(0), Ordering::SeqCst);
                }
            }
            let promised: usize = runs.iter().map(|(_, e)| next_of(e).len()).sum();
            if !runs.is_empty() && runs.iter().all(|(r, _)| r.is_over()) && runs.len() == promised + 1 {
                return runs;
            }
            assert!(tokio::time::Instant::now() < deadline, "the context did not settle: {}", render(&runs));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn calls(&self, stage: &str, task: &str) -> Vec<Call> {
        let calls = self.calls.lock().expect("calls");
        calls.iter().filter(|c| c.stage == stage && c.task == task).cloned().collect()
    }
}

const PROBLEM_TRIGGER: &str = "sh.keptn.event.production.remediation.triggered";

fn next_of(events: &[Event]) -> Vec<NextSequence> {
    events
        .iter()
        .find_map(|e| match e {
            Event::RunFinished { next, .. } => Some(next.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

fn render(runs: &[(RunRecord, Vec<Event>)]) -> String {
    runs.iter().map(|(r, e)| format!("\n{} {}:\n{}", r.stage, r.sequence, render_history(e))).collect()
}

/// A run's history without times, tokens and worker ids: what happened, in order.
fn steps(events: &[Event]) -> Vec<String> {
    render_history(events)
        .lines()
        .map(|line| {
            line.split_whitespace()
                .skip(2)
                .filter(|w| !w.starts_with("token=") && !w.starts_with("until=") && !w.starts_with("worker="))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .filter(|l| !l.starts_with("task-offered") && !l.starts_with("task-awarded") && !l.starts_with("bid-recorded"))
        .collect()
}

fn output_of<'e>(events: &'e [Event], task: &str) -> &'e Value {
    events
        .iter()
        .find_map(|e| match e {
            Event::TaskEnded { task: t, output, .. } if t == task => Some(output),
            _ => None,
        })
        .unwrap_or_else(|| panic!("task {task} did not end"))
}

fn result(run: &RunRecord) -> TaskResult {
    TaskResult::parse(run.result.as_deref().unwrap_or("")).expect("a result")
}

fn example() -> Setup<'static> {
    Setup {
        shipyard: read("examples/delivery/shipyard.yaml"),
        slo: "examples/delivery/slo.yaml",
        sli: "examples/delivery/sli-prometheus.yaml",
        remediation: "examples/delivery/remediation.yaml",
        fixes: &[],
    }
}

fn measured(dev_p95: u64, staging_p95: u64) -> Value {
    json!({
        "dev": {"response_time_p95": dev_p95, "error_rate": 0.0, "throughput": 120},
        "staging": {"response_time_p95": staging_p95, "error_rate": 0.002, "throughput": 300},
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passing_gate_promotes_to_an_approval_and_a_failing_gate_blocks() {
    let bench = Bench::start(example()).await;

    // carts measures well everywhere: dev and staging pass their gates, production waits for a
    // person before it deploys anything.
    let carts = bench.deliver("carts", measured(310, 420)).await;
    bench
        .wait_for(&carts, "production to wait for its approval", |runs| {
            runs.iter()
                .any(|(r, e)| r.stage == "production" && e.iter().any(|e| matches!(e, Event::ApprovalRequested { .. })))
        })
        .await;
    let runs = bench.runs(&carts).await;
    let stages: Vec<_> = runs.iter().map(|r| format!("{}.{}", r.stage, r.sequence)).collect();
    assert_eq!(stages, ["dev.delivery", "staging.delivery", "production.delivery"]);
    let dev = history(&*bench.store, &runs[0].run_id).await;
    assert_eq!(
        steps(&dev),
        [
            "run-started",
            "task-started deployment#1",
            "attempt-ended deployment#1 pass",
            "task-ended deployment finished pass",
            "task-started test#1",
            "attempt-ended test#1 pass",
            "task-ended test finished pass",
            "task-started get-sli#1",
            "attempt-ended get-sli#1 pass",
            "task-ended get-sli finished pass",
            "task-started evaluation#1",
            "attempt-ended evaluation#1 pass",
            "task-ended evaluation finished pass",
            "task-started release#1",
            "attempt-ended release#1 pass",
            "task-ended release finished pass",
            "run-finished finished pass next=staging.delivery",
        ]
        .map(|s| s.replace("run-started", &format!("run-started {} dev.delivery", runs[0].run_id)))
        .as_slice(),
        "{}",
        render_history(&dev)
    );
    assert_eq!(output_of(&dev, "evaluation")["score"], json!(100.0));
    let staging = history(&*bench.store, &runs[1].run_id).await;
    assert_eq!(output_of(&staging, "evaluation")["evaluation"]["objectives"][0]["value"], json!(420.0));
    assert!(steps(&staging).contains(&"task-ended approval finished pass".to_string()), "a pass approves itself");
    assert!(bench.calls("production", "deployment").is_empty(), "nothing is deployed before the approval");

    // Approval through the runtime's command API, as `capstan approve` sends it.
    let prod = &runs[2].run_id;
    let approve = Input::Approve { task: "approval".into(), approved: true, by: "alice".into() };
    bench.rt.command("sockshop", prod, approve).await.expect("approve");
    bench.wait_for(&carts, "production to finish", |runs| runs.iter().all(|(r, _)| r.is_over())).await;
    let prod_events = history(&*bench.store, prod).await;
    let prod_steps = steps(&prod_events);
    assert_eq!(prod_steps[1..3], ["approval-requested approval", "task-ended approval finished pass"]);
    assert_eq!(output_of(&prod_events, "approval"), &json!({"approval": {"approved": true, "by": "alice"}}));
    assert_eq!(prod_steps.last().map(String::as_str), Some("run-finished finished pass"));
    assert_eq!(bench.calls("production", "deployment").len(), 1);

    // orders is too slow in dev: its gate fails, the run fails, staging never starts.
    let orders = bench.deliver("orders", measured(950, 420)).await;
    bench.wait_for(&orders, "dev to end", |runs| runs.iter().all(|(r, _)| r.is_over())).await;
    // A promotion would be recorded in the dev run's end; give a wrongly started one time to show.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let runs = bench.runs(&orders).await;
    assert_eq!(runs.len(), 1, "only dev ran: {runs:?}");
    let dev = history(&*bench.store, &runs[0].run_id).await;
    assert_eq!(result(&runs[0]), TaskResult::Fail);
    let dev_steps = steps(&dev);
    assert!(dev_steps.contains(&"task-ended evaluation finished fail".to_string()), "{dev_steps:#?}");
    assert!(dev_steps.contains(&"task-ended release skipped".to_string()), "{dev_steps:#?}");
    assert_eq!(dev_steps.last().map(String::as_str), Some("run-finished finished fail"));
    assert_eq!(output_of(&dev, "evaluation")["evaluation"]["objectives"][0]["status"], json!("fail"));
    assert!(bench.calls("staging", "deployment").iter().all(|c| c.input["service"] != "orders"));
    bench.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warning_waits_for_a_person_and_a_rejection_ends_the_delivery() {
    let bench = Bench::start(example()).await;
    // 700 ms in staging is a warning (half the response-time score: 75 %), so the staging
    // approval (`warning: manual`) waits.
    let carts = bench.deliver("carts", measured(300, 700)).await;
    bench
        .wait_for(&carts, "staging to wait for its approval", |runs| {
            runs.iter()
                .any(|(r, e)| r.stage == "staging" && e.iter().any(|e| matches!(e, Event::ApprovalRequested { .. })))
        })
        .await;
    let staging = bench.runs(&carts).await[1].clone();
    let events = history(&*bench.store, &staging.run_id).await;
    assert_eq!(output_of(&events, "evaluation")["score"], json!(75.0));
    assert!(steps(&events).contains(&"task-ended evaluation finished warning".to_string()));
    assert!(bench.calls("staging", "release").is_empty());

    let reject = Input::Approve { task: "approval".into(), approved: false, by: "bob".into() };
    bench.rt.command("sockshop", &staging.run_id, reject).await.expect("reject");
    let runs = bench.drive(&carts).await;
    let stages: Vec<_> =
        runs.iter().map(|(r, _)| format!("{}.{} {}", r.stage, r.sequence, result(r).as_str())).collect();
    assert_eq!(stages, ["dev.delivery pass", "staging.delivery fail", "staging.rollback pass"], "{}", render(&runs));
    let staging_steps = steps(&runs[1].1);
    let tail: Vec<&str> = staging_steps.iter().rev().take(3).rev().map(String::as_str).collect();
    assert_eq!(
        tail,
        [
            "task-ended approval finished fail",
            "task-ended release skipped",
            "run-finished finished fail next=staging.rollback"
        ]
    );
    assert!(bench.calls("staging", "release").is_empty() && bench.calls("production", "deployment").is_empty());
    assert_eq!(bench.calls("staging", "rollback").len(), 1);
    bench.stop().await;
}

/// Keptn's sockshop shipyard, unchanged, with its SLO and SLI files.
fn keptn(remediation: &'static str, fixes: &'static [&'static str]) -> Setup<'static> {
    Setup {
        shipyard: read("engine/tests/fixtures/keptn/shipyard-sockshop.yaml"),
        slo: "engine/tests/fixtures/keptn/slo-quality-gates.yaml",
        sli: "engine/tests/fixtures/keptn/sli-config-prometheus.yaml",
        remediation,
        fixes,
    }
}

/// Per run of a remediation: (action taken or none, evaluation result or none, run result).
fn rounds(runs: &[(RunRecord, Vec<Event>)]) -> Vec<(String, String, String)> {
    runs.iter()
        .map(|(r, events)| {
            let action = output_of(events, "get-action")["action"]["action"].as_str().unwrap_or("-").to_string();
            let evaluation = events
                .iter()
                .find_map(|e| match e {
                    Event::TaskEnded { task, status, result, .. } if task == "evaluation" => {
                        Some(if *status == capstan_engine::run::TaskStatus::Skipped {
                            "skipped"
                        } else {
                            result.as_str()
                        })
                    }
                    _ => None,
                })
                .unwrap_or("-")
                .to_string();
            (action, evaluation, format!("{}.{} {}", r.stage, r.sequence, result(r).as_str()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keptn_remediation_loops_until_the_second_action_fixes_the_service() {
    // The sockshop shipyard unchanged; remediation.yaml with two actions for the problem (the
    // fixture's own has one per problem type: see the next test).
    let bench = Bench::start(keptn("examples/delivery/remediation.yaml", &["toggle-feature"])).await;
    let context = bench.problem("Response time degradation", None).await;
    let runs = bench.drive(&context).await;
    assert_eq!(
        rounds(&runs),
        [
            ("scaling".into(), "fail".into(), "production.remediation fail".into()),
            ("toggle-feature".into(), "pass".into(), "production.remediation pass".into()),
        ],
        "{}",
        render(&runs)
    );
    // Every step is in the event log: the action chosen, performed, the wait, the evaluation.
    let first = steps(&runs[0].1);
    let expected = [
        "task-started get-action#1",
        "attempt-ended get-action#1 pass",
        "task-ended get-action finished pass",
        "task-started action#1",
        "attempt-ended action#1 pass",
        "task-ended action finished pass",
        "task-delayed evaluation",
        "task-started evaluation#1",
        "attempt-ended evaluation#1 fail",
        "task-ended evaluation finished fail",
        "run-finished finished fail next=production.remediation",
    ];
    assert_eq!(first[1..], expected, "{}", render_history(&runs[0].1));
    assert_eq!(output_of(&runs[0].1, "evaluation")["evaluation"]["objectives"][0]["value"], json!(900.0));
    let second = &runs[1].1;
    assert_eq!(output_of(second, "get-action")["actionIndex"], json!(2));
    assert_eq!(output_of(second, "get-action")["action"]["value"], json!({"EnablePromotion": "off"}));
    assert_eq!(output_of(second, "evaluation")["evaluation"]["objectives"][0]["value"], json!(300.0));
    assert_eq!(steps(second).last().map(String::as_str), Some("run-finished finished pass"));
    // The action worker saw the action get-action chose and the problem it answers.
    let actions = bench.calls("production", "action");
    assert_eq!(actions.len(), 2);
    assert_eq!(actions[1].input["action"]["action"], "toggle-feature");
    assert_eq!(actions[1].input["problem"]["problemTitle"], "Response time degradation");
    assert_eq!(bench.service.p95.load(Ordering::SeqCst), 300);
    bench.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keptn_fixture_remediation_runs_out_of_actions_and_stays_unresolved() {
    // The fixture's shipyard and remediation.yaml unchanged: the root cause response_time_p90
    // has one action (scale up by "1"); it does not help, the loop comes round once more, and
    // get-action has nothing left: the remediation ends unresolved.
    let bench = Bench::start(keptn("engine/tests/fixtures/keptn/remediation.yaml", &[])).await;
    let context = bench.problem("Response time degradation", Some("response_time_p90")).await;
    let runs = bench.drive(&context).await;
    assert_eq!(
        rounds(&runs),
        [
            ("scaling".into(), "fail".into(), "production.remediation fail".into()),
            ("-".into(), "skipped".into(), "production.remediation fail".into()),
        ],
        "{}",
        render(&runs)
    );
    assert_eq!(output_of(&runs[0].1, "get-action")["action"]["value"], json!("1"), "the root cause's action");
    let exhausted = output_of(&runs[1].1, "get-action");
    assert_eq!(exhausted["remediationExhausted"], json!(true));
    let message = exhausted["message"].as_str().expect("a message");
    assert!(message.contains("no action left") && message.contains("response_time_p90"), "{message}");
    assert_eq!(
        steps(&runs[1].1)[1..],
        [
            "task-started get-action#1",
            "attempt-ended get-action#1 fail",
            "task-ended get-action finished fail",
            "task-ended action skipped",
            "task-ended evaluation skipped",
            "run-finished finished fail",
        ]
    );
    assert_eq!(bench.calls("production", "action").len(), 1);
    bench.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_remediation_escalates_when_no_action_helps() {
    let bench = Bench::start(example()).await;
    let context = bench.problem("Response time degradation", None).await;
    let runs = bench.drive(&context).await;
    let summary: Vec<String> =
        runs.iter().map(|(r, _)| format!("{}.{} {}", r.stage, r.sequence, result(r).as_str())).collect();
    assert_eq!(
        summary,
        [
            "production.remediation fail",
            "production.remediation fail",
            "production.remediation fail",
            "production.escalation pass",
        ],
        "{}",
        render(&runs)
    );
    assert_eq!(rounds(&runs[..3])[2].0, "-");
    assert_eq!(next_of(&runs[2].1), [NextSequence { stage: "production".into(), sequence: "escalation".into() }]);
    // The notification got the whole story: who, where, and why it gave up.
    let notify = bench.calls("production", "notify");
    assert_eq!(notify.len(), 1);
    assert_eq!(notify[0].input["service"], "carts");
    assert!(
        notify[0].input["message"].as_str().unwrap_or("").contains("all 2 action(s) were taken"),
        "{:?}",
        notify[0].input
    );
    bench.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_and_keptn_problems_over_http_start_remediations() {
    use capstan::api::auth::Auth;
    use capstan::api::{Api, ApiServer};
    let bench = Bench::start(keptn("examples/delivery/remediation.yaml", &["scaling"])).await;
    let api = Api { runtime: bench.rt.clone(), auth: Auth::disabled(), limits: Default::default() };
    let any = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let server = ApiServer::start(api, any, any, None).await.expect("API starts");
    let http = format!("http://{}", server.http_addr());
    let client = reqwest::Client::new();

    // An Alertmanager notification, the project in the URL, the rest in the alert's labels.
    let notification = json!({"version": "4", "status": "firing", "receiver": "capstan", "alerts": [{
        "status": "firing", "fingerprint": "a1b2", "startsAt": "2026-11-27T01:00:00Z",
        "labels": {"alertname": "Response time degradation", "stage": "production", "service": "carts"},
        "annotations": {"summary": "p95 over 600 ms"},
    }]});
    let url = format!("{http}/v1/alerts/alertmanager?project=sockshop");
    let answer: Value = client.post(&url).json(&notification).send().await.expect("post").json().await.expect("json");
    let context = answer["started"][0]["keptnContext"].as_str().expect("started").to_string();
    let runs = bench.drive(&context).await;
    assert_eq!(rounds(&runs), [("scaling".into(), "pass".into(), "production.remediation pass".into())]);
    assert_eq!(runs[0].0.service.as_deref(), Some("carts"));
    let action = &bench.calls("production", "action")[0];
    assert_eq!(action.input["problem"]["problemDetails"]["summary"], "p95 over 600 ms");
    // Alertmanager repeats the notification while the alert fires: no second remediation.
    let again: Value = client.post(&url).json(&notification).send().await.expect("post").json().await.expect("json");
    assert_eq!(again["started"], json!([]));
    assert_eq!(again["skipped"][0]["reason"], "a remediation of this firing already started");

    // Keptn's problem event on the CloudEvents endpoint; a closed one starts nothing.
    let problem = |id: &str, state: &str| {
        json!({"specversion": "1.0", "id": id, "source": "dynatrace", "type": "sh.keptn.events.problem",
               "data": {"State": state, "ProblemID": "762", "ProblemTitle": "Response time degradation",
                        "project": "sockshop", "stage": "production", "service": "orders"}})
    };
    let post = |body: Value| {
        client
            .post(format!("{http}/v1/events"))
            .header("content-type", "application/cloudevents+json")
            .body(body.to_string())
            .send()
    };
    let response = post(problem("p1", "OPEN")).await.expect("post");
    assert_eq!(response.status(), reqwest::StatusCode::ACCEPTED);
    let answer: Value = response.json().await.expect("json");
    let runs = bench.drive(answer["keptnContext"].as_str().expect("context")).await;
    assert_eq!(rounds(&runs), [("scaling".into(), "pass".into(), "production.remediation pass".into())]);
    assert_eq!(runs[0].0.service.as_deref(), Some("orders"));
    let response = post(problem("p2", "CLOSED")).await.expect("post");
    assert_eq!(response.status(), reqwest::StatusCode::OK);
    let filter = RunFilter { sequence: Some("remediation".into()), ..RunFilter::default() };
    assert_eq!(bench.store.list_runs(&filter).await.expect("list").len(), 2, "the closed problem started nothing");
    server.stop().await;
    bench.stop().await;
}

#[test]
fn capstan_validate_accepts_every_example_file() {
    let dir = path("examples/delivery");
    let mut names: Vec<_> = std::fs::read_dir(&dir).expect("examples").map(|e| e.expect("entry").file_name()).collect();
    names.sort();
    let mut summaries = Vec::new();
    for name in &names {
        let file = dir.join(name);
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_capstan"))
            .args(["validate", "-f", &file.display().to_string()])
            .output()
            .expect("capstan runs");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{}: {text}", file.display());
        summaries.push(text.lines().nth(1).unwrap_or_default().to_string());
    }
    assert_eq!(
        summaries,
        [
            "server configuration; delivery workers: evaluation (evaluation), prometheus (get-sli-prometheus), \
             static_sli (get-sli), webhook (webhook), get_action (get-action)",
            "remediation carts-remediation: Response time degradation (2 action(s)), Failure rate increase (1 \
             action(s)), default (1 action(s))",
            "sockshop (capstan.dev/v1)",
            "sli: error_rate, response_time_p95, throughput",
            "slo: 3 objective(s)",
        ],
        "{names:?}"
    );
    // A broken file is named with its problem.
    let bad = tempfile::tempdir().expect("tempdir");
    let toml = bad.path().join("capstan.toml");
    std::fs::write(&toml, "[workers.get_action]\nremediation = { sockshop = \"missing.yaml\" }\n").expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_capstan"))
        .args(["validate", "-f", &toml.display().to_string()])
        .output()
        .expect("capstan runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("workers.get_action.remediation.sockshop") && text.contains("missing.yaml"), "{text}");
}
