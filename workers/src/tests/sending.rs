//! Bids and claims on their way to a broker that confirms slowly or not at all: the worker's
//! loop goes on meanwhile, and a refused send frees its slot.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use capstan_brokers::{Broker, MemoryBroker, Message, Subscription, SubscriptionMode};
use capstan_proto::{Claim, DispatchMode, ext, topics, types};

use super::{Engine, offer, start_over};
use crate::{EchoWorker, Worker, WorkerConfig};

/// The in-memory broker, except that bids and claims wait at a gate before they are published,
/// and the first `fail` of them are refused, as a broker that confirms slowly or not at all.
#[derive(Clone)]
struct SlowClaims {
    inner: MemoryBroker,
    gate: Arc<tokio::sync::Semaphore>,
    arrived: Arc<std::sync::atomic::AtomicUsize>,
    fail: Arc<std::sync::atomic::AtomicUsize>,
}

impl SlowClaims {
    fn new(inner: &MemoryBroker, open: bool, fail: usize) -> Self {
        let permits = if open { tokio::sync::Semaphore::MAX_PERMITS } else { 0 };
        SlowClaims {
            inner: inner.clone(),
            gate: Arc::new(tokio::sync::Semaphore::new(permits)),
            arrived: Arc::default(),
            fail: Arc::new(std::sync::atomic::AtomicUsize::new(fail)),
        }
    }

    fn arrived(&self) -> usize {
        self.arrived.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[async_trait]
impl Broker for SlowClaims {
    async fn publish(&self, messages: Vec<Message>) -> capstan_brokers::Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        if messages.iter().any(|m| [types::TASK_CLAIM, types::TASK_BID].contains(&m.event.ty.as_str())) {
            self.arrived.fetch_add(1, SeqCst);
            self.gate.acquire().await.expect("gate never closes").forget();
            if self.fail.fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1)).is_ok() {
                return Err(capstan_brokers::Error::Unavailable("refused by the test".into()));
            }
        }
        self.inner.publish(messages).await
    }

    async fn subscribe(&self, topic: &str, mode: SubscriptionMode) -> capstan_brokers::Result<Box<dyn Subscription>> {
        self.inner.subscribe(topic, mode).await
    }
}

