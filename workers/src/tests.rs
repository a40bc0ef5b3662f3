//! The worker SDK against the in-memory broker and a tiny fake engine that offers tasks, awards
//! the first bid or claim, and reads what the worker reports.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use capstan_brokers::{Broker, MemoryBroker, Message, Subscription, SubscriptionMode};
use capstan_proto::{
    AttemptRef, Award, Bid, Claim, CloudEvent, DispatchMode, Finished, Progress, Rejection, TaskCancel, TaskOffer,
    TaskResult, ext, topics, types,
};
use serde::Serialize;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::{EchoConfig, EchoWorker, Error, Handler, Outcome, TaskContext, Worker, WorkerConfig};

const PATIENCE: Duration = Duration::from_secs(60);
const QUIET: Duration = Duration::from_secs(30);

/// The engine's side of the protocol, reduced to what the tests need.
struct Engine {
    broker: MemoryBroker,
    inputs: Box<dyn Subscription>,
}

impl Engine {
    async fn new(broker: &MemoryBroker) -> Engine {
        let mode = SubscriptionMode::Competing { group: "engine".into() };
        let inputs = broker.subscribe(topics::ENGINE_INPUTS, mode).await.expect("subscribe inputs");
        Engine { broker: broker.clone(), inputs }
    }

    async fn send(&self, topic: String, ty: &str, run: &str, data: &impl Serialize) {
        let event = CloudEvent::new(uuid::Uuid::new_v4().to_string(), "capstan/engine", ty)
            .with_data(serde_json::to_value(data).expect("encode"));
        let message = Message { topic, key: run.into(), event };
        self.broker.publish(vec![message]).await.expect("publish");
    }

    async fn offer(&self, offer: &TaskOffer) {
        let topic = match offer.dispatch {
            DispatchMode::Queue => topics::queue(&offer.task_type),
            _ => topics::tasks(&offer.task_type),
        };
        self.send(topic, types::TASK_OFFERED, &offer.attempt.run_id, offer).await;
    }

    async fn award(&self, offer: &TaskOffer, worker: &str, token: u64) {
        let award = Award {
            attempt: offer.attempt.clone(),
            worker_id: worker.into(),
            token,
            task_type: offer.task_type.clone(),
            input: offer.input.clone(),
            heartbeat_ms: offer.heartbeat_ms,
            start_to_close_ms: offer.start_to_close_ms,
        };
        self.send(topics::worker(worker), types::TASK_AWARDED, &offer.attempt.run_id, &award).await;
    }

    async fn reject(&self, offer: &TaskOffer, worker: &str) {
        let r = Rejection { attempt: offer.attempt.clone(), worker_id: worker.into(), reason: "lost".into() };
        self.send(topics::worker(worker), types::TASK_REJECTED, &offer.attempt.run_id, &r).await;
    }

    async fn cancel(&self, offer: &TaskOffer, worker: &str) {
        let c = TaskCancel {
            attempt: offer.attempt.clone(),
            worker_id: Some(worker.into()),
            reason: "run cancelled".into(),
        };
        self.send(topics::worker(worker), types::TASK_CANCELLED, &offer.attempt.run_id, &c).await;
    }

    /// The next input from a worker, of the expected type.
    async fn expect(&mut self, ty: &str) -> CloudEvent {
        let d = tokio::time::timeout(PATIENCE, self.inputs.next())
            .await
            .unwrap_or_else(|_| panic!("no {ty} within {PATIENCE:?}"))
            .expect("inputs subscription");
        d.ack().await.expect("ack");
        assert_eq!(d.message.event.ty, ty, "unexpected input {:?}", d.message.event.data);
        assert_eq!(d.message.key, d.message.event.ext(ext::RUN).unwrap_or_default(), "keyed by run id");
        d.message.event.clone()
    }

    /// The next input from a worker, of any type.
    async fn expect_any(&mut self) -> CloudEvent {
        let d = tokio::time::timeout(PATIENCE, self.inputs.next())
            .await
            .unwrap_or_else(|_| panic!("no input within {PATIENCE:?}"))
            .expect("inputs subscription");
        d.ack().await.expect("ack");
        d.message.event.clone()
    }

    async fn expect_quiet(&mut self, quiet: Duration) {
        if let Ok(d) = tokio::time::timeout(quiet, self.inputs.next()).await {
            panic!("unexpected input: {:?}", d.map(|d| d.message.event.clone()));
        }
    }
}

