//! Flow control of queue offers: a worker takes only as many as it has free slots, holds one
//! that finds them all taken until a slot frees, and hands it back when that takes too long.

use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::*;

fn claim_free(run: &str, task_type: &str, token: u64) -> TaskOffer {
    TaskOffer { token: Some(token), ..offer(run, task_type, DispatchMode::Queue) }
}

/// One slot, and offers handed back only after `retry` (long, so that a bounce shows).
fn one_slot(id: &str, types: &[&str], retry: Duration) -> WorkerConfig {
    let mut config = WorkerConfig::new(id, types.iter().copied()).slots(1);
    config.queue_retry_delay = retry;
    config
}

/// The next `finished` the engine hears, skipping `started` reports.
pub(super) async fn next_finished(engine: &mut Engine) -> Finished {
    loop {
        let event = engine.expect_any().await;
        if event.ty == types::TASK_FINISHED {
            return event.payload().expect("finished");
        }
        assert_eq!(event.ty, types::TASK_STARTED, "unexpected input {:?}", event.data);
    }
}

/// Reports the run it starts, then finishes once it gets a permit.
pub(super) struct Latch {
    pub events: mpsc::UnboundedSender<String>,
    pub release: Arc<Semaphore>,
}

#[async_trait]
impl Handler for Latch {
    async fn handle(&self, task: TaskContext) -> Outcome {
        let _ = self.events.send(task.run_id().to_string());
        let permit = self.release.acquire().await.expect("semaphore open");
        permit.forget();
        Outcome::pass(json!({}))
    }
}

#[tokio::test(start_paused = true)]
async fn a_full_worker_leaves_queue_offers_to_a_member_with_room() {
    let broker = MemoryBroker::new();
    let mut engine = Engine::new(&broker).await;
    let (tx, mut seen) = mpsc::unbounded_channel();
    let retry = Duration::from_secs(30);
    let w1 = start(&broker, Worker::new(one_slot("w1", &["test"], retry), Blocker { events: tx })).await;
    engine.offer(&claim_free("run-1", "test", 1)).await;
    assert_eq!(seen.recv().await, Some("started"));
    let second = claim_free("run-2", "test", 2);
    engine.offer(&second).await;
    tokio::time::sleep(Duration::from_secs(1)).await; // time for w1 to take it, if it would
    let joined = Instant::now();
    let w2 = start(&broker, Worker::new(one_slot("w2", &["test"], retry), EchoWorker::new())).await;
    let finished = next_finished(&mut engine).await;
    assert_eq!((finished.worker_id.as_str(), &finished.attempt), ("w2", &second.attempt));
    // Bounced by w1, it would have come to w2 only after w1's retry delay.
    assert!(joined.elapsed() < retry / 10, "the free member got it after {:?}", joined.elapsed());
    w1.stop().await;
    w2.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_offer_past_the_slots_waits_in_the_worker_until_a_slot_frees() {
    let broker = MemoryBroker::new();
    let mut engine = Engine::new(&broker).await;
    let (tx, mut seen) = mpsc::unbounded_channel();
    let release = Arc::new(Semaphore::new(0));
    let retry = Duration::from_secs(30);
    let handler = Latch { events: tx, release: Arc::clone(&release) };
    // Two queues, one slot: each queue has the credit of the free slot, so both offers come.
    let w = start(&broker, Worker::new(one_slot("w1", &["a", "b"], retry), handler)).await;
    engine.offer(&claim_free("run-a", "a", 1)).await;
    engine.offer(&claim_free("run-b", "b", 2)).await;
    let first = seen.recv().await.expect("one starts");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(seen.try_recv().is_err(), "two attempts ran on one slot");
    let freed = Instant::now();
    release.add_permits(1);
    let second = seen.recv().await.expect("the held offer starts");
    assert_ne!(first, second);
    assert!(freed.elapsed() < retry / 10, "the held offer started {:?} after the slot freed", freed.elapsed());
    release.add_permits(1);
    for _ in 0..2 {
        assert_eq!(next_finished(&mut engine).await.worker_id, "w1");
    }
    w.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_offer_held_too_long_goes_back_for_another_member() {
    let broker = MemoryBroker::new();
    let mut engine = Engine::new(&broker).await;
    let (tx, mut seen) = mpsc::unbounded_channel();
    let retry = Duration::from_secs(2);
    let w1 = start(&broker, Worker::new(one_slot("w1", &["a", "b"], retry), Blocker { events: tx })).await;
    let (a, b) = (claim_free("run-a", "a", 1), claim_free("run-b", "b", 2));
    engine.offer(&a).await;
    engine.offer(&b).await;
    assert_eq!(seen.recv().await, Some("started"));
    tokio::time::sleep(retry * 2).await; // the held one went back, and w1 (full) left it there
    assert!(seen.try_recv().is_err(), "w1 started the held offer on a taken slot");
    let w2 = start(&broker, Worker::new(one_slot("w2", &["a", "b"], retry), EchoWorker::new())).await;
    let finished = next_finished(&mut engine).await;
    assert_eq!(finished.worker_id, "w2");
    assert!([&a.attempt, &b.attempt].contains(&&finished.attempt));
    w1.stop().await;
    w2.stop().await;
}
