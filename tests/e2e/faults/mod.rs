//! The fault suite: `capstan server` (a private PostgreSQL cluster behind a fault proxy, a private
//! broker) and four `capstan worker` processes with ledgers run a 6-task DAG (fan-out / fan-in, a
//! claim-free queue task, a deliberate failure retried, a start-to-close timeout whose late
//! result must be refused, an automatic approval, a non-idempotent remediation) across 3 projects, while a fault thread
//! kills the server (restarted each time), kills workers mid-task, stops a worker past its
//! heartbeat lease and continues it, crashes the broker, restarts PostgreSQL with `-m immediate`
//! and cuts the database connections. The checker then compares the store with the ledgers (see
//! `checker`). One harness, run over each broker: the full short suite over NATS (500 runs), a
//! smaller one over NATS with the stream in memory, over RabbitMQ and over Kafka (Tansu), each
//! broker a private instance.
//!
//! Short mode by default; `CAPSTAN_FAULTS_LONG=1` is the long mode (10,000 runs over an hour over
//! NATS; run it with `cargo test`, see docs/guarantees.md).
//! `CAPSTAN_FAULTS_SEED` replays a fault schedule.

mod checker;
mod procs;
mod proxy;
mod schedule;
pub(crate) mod services;

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use capstan_proto::grpc::v1 as pb;
use capstan_store::Store;
use capstan_store::postgres::PostgresStore;
use pb::definition_service_client::DefinitionServiceClient;
use pb::run_service_client::RunServiceClient;

use procs::{Server, WorkerProc};
use proxy::FaultProxy;
use schedule::{Cluster, Counts, Mode};
use services::{BrokerKind, PrivateBroker, PrivatePostgres};

const DAG: &str = r#"
apiVersion: capstan.dev/v1
kind: Shipyard
metadata: {name: faulty}
spec:
  stages:
    - name: dev
      sequences:
        - name: dag
          tasks:
            - {name: prepare, type: fw-work, dependsOn: [], timeouts: {scheduleToStart: 3s, startToClose: 5s, heartbeat: 1500ms}, retry: {maxAttempts: 12, initialInterval: 100ms, maxInterval: 500ms}}
            - {name: build-a, type: fw-work, dependsOn: [prepare], properties: {failAttempts: 1}, timeouts: {scheduleToStart: 3s, startToClose: 5s, heartbeat: 1500ms}, retry: {maxAttempts: 12, initialInterval: 100ms, maxInterval: 500ms}}
            - {name: build-b, type: fw-work, dependsOn: [prepare], dispatch: queue, claim: false, timeouts: {scheduleToStart: 3s, startToClose: 5s, heartbeat: 1500ms}, retry: {maxAttempts: 12, initialInterval: 100ms, maxInterval: 500ms}}
            - {name: slow, type: fw-work, dependsOn: [prepare], properties: {stallAttempts: 1, stallMs: 2500}, timeouts: {scheduleToStart: 3s, startToClose: 1s, heartbeat: 1500ms}, retry: {maxAttempts: 12, initialInterval: 100ms, maxInterval: 500ms}}
            - {name: approve, type: approval, dependsOn: [build-a, build-b, slow], properties: {pass: automatic, warning: automatic}}
            - {name: remediate, type: fw-action, dependsOn: [approve], idempotent: false, timeouts: {scheduleToStart: 3s, startToClose: 5s, heartbeat: 1500ms}, retry: {maxAttempts: 12, initialInterval: 100ms, maxInterval: 500ms}}
"#;

const PROJECTS: [&str; 3] = ["fp-alpha", "fp-beta", "fp-gamma"];
const WORKERS: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_exactly_once_under_faults() {
    suite(BrokerKind::Nats).await;
}