#[tokio::test(start_paused = true)]
async fn claims_and_bids_do_not_hold_the_loop_while_the_broker_confirms_them() {
    let broker = MemoryBroker::new();
    let mut engine = Engine::new(&broker).await;
    let slow = SlowClaims::new(&broker, false, 0);
    let worker = Worker::new(WorkerConfig::new("w1", ["deployment"]).slots(3), EchoWorker::new());
    let w = start_over(&broker, Arc::new(slow.clone()), worker).await;
    let first = offer("run-20", "deployment", DispatchMode::Queue);
    let second = offer("run-21", "deployment", DispatchMode::Queue);
    let third = offer("run-22", "deployment", DispatchMode::Auction);
    for o in [&first, &second, &third] {
        engine.offer(o).await;
    }
    // All three wait at the broker at once: the loop went on to the next offer each time.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while slow.arrived() < 3 {
        assert!(tokio::time::Instant::now() < deadline, "only {} sends reached the broker", slow.arrived());
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let queue = topics::queue("deployment");
    assert_eq!(broker.backlog(&queue, "capstan-workers-deployment"), Some(2), "unsettled until confirmed");
    // An award on the inbox is handled while the sends still wait.
    engine.award(&first, "w1", 4).await;
    slow.gate.add_permits(3);
    let mut inputs = Vec::new();
    for _ in 0..5 {
        let event = engine.expect_any().await;
        inputs.push((event.ty.clone(), event.ext(ext::RUN).unwrap_or_default().to_string()));
    }
    inputs.sort();
    let expected = [
        (types::TASK_BID, "run-22"),
        (types::TASK_CLAIM, "run-20"),
        (types::TASK_CLAIM, "run-21"),
        (types::TASK_FINISHED, "run-20"),
        (types::TASK_STARTED, "run-20"),
    ];
    assert_eq!(inputs, expected.map(|(t, r)| (t.to_string(), r.to_string())));
    let settled = tokio::time::Instant::now() + Duration::from_secs(5);
    while broker.backlog(&queue, "capstan-workers-deployment") != Some(0) {
        assert!(tokio::time::Instant::now() < settled, "the confirmed claims' offers were never acked");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    w.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_claim_the_broker_refuses_frees_its_slot_and_the_offer_comes_again() {
    let broker = MemoryBroker::new();
    let mut engine = Engine::new(&broker).await;
    let slow = SlowClaims::new(&broker, true, 1);
    let worker = Worker::new(WorkerConfig::new("w1", ["deployment"]), EchoWorker::new());
    let w = start_over(&broker, Arc::new(slow.clone()), worker).await;
    let o = offer("run-23", "deployment", DispatchMode::Queue);
    engine.offer(&o).await;
    // Refused once, nacked, delivered again after the retry delay and claimed by the same worker,
    // whose only slot must be free again for that.
    let claim: Claim = engine.expect(types::TASK_CLAIM).await.payload().expect("claim");
    assert_eq!(claim.attempt, o.attempt);
    assert_eq!(slow.arrived(), 2, "the refused claim, then the one sent on redelivery");
    w.stop().await;
}

/// The in-memory broker, as a broker that packs: it records each call (how many messages,
/// packed or alone), and the first call waits at a gate.
#[derive(Clone)]
struct Packing {
    inner: MemoryBroker,
    gate: Arc<tokio::sync::Semaphore>,
    calls: Arc<std::sync::Mutex<Vec<(&'static str, usize)>>>,
}

impl Packing {
    async fn record(&self, how: &'static str, messages: Vec<Message>) -> capstan_brokers::Result<()> {
        let first = {
            let mut calls = self.calls.lock().unwrap();
            calls.push((how, messages.len()));
            calls.len() == 1
        };
        if first {
            self.gate.acquire().await.expect("gate never closes").forget();
        }
        self.inner.publish(messages).await
    }

    fn calls(&self) -> Vec<(&'static str, usize)> {
        self.calls.lock().unwrap().clone()
    }
}

#[async_trait]
impl Broker for Packing {
    async fn publish(&self, messages: Vec<Message>) -> capstan_brokers::Result<()> {
        self.record("alone", messages).await
    }

    async fn subscribe(&self, topic: &str, mode: SubscriptionMode) -> capstan_brokers::Result<Box<dyn Subscription>> {
        self.inner.subscribe(topic, mode).await
    }

    fn packs(&self) -> bool {
        true
    }

    async fn publish_packed(&self, messages: &[Message]) -> capstan_brokers::Result<()> {
        self.record("packed", messages.to_vec()).await
    }
}

#[tokio::test(start_paused = true)]
async fn over_a_broker_that_packs_the_bids_sent_while_one_is_on_its_way_go_in_one_pack() {
    let broker = MemoryBroker::new();
    let mut engine = Engine::new(&broker).await;
    let packing =
        Packing { inner: broker.clone(), gate: Arc::new(tokio::sync::Semaphore::new(0)), calls: Arc::default() };
    let worker = Worker::new(WorkerConfig::new("w1", ["deployment"]).slots(4), EchoWorker::new());
    let w = start_over(&broker, Arc::new(packing.clone()), worker).await;
    let offers: Vec<_> = (0..4).map(|i| offer(&format!("run-3{i}"), "deployment", DispatchMode::Auction)).collect();
    // The first bid waits at the broker; the three behind it gather meanwhile.
    engine.offer(&offers[0]).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    for o in &offers[1..] {
        engine.offer(o).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(packing.calls(), [("packed", 1)]);
    packing.gate.add_permits(1);
    let mut runs = Vec::new();
    for _ in 0..4 {
        let bid = engine.expect(types::TASK_BID).await;
        runs.push(bid.ext(ext::RUN).unwrap_or_default().to_string());
    }
    runs.sort();
    assert_eq!(runs, ["run-30", "run-31", "run-32", "run-33"]);
    assert_eq!(packing.calls(), [("packed", 1), ("packed", 3)], "the bids behind the first one went as one pack");
    w.stop().await;
}