fn offer(run: &str, task_type: &str, dispatch: DispatchMode) -> TaskOffer {
    TaskOffer {
        attempt: AttemptRef { project: "shop".into(), run_id: run.into(), task: "deploy".into(), attempt: 1 },
        context_id: "ctx".into(),
        stage: "production".into(),
        sequence: "delivery".into(),
        service: Some("cart".into()),
        task_type: task_type.into(),
        dispatch,
        input: json!({"properties": {"strategy": "blue-green"}}),
        requires: BTreeMap::new(),
        bid_deadline_ms: None,
        heartbeat_ms: None,
        start_to_close_ms: None,
        token: None,
        start_by_ms: None,
    }
}

struct Running {
    stop: oneshot::Sender<()>,
    task: JoinHandle<crate::Result<()>>,
}

/// Starts a worker and waits until all its subscriptions exist.
async fn start(broker: &MemoryBroker, worker: Worker) -> Running {
    start_over(broker, Arc::new(broker.clone()), worker).await
}

/// Starts a worker over `wrapped` (a wrapper of `broker`) and waits until all its
/// subscriptions exist.
async fn start_over(broker: &MemoryBroker, wrapped: Arc<dyn Broker>, worker: Worker) -> Running {
    let config = worker.config().clone();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(worker.run(wrapped, async move {
        let _ = stopped.await;
    }));
    while broker.members(&topics::worker(&config.id), &config.id) == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Running { stop, task }
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.expect("worker task").expect("worker ended cleanly");
    }
}

fn echo(id: &str) -> Worker {
    Worker::new(WorkerConfig::new(id, ["deployment"]), EchoWorker::new())
}

