//! Claim-free queue offers: the receiver runs the attempt at once under the offer's token, and
//! the offer stays unsettled until the attempt has reported.

use super::*;

fn claim_free(run: &str, token: u64) -> TaskOffer {
    TaskOffer { token: Some(token), ..offer(run, "test", DispatchMode::Queue) }
}

fn echo_for(id: &str, task_type: &str) -> Worker {
    Worker::new(WorkerConfig::new(id, [task_type]), EchoWorker::new())
}

fn queue_backlog(broker: &MemoryBroker) -> Option<usize> {
    broker.backlog(&topics::queue("test"), "capstan-workers-test")
}

#[tokio::test(start_paused = true)]
async fn a_claim_free_offer_runs_at_once_under_its_token_and_is_settled_by_its_report() {
    let broker = MemoryBroker::new();
    let mut engine = Engine::new(&broker).await;
    let config = WorkerConfig::new("w1", ["test"]).started_after(Duration::from_millis(50));
    let w = start(&broker, Worker::new(config, EchoWorker::new())).await;
    let o = claim_free("run-1", 7);
    engine.offer(&o).await;
    // No claim and no award: a quick handler reports only `finished`, under the offer's token.
    let finished: Finished = engine.expect(types::TASK_FINISHED).await.payload().expect("finished");
    assert_eq!((finished.worker_id.as_str(), finished.token, &finished.attempt), ("w1", 7, &o.attempt));
    engine.expect_quiet(Duration::from_secs(2)).await;
    assert_eq!(queue_backlog(&broker), Some(0), "the report settled the offer");
    // The same offer once more (a re-offer, or a redelivery): this worker ran it already.
    engine.offer(&o).await;
    engine.expect_quiet(Duration::from_secs(2)).await;
    assert_eq!(queue_backlog(&broker), Some(0));
    w.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_claim_free_offer_is_held_until_started_and_handed_back_if_its_worker_stops_first() {
    let broker = MemoryBroker::new();
    let mut engine = Engine::new(&broker).await;
    let (tx, mut seen) = mpsc::unbounded_channel();
    let config = WorkerConfig::new("w1", ["test"]).started_after(Duration::from_secs(60));
    let w = start(&broker, Worker::new(config, Blocker { events: tx.clone() })).await;
    let o = claim_free("run-2", 7);
    engine.offer(&o).await;
    assert_eq!(seen.recv().await, Some("started"), "the handler runs without an award");
    assert_eq!(queue_backlog(&broker), Some(1), "unreported, the offer is still the worker's lease");
    // It stops before it reported: the offer goes back, and another member runs it.
    w.stop().await;
    assert_eq!(seen.recv().await, Some("cancelled"));
    let w2 = start(&broker, echo_for("w2", "test")).await;
    let started: Progress = engine.expect(types::TASK_STARTED).await.payload().expect("started");
    assert_eq!((started.worker_id.as_str(), started.token), ("w2", 7));
    engine.expect(types::TASK_FINISHED).await;
    w2.stop().await;

    // `started_after` is capped by the award timeout: a long attempt reports, and its offer
    // is settled, well within a broker's redelivery wait.
    let config = WorkerConfig::new("w3", ["test"]).started_after(Duration::from_secs(60));
    let w3 = start(&broker, Worker::new(config, Blocker { events: tx })).await;
    let o = claim_free("run-3", 8);
    engine.offer(&o).await;
    assert_eq!(seen.recv().await, Some("started"));
    let before = tokio::time::Instant::now();
    let started: Progress = engine.expect(types::TASK_STARTED).await.payload().expect("started");
    assert_eq!((started.worker_id.as_str(), started.token), ("w3", 8));
    assert!(before.elapsed() <= WorkerConfig::new("x", ["test"]).award_timeout, "{:?}", before.elapsed());
    assert_eq!(queue_backlog(&broker), Some(0), "the report settled the offer");
    w3.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_worker_without_the_labels_hands_a_claim_free_offer_on() {
    let broker = MemoryBroker::new();
    let mut engine = Engine::new(&broker).await;
    let w = start(&broker, echo_for("w-us", "test")).await;
    let mut o = claim_free("run-4", 9);
    o.requires.insert("zone".into(), "eu".into());
    engine.offer(&o).await;
    engine.expect_quiet(Duration::from_secs(3)).await;
    let eu = Worker::new(WorkerConfig::new("w-eu", ["test"]).label("zone", "eu"), EchoWorker::new());
    let w2 = start(&broker, eu).await;
    let started: Progress = engine.expect(types::TASK_STARTED).await.payload().expect("started");
    assert_eq!((started.worker_id.as_str(), started.token), ("w-eu", 9));
    engine.expect(types::TASK_FINISHED).await;
    w.stop().await;
    w2.stop().await;
}

/// The in-memory broker, except that it refuses the first `refuse` results.
struct RefusesResults {
    inner: MemoryBroker,
    refuse: std::sync::atomic::AtomicUsize,
}

#[async_trait]
impl Broker for RefusesResults {
    async fn publish(&self, messages: Vec<Message>) -> capstan_brokers::Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        let result = messages.iter().any(|m| m.event.ty == types::TASK_FINISHED);
        if result && self.refuse.fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1)).is_ok() {
            return Err(capstan_brokers::Error::Unavailable("refused by the test".into()));
        }
        self.inner.publish(messages).await
    }

    async fn subscribe(&self, topic: &str, mode: SubscriptionMode) -> capstan_brokers::Result<Box<dyn Subscription>> {
        self.inner.subscribe(topic, mode).await
    }
}

