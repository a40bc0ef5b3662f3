//! A worker fleet over Kafka: 8 `capstan worker` processes share the queue of a task type as one
//! consumer group; one is killed with SIGKILL mid-run. Every task must still finish exactly once
//! as the engine records it (PostgreSQL store, the engine in this process).

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use capstan::runtime::{Runtime, RuntimeConfig, SystemClock, TriggerRequest, codec};
use capstan_brokers::kafka::{KafkaBroker, KafkaConfig};
use capstan_brokers::namespace::Namespaced;
use capstan_engine::run::Event;
use capstan_store::postgres::PostgresStore;
use capstan_store::{RunFilter, Store};

const FLEET: &str = r#"
apiVersion: capstan.dev/v1
kind: Shipyard
metadata: {name: fleet}
spec:
  stages:
    - name: dev
      sequences:
        - name: build
          tasks:
            - name: compile
              type: work
              dispatch: queue
              properties: {sleepMs: 400}
              timeouts: {scheduleToStart: 2m, startToClose: 4s, heartbeat: 1500ms}
              retry: {maxAttempts: 10, initialInterval: 200ms, maxInterval: 1s}
            - name: test
              type: work
              dispatch: queue
              properties: {sleepMs: 400}
              timeouts: {scheduleToStart: 2m, startToClose: 4s, heartbeat: 1500ms}
              retry: {maxAttempts: 10, initialInterval: 200ms, maxInterval: 1s}
"#;

const WORKERS: usize = 8;
const RUNS: usize = 30;

/// Kills the fleet when the test ends, however it ends.
struct Fleet(Vec<Child>);

impl Drop for Fleet {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_worker_fleet_loses_a_member_and_every_task_finishes_once() {
    let url = std::env::var("CAPSTAN_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test?sslmode=disable".into());
    let schema = format!("e2e_fleet_{}", uuid::Uuid::new_v4().simple());
    let pg = PostgresStore::connect_with_schema(&url, &schema)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {url} is needed (deploy/local/services.sh postgres): {e}"));
    let store: Arc<dyn Store> = Arc::new(pg.clone());
    let namespace = format!("fleet{}", uuid::Uuid::new_v4().simple());
    let config = KafkaConfig {
        session_timeout: Duration::from_secs(2),
        heartbeat_interval: Duration::from_millis(500),
        ..KafkaConfig::new("127.0.0.1:9092")
    };
    let kafka = KafkaBroker::connect(config)
        .await
        .unwrap_or_else(|e| panic!("Kafka is needed (deploy/local/services.sh kafka): {e}"));
    let broker: Arc<dyn capstan_brokers::Broker> = Arc::new(Namespaced::new(kafka, &namespace));
    let rt =
        Runtime::start(RuntimeConfig::default(), store.clone(), broker, Arc::new(SystemClock)).await.expect("runtime");
    rt.apply_definition("fleet", FLEET).await.expect("definition");

    let mut fleet = Fleet(Vec::new());
    for i in 0..WORKERS {
        let mut child = Command::new(env!("CARGO_BIN_EXE_capstan"))
            .args(["worker", "--broker", "kafka", "--broker-url", "127.0.0.1:9092", "--types", "work", "--slots", "2"])
            .args(["--id", &format!("fleet-{i}"), "--namespace", &namespace])
            .env("CAPSTAN_KAFKA_SESSION_TIMEOUT_MS", "2000")
            .env("CAPSTAN_KAFKA_HEARTBEAT_MS", "500")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("capstan worker starts");
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || for _ in BufReader::new(stdout).lines() {});
        fleet.0.push(child);
    }

    let mut run_ids = Vec::new();
    for i in 0..RUNS {
        let req = TriggerRequest {
            project: "fleet".into(),
            stage: "dev".into(),
            sequence: "build".into(),
            request_id: Some(format!("fleet-{i}")),
            ..TriggerRequest::default()
        };
        run_ids.push(rt.trigger(req).await.expect("trigger"));
    }

    // Kill one member while it holds an attempt (awarded to it, not yet ended).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
    let mut killed = false;
    loop {
        if !killed && holds_an_attempt(&*store, &run_ids, "fleet-0").await {
            let _ = fleet.0[0].kill();
            let _ = fleet.0[0].wait();
            killed = true;
        }
        let runs = store
            .list_runs(&RunFilter { project: Some("fleet".into()), limit: 1_000, ..RunFilter::default() })
            .await
            .expect("list");
        let over = runs.iter().filter(|r| r.is_over()).count();
        if over == RUNS {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "only {over} of {RUNS} runs ended");
        tokio::time::sleep(Duration::from_millis(if killed { 200 } else { 20 })).await;
    }
    assert!(killed, "a member was killed mid-run");

    let mut workers_seen: HashMap<String, usize> = HashMap::new();
    let mut timed_out = 0;
    for run_id in &run_ids {
        let stored = store.read_stream(run_id, 1).await.expect("stream");
        let mut ends: HashMap<String, usize> = HashMap::new();
        let mut awards: HashMap<(String, u32), usize> = HashMap::new();
        for s in &stored {
            match codec::decode_event(s).expect("decodes") {
                Event::TaskEnded { task, result, .. } => {
                    assert_eq!(result, capstan_proto::TaskResult::Pass, "run {run_id} task {task}");
                    *ends.entry(task).or_default() += 1;
                }
                Event::AttemptEnded { outcome: capstan_engine::run::AttemptOutcome::TimedOut { .. }, .. } => {
                    timed_out += 1;
                }
                Event::TaskAwarded { task, attempt, worker, .. } => {
                    *awards.entry((task, attempt)).or_default() += 1;
                    *workers_seen.entry(worker.id).or_default() += 1;
                }
                _ => {}
            }
        }
        assert_eq!(ends.len(), 2, "run {run_id}: both tasks end");
        assert!(ends.values().all(|n| *n == 1), "run {run_id}: a task ended twice: {ends:?}");
        assert!(awards.values().all(|n| *n == 1), "run {run_id}: an attempt was awarded twice: {awards:?}");
    }
    assert!(workers_seen.len() >= 2, "the fleet shared the work: {workers_seen:?}");
    assert!(timed_out >= 1, "the killed member's attempt was recovered by a timeout and a retry");
    eprintln!("fleet: awards per worker {workers_seen:?}; attempts recovered after timeouts: {timed_out}");
    rt.shutdown().await;
    drop(fleet);
    pg.drop_schema().await.expect("drop schema");
}

/// Whether `worker` holds an attempt now: awarded to it and not ended.
async fn holds_an_attempt(store: &dyn Store, run_ids: &[String], worker: &str) -> bool {
    for run_id in run_ids {
        let mut open: HashMap<(String, u32), bool> = HashMap::new();
        for s in store.read_stream(run_id, 1).await.expect("stream") {
            match codec::decode_event(&s).expect("decodes") {
                Event::TaskAwarded { task, attempt, worker: w, .. } if w.id == worker => {
                    open.insert((task, attempt), true);
                }
                Event::AttemptEnded { task, attempt, .. } => {
                    open.remove(&(task, attempt));
                }
                _ => {}
            }
        }
        if !open.is_empty() {
            return true;
        }
    }
    false
}
