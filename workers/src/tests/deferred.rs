//! Auction offers that come while the worker cannot bid are kept, and bid on as soon as a slot
//! frees (for `queue_retry_delay` at most).

use tokio::sync::Semaphore;

use super::flow::Latch;
use super::*;

/// One slot, one open bid, auction offers kept for `keep`.
fn one_bid(keep: Duration) -> WorkerConfig {
    let mut config = WorkerConfig::new("w1", ["test"]).slots(1).bids_per_slot(1);
    config.queue_retry_delay = keep;
    config
}

/// Starts a worker with one running attempt (of run `busy`) that finishes once released.
async fn busy_worker(
    broker: &MemoryBroker,
    engine: &mut Engine,
    keep: Duration,
) -> (Running, Arc<Semaphore>, mpsc::UnboundedReceiver<String>) {
    let (tx, mut seen) = mpsc::unbounded_channel();
    let release = Arc::new(Semaphore::new(0));
    let handler = Latch { events: tx, release: Arc::clone(&release) };
    let w = start(broker, Worker::new(one_bid(keep), handler)).await;
    let busy = offer("busy", "test", DispatchMode::Auction);
    engine.offer(&busy).await;
    let bid: Bid = engine.expect(types::TASK_BID).await.payload().expect("bid");
    assert_eq!(bid.attempt, busy.attempt);
    engine.award(&busy, "w1", 1).await;
    engine.expect(types::TASK_STARTED).await;
    assert_eq!(seen.recv().await.as_deref(), Some("busy"));
    (w, release, seen)
}

/// The types of the next `n` inputs, with the run each concerns, sorted.
async fn next_inputs(engine: &mut Engine, n: usize) -> Vec<(String, String)> {
    let mut got = Vec::new();
    for _ in 0..n {
        let event = engine.expect_any().await;
        got.push((event.ty.clone(), event.ext(ext::RUN).unwrap_or_default().to_string()));
    }
    got.sort();
    got
}

#[tokio::test(start_paused = true)]
async fn an_auction_offer_at_a_full_worker_gets_its_bid_when_a_slot_frees() {
    let broker = MemoryBroker::new();
    let mut engine = Engine::new(&broker).await;
    let (w, release, _seen) = busy_worker(&broker, &mut engine, Duration::from_secs(5)).await;
    let waiting = offer("waiting", "test", DispatchMode::Auction);
    engine.offer(&waiting).await;
    engine.expect_quiet(Duration::from_secs(1)).await; // no slot: no bid yet
    engine.offer(&waiting).await; // the engine's re-offer replaces the kept one
    engine.expect_quiet(Duration::from_secs(1)).await;
    release.add_permits(1);
    let got = next_inputs(&mut engine, 2).await;
    let expected = [(types::TASK_BID, "waiting"), (types::TASK_FINISHED, "busy")].map(|(t, r)| (t.into(), r.into()));
    assert_eq!(got, expected);
    engine.expect_quiet(QUIET).await; // one bid, not one per offer
    w.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_auction_offer_kept_past_the_hold_gets_no_bid() {
    let broker = MemoryBroker::new();
    let mut engine = Engine::new(&broker).await;
    let keep = Duration::from_secs(2);
    let (w, release, _seen) = busy_worker(&broker, &mut engine, keep).await;
    engine.offer(&offer("stale", "test", DispatchMode::Auction)).await;
    engine.expect_quiet(keep + Duration::from_secs(1)).await;
    release.add_permits(1);
    let finished: Finished = engine.expect(types::TASK_FINISHED).await.payload().expect("finished");
    assert_eq!(finished.attempt.run_id, "busy");
    engine.expect_quiet(QUIET).await; // the engine offers it again if it is still on offer
    w.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_full_worker_keeps_more_offers_than_it_may_bid_on_and_bids_oldest_first() {
    let broker = MemoryBroker::new();
    let mut engine = Engine::new(&broker).await;
    let (w, release, mut seen) = busy_worker(&broker, &mut engine, Duration::from_secs(5)).await;
    // One slot and one bid: the worker may bid on one offer at a time, and keeps all three.
    let kept: Vec<_> = (0..3).map(|i| offer(&format!("kept-{i}"), "test", DispatchMode::Auction)).collect();
    for o in &kept {
        engine.offer(o).await;
    }
    engine.expect_quiet(Duration::from_secs(1)).await;
    let mut previous = "busy".to_string();
    for (token, o) in (2..).zip(&kept) {
        release.add_permits(1);
        let got = next_inputs(&mut engine, 2).await;
        let run = &o.attempt.run_id;
        assert_eq!(got, [(types::TASK_BID.into(), run.clone()), (types::TASK_FINISHED.into(), previous)]);
        engine.award(o, "w1", token).await;
        engine.expect(types::TASK_STARTED).await;
        assert_eq!(seen.recv().await.as_ref(), Some(run));
        previous = run.clone();
    }
    release.add_permits(1);
    engine.expect(types::TASK_FINISHED).await;
    w.stop().await;
}