#[tokio::test(start_paused = true)]
async fn a_claim_free_attempt_whose_result_cannot_be_sent_hands_its_offer_back_to_be_run_again() {
    // Redelivery after an unsettled delivery's deadline would come too late for this test:
    // only a handed-back offer comes again in time.
    let config = capstan_brokers::MemoryConfig { ack_deadline: Duration::from_secs(3600), ..Default::default() };
    let broker = MemoryBroker::with_config(config);
    let mut engine = Engine::new(&broker).await;
    let refusing = RefusesResults { inner: broker.clone(), refuse: 5.into() };
    let config = WorkerConfig::new("w1", ["test"]).started_after(Duration::from_secs(5));
    let w = start_over(&broker, Arc::new(refusing), Worker::new(config, EchoWorker::new())).await;
    engine.offer(&claim_free("run-5", 11)).await;
    // Five refused tries of `finished`, then the offer goes back, comes to the same (only)
    // member, and is run again: this time its result gets through.
    let finished: Finished = engine.expect(types::TASK_FINISHED).await.payload().expect("finished");
    assert_eq!((finished.worker_id.as_str(), finished.token), ("w1", 11));
    assert_eq!(queue_backlog(&broker), Some(0));
    w.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_claim_free_offer_past_its_start_deadline_is_dropped_not_run() {
    let broker = MemoryBroker::new();
    let mut engine = Engine::new(&broker).await;
    let w = start(&broker, echo_for("w1", "test")).await;
    let now_ms =
        || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as u64;
    let stale = TaskOffer { start_by_ms: Some(now_ms() - 1_000), ..claim_free("run-6", 12) };
    engine.offer(&stale).await;
    engine.expect_quiet(Duration::from_secs(2)).await;
    assert_eq!(queue_backlog(&broker), Some(0), "settled, not left to come again");
    // One still in time runs.
    let fresh = TaskOffer { start_by_ms: Some(now_ms() + 60_000), ..claim_free("run-7", 13) };
    engine.offer(&fresh).await;
    let started: Progress = engine.expect(types::TASK_STARTED).await.payload().expect("started");
    assert_eq!(started.token, 13);
    engine.expect(types::TASK_FINISHED).await;
    w.stop().await;
}