#[tokio::test(start_paused = true)]
async fn only_workers_whose_labels_match_bid() {
    let broker = MemoryBroker::new();
    let mut engine = Engine::new(&broker).await;
    let certified = WorkerConfig::new("w-cert", ["deployment"]).label("certified", "production");
    let a = start(&broker, Worker::new(certified, EchoWorker::new())).await;
    let b = start(&broker, echo("w-plain")).await;
    let mut o = offer("run-1", "deployment", DispatchMode::Auction);
    o.requires.insert("certified".into(), "production".into());
    engine.offer(&o).await;
    let bid: Bid = engine.expect(types::TASK_BID).await.payload().expect("bid");
    assert_eq!(bid.worker.id, "w-cert");
    assert_eq!((bid.free_slots, bid.cost), (1, 0.0));
    assert_eq!(bid.worker.labels.get("certified").map(String::as_str), Some("production"));
    engine.expect_quiet(QUIET).await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_award_runs_with_its_token_heartbeats_and_finishes() {
    let broker = MemoryBroker::new();
    let mut engine = Engine::new(&broker).await;
    let handler = EchoWorker::with_config(EchoConfig { delay: Duration::from_secs(1), ..EchoConfig::default() });
    let w = start(&broker, Worker::new(WorkerConfig::new("w1", ["deployment"]), handler)).await;
    let mut o = offer("run-2", "deployment", DispatchMode::Auction);
    o.heartbeat_ms = Some(900);
    engine.offer(&o).await;
    let bid_event = engine.expect(types::TASK_BID).await;
    assert_eq!(bid_event.ext(ext::TOKEN), None, "a bid has no token yet");
    engine.award(&o, "w1", 42).await;

    let mut events = vec![bid_event, engine.expect(types::TASK_STARTED).await];
    let started: Progress = events[1].payload().expect("progress");
    assert_eq!((started.token, started.worker_id.as_str()), (42, "w1"));
    let mut heartbeats = 0;
    let finished = loop {
        let ev = tokio::time::timeout(PATIENCE, engine.inputs.next()).await.expect("input").expect("sub");
        ev.ack().await.expect("ack");
        let ev = ev.message.event.clone();
        events.push(ev.clone());
        match ev.ty.as_str() {
            types::TASK_HEARTBEAT => {
                heartbeats += 1;
                assert_eq!(ev.payload::<Progress>().expect("progress").token, 42);
            }
            types::TASK_FINISHED => break ev.payload::<Finished>().expect("finished"),
            other => panic!("unexpected {other}"),
        }
    };
    // 1 s of work with a heartbeat every 300 ms.
    assert_eq!(heartbeats, 3);
    assert_eq!((finished.token, finished.result), (42, TaskResult::Pass));
    assert_eq!(finished.output, json!({"echo": true, "worker": "w1", "attempt": 1}));
    let mut ids = HashSet::new();
    for ev in &events {
        assert!(ids.insert(ev.id.clone()), "event ids are unique");
        assert_eq!(ev.source, "capstan/worker/w1");
        assert_eq!(ev.ext(ext::PROJECT), Some("shop"));
        assert_eq!(ev.ext(ext::RUN), Some("run-2"));
        assert_eq!(ev.ext(ext::TASK), Some("deploy"));
        assert_eq!(ev.ext(ext::ATTEMPT), Some("1"));
        assert_eq!(ev.ext(ext::WORKER), Some("w1"));
        if ev.ty != types::TASK_BID {
            assert_eq!(ev.ext(ext::TOKEN), Some("42"), "{} carries the token", ev.ty);
        }
    }
    w.stop().await;
}

/// Awards `o` to `worker` and returns the engine's inputs up to `finished`, each with the time
/// it arrived after the award.
async fn award_and_collect(engine: &mut Engine, o: &TaskOffer, worker: &str, token: u64) -> Vec<(String, Duration)> {
    engine.award(o, worker, token).await;
    let awarded = tokio::time::Instant::now();
    let mut seen = Vec::new();
    loop {
        let d = tokio::time::timeout(PATIENCE, engine.inputs.next()).await.expect("an input").expect("inputs");
        d.ack().await.expect("ack");
        let ty = d.message.event.ty.clone();
        seen.push((ty.clone(), awarded.elapsed()));
        if ty == types::TASK_FINISHED {
            return seen;
        }
    }
}

/// With `started_after`, an attempt that ends sooner reports only `finished`; a longer one
/// reports `started` once it has run that long, or when its first heartbeat is due if that
/// comes first. The control, the default, reports `started` before the handler runs.
#[tokio::test(start_paused = true)]
async fn started_is_reported_only_for_attempts_that_outlast_started_after() {
    let broker = MemoryBroker::new();
    let mut engine = Engine::new(&broker).await;
    let ms = Duration::from_millis;
    let slow = || EchoWorker::with_config(EchoConfig { delay: Duration::from_secs(1), ..EchoConfig::default() });
    let types_of = |seen: &[(String, Duration)]| seen.iter().map(|(t, _)| t.clone()).collect::<Vec<_>>();

    // A quick handler: only `finished`.
    let config = WorkerConfig::new("w-quick", ["deployment"]).started_after(ms(50));
    let w = start(&broker, Worker::new(config, EchoWorker::new())).await;
    let o = offer("run-quick", "deployment", DispatchMode::Auction);
    engine.offer(&o).await;
    engine.expect(types::TASK_BID).await;
    let seen = award_and_collect(&mut engine, &o, "w-quick", 1).await;
    assert_eq!(types_of(&seen), [types::TASK_FINISHED]);
    w.stop().await;

    // A handler of 1 s: `started` after 200 ms, `finished` after 1 s.
    let config = WorkerConfig::new("w-slow", ["deployment"]).started_after(ms(200));
    let w = start(&broker, Worker::new(config, slow())).await;
    let o = offer("run-slow", "deployment", DispatchMode::Auction);
    engine.offer(&o).await;
    engine.expect(types::TASK_BID).await;
    let seen = award_and_collect(&mut engine, &o, "w-slow", 2).await;
    assert_eq!(types_of(&seen), [types::TASK_STARTED, types::TASK_FINISHED]);
    assert!(seen[0].1 >= ms(200) && seen[0].1 < ms(300), "started after {:?}", seen[0].1);
    assert!(seen[1].1 >= ms(1_000), "finished after {:?}", seen[1].1);
    w.stop().await;

    // A heartbeat timeout of 300 ms (a heartbeat every 100 ms): `started` comes first, at 100 ms.
    let config = WorkerConfig::new("w-beat", ["deployment"]).started_after(Duration::from_secs(10));
    let w = start(&broker, Worker::new(config, slow())).await;
    let mut o = offer("run-beat", "deployment", DispatchMode::Auction);
    o.heartbeat_ms = Some(300);
    engine.offer(&o).await;
    engine.expect(types::TASK_BID).await;
    let seen = award_and_collect(&mut engine, &o, "w-beat", 3).await;
    assert_eq!(seen[0].0, types::TASK_STARTED, "{seen:?}");
    assert!(seen[0].1 >= ms(100) && seen[0].1 < ms(200), "started after {:?}", seen[0].1);
    assert!(seen[1..seen.len() - 1].iter().all(|(t, _)| t == types::TASK_HEARTBEAT), "{seen:?}");
    w.stop().await;

    // The default reports `started` at once, even for a quick handler.
    let w = start(&broker, echo("w-default")).await;
    let o = offer("run-default", "deployment", DispatchMode::Auction);
    engine.offer(&o).await;
    engine.expect(types::TASK_BID).await;
    let seen = award_and_collect(&mut engine, &o, "w-default", 4).await;
    assert_eq!(types_of(&seen), [types::TASK_STARTED, types::TASK_FINISHED]);
    assert_eq!(seen[0].1, Duration::ZERO);
    w.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_award_published_again_after_its_attempt_finished_is_not_run_again() {
    let broker = MemoryBroker::new();
    let mut engine = Engine::new(&broker).await;
    let w = start(&broker, echo("w1")).await;
    let o = offer("run-3", "deployment", DispatchMode::Auction);
    engine.offer(&o).await;
    engine.expect(types::TASK_BID).await;
    engine.award(&o, "w1", 7).await;
    engine.expect(types::TASK_STARTED).await;
    engine.expect(types::TASK_FINISHED).await;
    // The engine's outbox publishes the same award again after a crash: nothing happens.
    engine.award(&o, "w1", 7).await;
    engine.expect_quiet(Duration::from_secs(2)).await;
    w.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_message_with_a_bad_payload_is_dead_lettered_and_blocks_nothing() {
    let broker = MemoryBroker::new();
    let mut engine = Engine::new(&broker).await;
    let w = start(&broker, echo("w1")).await;
    let o = offer("run-ok", "deployment", DispatchMode::Auction);
    engine.offer(&o).await;
    engine.expect(types::TASK_BID).await;
    engine.send(topics::worker("w1"), types::TASK_AWARDED, "run-bad", &json!("not an award")).await;
    // An event of no concern is ignored, not dead-lettered.
    engine.send(topics::worker("w1"), "dev.capstan.task.nonsense.v1", "run-bad", &json!({})).await;
    // The inbox is handled in order: once the good award runs, the two before it were handled.
    engine.award(&o, "w1", 1).await;
    engine.expect(types::TASK_STARTED).await;
    engine.expect(types::TASK_FINISHED).await;

    let dead = broker.dead_letters();
    let kept: Vec<(&str, &str)> =
        dead.iter().map(|d| (d.message.topic.as_str(), d.message.event.ty.as_str())).collect();
    assert_eq!(kept, [(topics::worker("w1").as_str(), types::TASK_AWARDED)], "only the bad award is dead-lettered");
    assert!(dead[0].reason.contains("payload"), "the reason says what is wrong: {}", dead[0].reason);
    assert_eq!(broker.backlog(&topics::worker("w1"), "w1"), Some(0), "and it is settled");
    w.stop().await;
}

/// Real time: the journal's writer is a thread, which paused time would not wait for.
#[tokio::test]
async fn with_a_journal_a_restarted_worker_does_not_run_a_republished_award() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = dir.path().join("w1.journal");
    let broker = MemoryBroker::new();
    let mut engine = Engine::new(&broker).await;
    let journaled = || Worker::new(WorkerConfig::new("w1", ["deployment"]).journal(&journal), EchoWorker::new());
    let w = start(&broker, journaled()).await;
    let o = offer("run-9", "deployment", DispatchMode::Auction);
    engine.offer(&o).await;
    engine.expect(types::TASK_BID).await;
    engine.award(&o, "w1", 7).await;
    engine.expect(types::TASK_STARTED).await;
    engine.expect(types::TASK_FINISHED).await;
    w.stop().await;

    // The same id, restarted: the copy of the award the outbox publishes after a crash is ignored.
    let w = start(&broker, journaled()).await;
    engine.award(&o, "w1", 7).await;
    engine.expect_quiet(Duration::from_millis(500)).await;
    // A new attempt token is still run.
    engine.award(&o, "w1", 8).await;
    let started: Progress = engine.expect(types::TASK_STARTED).await.payload().expect("progress");
    assert_eq!(started.token, 8);
    engine.expect(types::TASK_FINISHED).await;
    w.stop().await;

    // The control: without the journal, the restarted worker runs the copy again.
    let w = start(&broker, echo("w1")).await;
    engine.award(&o, "w1", 7).await;
    let started: Progress = engine.expect(types::TASK_STARTED).await.payload().expect("progress");
    assert_eq!(started.token, 7);
    engine.expect(types::TASK_FINISHED).await;
    w.stop().await;
}

/// Reports when it starts and when it sees the cancellation; otherwise works forever.
struct Blocker {
    events: mpsc::UnboundedSender<&'static str>,
}

#[async_trait]
impl Handler for Blocker {
    async fn handle(&self, task: TaskContext) -> Outcome {
        let _ = self.events.send("started");
        task.cancelled().await;
        let _ = self.events.send("cancelled");
        Outcome::error("cancelled", "stopped")
    }
}

#[tokio::test(start_paused = true)]
async fn cancellation_stops_the_handler_and_frees_the_slot() {
    let broker = MemoryBroker::new();
    let mut engine = Engine::new(&broker).await;
    let (tx, mut seen) = mpsc::unbounded_channel();
    let w = start(&broker, Worker::new(WorkerConfig::new("w1", ["test"]), Blocker { events: tx })).await;
    let o = offer("run-3", "test", DispatchMode::Auction);
    engine.offer(&o).await;
    engine.expect(types::TASK_BID).await;
    engine.award(&o, "w1", 7).await;
    engine.expect(types::TASK_STARTED).await;
    assert_eq!(seen.recv().await, Some("started"));

    // Busy: the single slot is taken, so no bid for another offer.
    let other = offer("run-4", "test", DispatchMode::Auction);
    engine.offer(&other).await;
    engine.expect_quiet(QUIET).await;

    engine.cancel(&o, "w1").await;
    assert_eq!(seen.recv().await, Some("cancelled"));
    engine.expect_quiet(QUIET).await; // no finished for a cancelled attempt
    engine.offer(&offer("run-5", "test", DispatchMode::Auction)).await;
    let bid: Bid = engine.expect(types::TASK_BID).await.payload().expect("bid");
    assert_eq!(bid.attempt.run_id, "run-5", "the slot is free again");
    w.stop().await;
}

#[tokio::test(start_paused = true)]
async fn queue_offers_are_claimed_and_run() {
    let broker = MemoryBroker::new();
    let mut engine = Engine::new(&broker).await;
    let w = start(&broker, echo("w1")).await;
    let o = offer("run-6", "deployment", DispatchMode::Queue);
    engine.offer(&o).await;
    let claim: Claim = engine.expect(types::TASK_CLAIM).await.payload().expect("claim");
    assert_eq!((claim.worker.id.as_str(), &claim.attempt), ("w1", &o.attempt));
    engine.award(&o, "w1", 9).await;
    engine.expect(types::TASK_STARTED).await;
    let finished: Finished = engine.expect(types::TASK_FINISHED).await.payload().expect("finished");
    assert_eq!((finished.token, finished.result), (9, TaskResult::Pass));
    assert_eq!(broker.backlog(&topics::queue("deployment"), "capstan-workers-deployment"), Some(0));
    w.stop().await;
}

#[tokio::test(start_paused = true)]
async fn fanout_offers_are_claimed() {
    let broker = MemoryBroker::new();
    let mut engine = Engine::new(&broker).await;
    let a = start(&broker, echo("w1")).await;
    let b = start(&broker, echo("w2")).await;
    engine.offer(&offer("run-7", "deployment", DispatchMode::Fanout)).await;
    let mut claimants = HashSet::new();
    for _ in 0..2 {
        let claim: Claim = engine.expect(types::TASK_CLAIM).await.payload().expect("claim");
        claimants.insert(claim.worker.id);
    }
    assert_eq!(claimants, HashSet::from(["w1".to_string(), "w2".to_string()]));
    a.stop().await;
    b.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_rejection_or_no_award_releases_the_reserved_slot() {
    let broker = MemoryBroker::new();
    let mut engine = Engine::new(&broker).await;
    let config = WorkerConfig::new("w1", ["deployment"]).bids_per_slot(1);
    let w = start(&broker, Worker::new(config, EchoWorker::new())).await;
    let first = offer("run-8", "deployment", DispatchMode::Auction);
    engine.offer(&first).await;
    engine.expect(types::TASK_BID).await;
    engine.offer(&offer("run-9", "deployment", DispatchMode::Auction)).await;
    engine.expect_quiet(Duration::from_secs(1)).await; // the only bid is open
    engine.reject(&first, "w1").await;
    let second = offer("run-10", "deployment", DispatchMode::Auction);
    engine.offer(&second).await;
    engine.expect(types::TASK_BID).await;
    // No award for the second bid: the reservation lapses after the award timeout.
    let before = tokio::time::Instant::now();
    engine.offer(&offer("run-11", "deployment", DispatchMode::Auction)).await;
    engine.expect_quiet(Duration::from_secs(5)).await;
    let mut later = offer("run-12", "deployment", DispatchMode::Auction);
    later.bid_deadline_ms = Some(0); // already closed: only the grace is waited for
    tokio::time::sleep_until(before + Duration::from_secs(11)).await;
    engine.offer(&later).await;
    engine.expect(types::TASK_BID).await;
    w.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_custom_bid_function_decides_and_a_panic_is_reported() {
    struct Panics;
    #[async_trait]
    impl Handler for Panics {
        async fn handle(&self, _task: TaskContext) -> Outcome {
            panic!("handler bug")
        }
    }
    let broker = MemoryBroker::new();
    let mut engine = Engine::new(&broker).await;
    let worker = Worker::new(WorkerConfig::new("w1", ["deployment"]).slots(4), Panics).bid_with(|offer, free| {
        (offer.stage != "production").then_some(crate::BidTerms { cost: 10.0 / f64::from(free), estimated_ms: 500 })
    });
    let w = start(&broker, worker).await;
    engine.offer(&offer("run-13", "deployment", DispatchMode::Auction)).await;
    engine.expect_quiet(QUIET).await;
    let mut staging = offer("run-14", "deployment", DispatchMode::Auction);
    staging.stage = "staging".into();
    engine.offer(&staging).await;
    let bid: Bid = engine.expect(types::TASK_BID).await.payload().expect("bid");
    assert_eq!((bid.cost, bid.estimated_ms, bid.free_slots), (2.5, 500, 4));
    engine.award(&staging, "w1", 3).await;
    engine.expect(types::TASK_STARTED).await;
    let finished: Finished = engine.expect(types::TASK_FINISHED).await.payload().expect("finished");
    assert_eq!(finished.result, TaskResult::Fail);
    assert_eq!(finished.error.map(|e| e.kind), Some("panic".to_string()));
    w.stop().await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_cancels_running_attempts_and_broker_close_ends_the_worker() {
    let broker = MemoryBroker::new();
    let mut engine = Engine::new(&broker).await;
    let (tx, mut seen) = mpsc::unbounded_channel();
    let w = start(&broker, Worker::new(WorkerConfig::new("w1", ["test"]), Blocker { events: tx })).await;
    let o = offer("run-15", "test", DispatchMode::Auction);
    engine.offer(&o).await;
    engine.expect(types::TASK_BID).await;
    engine.award(&o, "w1", 1).await;
    assert_eq!(seen.recv().await, Some("started"));
    w.stop().await;
    assert_eq!(seen.recv().await, Some("cancelled"));

    let w = start(&broker, echo("w2")).await;
    broker.close();
    let ended = w.task.await.expect("worker task");
    assert!(matches!(ended, Err(Error::Broker(capstan_brokers::Error::Closed))), "{ended:?}");
}

#[tokio::test]
async fn a_bad_configuration_lists_every_problem() {
    let config = WorkerConfig { max_concurrency: 0, ..WorkerConfig::new("", Vec::<String>::new()) };
    let err = echo("x").config().clone();
    assert!(err.validate().is_ok());
    let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::new());
    let Err(Error::Config(problems)) = Worker::new(config, EchoWorker::new()).run(broker, async {}).await else {
        panic!("expected a configuration error");
    };
    assert_eq!(problems.len(), 3, "{problems:?}");
}

mod claim_free;
mod deferred;
mod flow;
mod overbooking;
mod sending;
