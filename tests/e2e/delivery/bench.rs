//! The delivery tests' bench: one runtime over a memory store and broker, the delivery workers
//! built from a `[workers]` configuration as `capstan server` builds them, test tools, a fake
//! Prometheus, a test clock, and helpers to read run histories.

use std::collections::{BTreeMap, BTreeSet};
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
use capstan_engine::run::{Event, NextSequence, render_history};
use capstan_proto::{CloudEvent, TaskResult, topics};
use capstan_store::memory::MemoryStore;
use capstan_store::{RunFilter, RunRecord, Store};
use capstan_workers::{Handler, Outcome, TaskContext, Worker, WorkerConfig, bid_for_actions};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::support::history;

pub fn path(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(relative)
}

pub fn read(relative: &str) -> String {
    std::fs::read_to_string(path(relative)).expect("file")
}

/// The system clock plus an offset the test moves forward.
#[derive(Default)]
pub struct TestClock {
    pub offset_ms: AtomicI64,
}

impl Clock for TestClock {
    fn now_ms(&self) -> i64 {
        SystemClock.now_ms() + self.offset_ms.load(Ordering::SeqCst)
    }
}

/// What a test worker did.
#[derive(Debug, Clone)]
pub struct Call {
    pub worker: String,
    pub stage: String,
    pub task: String,
    pub input: Value,
}

/// The monitored service: the Prometheus answers and the remediation actions act on it.
#[derive(Default)]
pub struct Service {
    /// 95th percentile response time in ms.
    pub p95: AtomicU64,
}

/// The test tools: deployment, test, release, rollback, action, notify. A `test` reports the
/// measurements the trigger data scripts for its stage (`measured.<stage>`) as `values`; an
/// `action` whose name is in `fixes` brings the service's response time back to 300 ms.
#[derive(Clone)]
pub struct Tools {
    pub calls: Arc<Mutex<Vec<Call>>>,
    pub service: Arc<Service>,
    pub fixes: Arc<BTreeSet<String>>,
}

#[async_trait]
impl Handler for Tools {
    async fn handle(&self, task: TaskContext) -> Outcome {
        let stage = task.place().map(|p| p.stage.clone()).unwrap_or_default();
        let name = task.award().attempt.task.clone();
        let input = task.input().clone();
        self.calls.lock().expect("calls").push(Call {
            worker: task.worker_id().to_string(),
            stage: stage.clone(),
            task: name.clone(),
            input: input.clone(),
        });
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
pub async fn fake_prometheus(service: Arc<Service>) -> (String, JoinHandle<()>) {
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
pub struct Bench {
    pub rt: RuntimeHandle,
    pub store: Arc<dyn Store>,
    pub broker: Arc<dyn Broker>,
    pub clock: Arc<TestClock>,
    pub calls: Arc<Mutex<Vec<Call>>>,
    pub service: Arc<Service>,
    pub stop: watch::Sender<bool>,
    pub tasks: Vec<JoinHandle<()>>,
}

/// Files of a bench: the shipyard, and the `[workers]` section's files.
pub struct Setup<'a> {
    pub shipyard: String,
    pub slo: &'a str,
    pub sli: &'a str,
    pub remediation: &'a str,
    /// Actions that fix the service.
    pub fixes: &'a [&'a str],
}

impl Bench {
    pub async fn start(setup: Setup<'_>) -> Bench {
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
        let types = ["deployment", "test", "release", "rollback", "webhook"];
        // One action provider per action: each bids only for the actions it performs.
        let workers = [
            Worker::new(WorkerConfig::new("tools", types).slots(8), tools.clone()),
            Worker::new(WorkerConfig::new("scaler", ["action"]), tools.clone())
                .bid_with(bid_for_actions(BTreeMap::new(), ["scaling"])),
            Worker::new(WorkerConfig::new("toggler", ["action"]), tools)
                .bid_with(bid_for_actions(BTreeMap::new(), ["toggle-feature"])),
        ];
        for worker in workers {
            let (broker, mut stop) = (broker.clone(), stop_rx.clone());
            tasks.push(tokio::spawn(async move {
                let shutdown = async move { while stop.changed().await.is_ok() && !*stop.borrow() {} };
                let _ = worker.run(broker, shutdown).await;
            }));
        }
        Bench { rt, store, broker, clock, calls, service, stop, tasks }
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        self.rt.shutdown().await;
        for t in self.tasks {
            t.abort();
        }
    }

    pub async fn deliver(&self, service: &str, measured: Value) -> String {
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
    pub async fn problem(&self, title: &str, root_cause: Option<&str>) -> String {
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

    pub async fn runs(&self, context: &str) -> Vec<RunRecord> {
        let filter = RunFilter { context_id: Some(context.into()), ..RunFilter::default() };
        let mut runs = self.store.list_runs(&filter).await.expect("list");
        runs.sort_by_key(|r| (r.created_at_ms, r.run_id.clone()));
        runs
    }

    /// Waits until `pred` holds for the context's runs (and their histories).
    pub async fn wait_for(&self, context: &str, what: &str, pred: impl Fn(&[(RunRecord, Vec<Event>)]) -> bool) {
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
    pub async fn drive(&self, context: &str) -> Vec<(RunRecord, Vec<Event>)> {
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

    pub fn calls(&self, stage: &str, task: &str) -> Vec<Call> {
        let calls = self.calls.lock().expect("calls");
        calls.iter().filter(|c| c.stage == stage && c.task == task).cloned().collect()
    }
}

pub const PROBLEM_TRIGGER: &str = "sh.keptn.event.production.remediation.triggered";

pub fn next_of(events: &[Event]) -> Vec<NextSequence> {
    events
        .iter()
        .find_map(|e| match e {
            Event::RunFinished { next, .. } => Some(next.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

pub fn render(runs: &[(RunRecord, Vec<Event>)]) -> String {
    runs.iter().map(|(r, e)| format!("\n{} {}:\n{}", r.stage, r.sequence, render_history(e))).collect()
}

/// A run's history without times, tokens and worker ids: what happened, in order.
pub fn steps(events: &[Event]) -> Vec<String> {
    render_history(events)
        .lines()
        .map(|line| {
            line.split_whitespace()
                .skip(2)
                .filter(|w| !w.starts_with("token=") && !w.starts_with("until=") && !w.starts_with("worker="))
                .collect::<Vec<_>>()
                .join(" ")
        })
        // Dispatch details and the service's lane (tested in lanes.rs) are left out.
        .filter(|l| {
            !["task-offered", "task-awarded", "bid-recorded", "run-queued", "run-admitted"]
                .iter()
                .any(|p| l.starts_with(p))
        })
        .collect()
}

pub fn output_of<'e>(events: &'e [Event], task: &str) -> &'e Value {
    events
        .iter()
        .find_map(|e| match e {
            Event::TaskEnded { task: t, output, .. } if t == task => Some(output),
            _ => None,
        })
        .unwrap_or_else(|| panic!("task {task} did not end"))
}

pub fn result(run: &RunRecord) -> TaskResult {
    TaskResult::parse(run.result.as_deref().unwrap_or("")).expect("a result")
}

/// Per run of a remediation: (action taken or none, evaluation result or none, run result).
pub fn rounds(runs: &[(RunRecord, Vec<Event>)]) -> Vec<(String, String, String)> {
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