/// The smaller suite over NATS with the stream in memory storage: the broker's crash empties
/// the stream (docs/brokers.md, "Storage").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_exactly_once_under_faults_over_nats_with_the_stream_in_memory() {
    suite(BrokerKind::NatsInMemory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_exactly_once_under_faults_over_rabbitmq() {
    suite(BrokerKind::RabbitMq).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_exactly_once_under_faults_over_kafka() {
    suite(BrokerKind::Kafka).await;
}

async fn suite(kind: BrokerKind) {
    let mode = Mode::from_env(kind);
    let dir = tempfile::tempdir().expect("tempdir");
    let pg = PrivatePostgres::create();
    let broker = PrivateBroker::start(kind, dir.path());
    let proxy = FaultProxy::start(format!("127.0.0.1:{}", pg.port).parse().expect("address")).await;
    let schema = "capstan_faults";
    let store_url = pg.url().replace(&format!("127.0.0.1:{}", pg.port), &proxy.addr.to_string());
    let config = format!(
        "auth = \"none\"\nbuiltin_workers = false\n[store]\nurl = \"{store_url}\"\nschema = \"{schema}\"\n\
         [broker]\nkind = \"{}\"\nurl = \"{}\"\n[listen]\ngrpc = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\n",
        kind.config_name(),
        broker.url()
    );
    let mut server = Server::new(dir.path(), &config, kind.env());
    server.start_until_up();
    let broker_url = broker.url();
    let workers: Vec<WorkerProc> = (1..=WORKERS)
        .map(|i| {
            let broker = (kind.config_name(), broker_url.as_str(), kind.env());
            WorkerProc::start(dir.path(), &format!("fw-{i}"), broker, "fw-work,fw-action")
        })
        .collect();
    let ledgers: Vec<_> = workers.iter().map(|w| w.ledger.clone()).collect();
    let worker_ids: HashSet<String> = workers.iter().map(|w| w.id.clone()).collect();
    let grpc = Arc::new(Mutex::new(server.grpc.clone()));
    for project in PROJECTS {
        call(&grpc, |ch| async move {
            let req = pb::ApplyDefinitionRequest { project: project.into(), source: DAG.into() };
            DefinitionServiceClient::new(ch).apply(req).await.map(|_| ())
        })
        .await;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let met = Arc::new(AtomicBool::new(false));
    let pg_url = pg.url();
    let cluster = Cluster { server, workers, broker, pg, proxy, grpc: grpc.clone() };
    let mut injector = Injector {
        stop: stop.clone(),
        thread: Some({
            let (stop, met) = (stop.clone(), met.clone());
            std::thread::spawn(move || schedule::inject(cluster, mode, stop, met))
        }),
    };

    let started = Instant::now();
    let mut run_ids = Vec::new();
    // The workload goes on past `mode.runs` (up to three times as many) until every fault kind
    // reached its minimum, so that a fast machine does not end the faults early.
    for i in 0..3 * mode.runs {
        if i >= mode.runs && met.load(Ordering::SeqCst) {
            break;
        }
        let project = PROJECTS[i % PROJECTS.len()];
        let run_id = call(&grpc, |ch| async move {
            let req = pb::TriggerRunRequest {
                project: project.into(),
                stage: "dev".into(),
                sequence: "dag".into(),
                request_id: format!("faults-{i}"),
                ..Default::default()
            };
            match RunServiceClient::new(ch).trigger(req).await {
                Ok(r) => Ok(r.into_inner().run_id),
                // A retry after the server committed the run but died before answering (or
                // after the call timed out): the request id made the run, whose id derives
                // from it (`Shared::start_input`). Were the derivation to change, the checker
                // would report the store's run as never triggered.
                Err(s) if s.code() == tonic::Code::AlreadyExists => {
                    Ok(uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, format!("{project}/faults-{i}").as_bytes())
                        .to_string())
                }
                Err(s) => Err(s),
            }
        })
        .await;
        run_ids.push(run_id);
        tokio::time::sleep(mode.trigger_every).await;
    }
    let triggered_in = started.elapsed();

    let store: Arc<dyn Store> =
        Arc::new(PostgresStore::connect_with_schema(&pg_url, schema).await.expect("open the test schema"));
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut open = run_ids.len();
    while Instant::now() < deadline {
        open = count_open(&*store, &run_ids).await;
        if open == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // The fault thread hands the cluster back so that the private services outlive the checks
    // (the checker reads the private PostgreSQL cluster).
    let (counts, faults_ms, cluster): (Counts, Vec<u64>, Cluster) = injector.join();
    let elapsed = started.elapsed();

    let def = Arc::new(capstan_engine::parse(DAG).expect("the DAG parses"));
    let actions = checker::read_ledgers(&ledgers);
    let report = checker::check(&store, &def, &run_ids, &worker_ids, &actions, &faults_ms, &counts.losses).await;
    println!(
        "fault suite ({}, {}): {} runs triggered in {triggered_in:.1?}, all checked after {elapsed:.1?}",
        mode.name,
        kind.label(),
        run_ids.len()
    );
    println!("faults: {counts}");
    println!(
        "store: {} events; run results {:?}; {} input-rejected; {} outcome-unknown; {} ledger lines; {} starts of claim-free offers not taken (late or second copies)",
        report.events,
        report.run_results,
        report.rejected_inputs,
        report.outcome_unknown,
        actions.len(),
        report.claim_free_untaken
    );
    // The workers answer every 25th result twice (a new CloudEvent each time): the tables above
    // show whether the engine recorded any second answer.
    let answered_twice: usize = (1..=WORKERS)
        .map(|i| std::fs::read_to_string(dir.path().join(format!("fw-{i}.log"))).unwrap_or_default())
        .map(|log| log.matches("answered twice").count())
        .sum();
    println!("workers answered twice {answered_twice} times; every second answer had to be refused");
    print!("{}", report.table());
    match report.reoffer_summary() {
        Some((p50, p99, max)) => println!(
            "a lost worker's attempt awarded again after {p50} ms at the median, {p99} ms at p99, {max} ms at most \
             ({} attempts; heartbeat timeout 1.5 s)",
            report.reoffer_ms.len()
        ),
        None => println!("no lost worker's attempt was awarded again after its heartbeat timeout"),
    }
    if open != 0 {
        describe_open(&*store, &cluster.pg, schema, &run_ids, dir.path()).await;
        eprintln!("violations:\n{}", report.problems.join("\n"));
    }
    if let Some(wanted) = kind.nats_storage() {
        // The stream the suite ran on (created again after the crash when in memory).
        let client = async_nats::connect(cluster.broker.url()).await.expect("connect to the private NATS");
        let mut stream = async_nats::jetstream::new(client).get_stream("CAPSTAN").await.expect("Capstan's stream");
        let storage = stream.info().await.expect("stream info").config.storage;
        assert_eq!(storage, wanted, "the suite ran on a stream of the wrong storage");
    }
    let keep = std::env::var("CAPSTAN_FAULTS_KEEP").is_ok_and(|v| v == "1");
    if !keep && (open != 0 || !report.problems.is_empty()) {
        eprintln!(
            "the private cluster is dropped at the end; CAPSTAN_FAULTS_KEEP=1 keeps it and {}",
            dir.path().display()
        );
    }
    if keep {
        // The processes end; the PostgreSQL cluster stays for inspection (drop it with
        // pg_dropcluster --stop).
        let Cluster { pg, .. } = cluster;
        std::mem::forget(pg);
        let kept = dir.keep();
        eprintln!("kept: {} and the PostgreSQL cluster on {pg_url}", kept.display());
    }
    assert_eq!(open, 0, "{open} runs never ended within the deadline");
    assert!(report.problems.is_empty(), "violations:\n{}", report.problems.join("\n"));
    counts.assert_minimums(&mode);
    assert!(answered_twice > 0, "no worker answered twice: the fault was never injected");
    counts.assert_server_survived_the_database();
    counts.assert_resources_bounded();
}

/// The fault thread; should the test fail before it is joined, dropping this stops the thread
/// and drops the cluster it owns, so that no server, worker, broker or PostgreSQL cluster
/// outlives the test.
struct Injector {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<(Counts, Vec<u64>, Cluster)>>,
}

impl Injector {
    fn join(&mut self) -> (Counts, Vec<u64>, Cluster) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().expect("joined once").join().expect("the fault thread panicked")
    }
}

impl Drop for Injector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Calls the current server, reconnecting and retrying while it is down or restarting.
async fn call<T, F, Fut>(grpc: &Arc<Mutex<String>>, f: F) -> T
where
    F: Fn(tonic::transport::Channel) -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let addr = grpc.lock().expect("grpc address").clone();
        let attempt = async {
            let channel = tonic::transport::Channel::from_shared(addr.clone())
                .map_err(|e| e.to_string())?
                .connect_timeout(Duration::from_secs(2))
                .timeout(Duration::from_secs(10))
                .connect()
                .await
                .map_err(|e| e.to_string())?;
            f(channel).await.map_err(|s| s.to_string())
        };
        match attempt.await {
            Ok(v) => return v,
            Err(e) => {
                assert!(Instant::now() < deadline, "the server at {addr} kept failing: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// What a run that never ended looked like: its index record, its history, the timers the store
/// holds for it, the timer checkpoints, and the log lines that name it. A run left open is a
/// liveness bug whose cause the store rarely keeps once the cluster is dropped.
async fn describe_open(store: &dyn Store, pg: &PrivatePostgres, schema: &str, run_ids: &[String], dir: &Path) {
    let mut logs: Vec<(String, String)> = Vec::new();
    for path in std::fs::read_dir(dir).into_iter().flatten().flatten().map(|e| e.path()) {
        if path.extension().is_some_and(|x| x == "log") {
            let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
            logs.push((name, std::fs::read_to_string(&path).unwrap_or_default()));
        }
    }
    logs.sort();
    let now_ms = schedule::now_ms();
    let mut shown = 0;
    for run_id in run_ids {
        let record = store.get_run(run_id).await;
        if matches!(&record, Ok(Some(r)) if r.is_over()) {
            continue;
        }
        shown += 1;
        if shown > 3 {
            eprintln!("(more runs left open)");
            break;
        }
        eprintln!("run {run_id} left open (now {now_ms} ms); index: {record:?}");
        let events: Vec<_> = match store.read_stream(run_id, 0).await {
            Ok(stored) => stored.iter().filter_map(|s| capstan::runtime::codec::decode_event(s).ok()).collect(),
            Err(e) => {
                eprintln!("  cannot read its events: {e}");
                Vec::new()
            }
        };
        eprint!("{}", capstan_engine::run::render_history(&events));
        let sql = format!("select key, fire_at_ms from {schema}.timers where run_id = '{run_id}' order by fire_at_ms");
        eprintln!("  timers (key|fire_at_ms):\n{}", pg.query(&sql));
        eprintln!("  checkpoints:\n{}", pg.query(&format!("select name, position from {schema}.timer_checkpoints")));
        for (name, log) in &logs {
            let lines: Vec<&str> = log.lines().filter(|l| l.contains(run_id.as_str())).collect();
            for l in &lines[lines.len().saturating_sub(20)..] {
                eprintln!("  {name}: {l}");
            }
        }
    }
}

async fn count_open(store: &dyn Store, run_ids: &[String]) -> usize {
    let mut open = 0;
    for id in run_ids {
        match store.get_run(id).await {
            Ok(Some(r)) if r.is_over() => {}
            _ => open += 1,
        }
    }
    open
}
