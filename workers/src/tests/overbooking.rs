//! Auction bids beyond the slots: most bids lose, so a bid does not take a slot; an award that
//! finds every slot running waits in the worker for one, and a cancellation drops it.

use std::time::Duration;

use capstan_proto::{Bid, DispatchMode, Progress, types};
use tokio::sync::mpsc;

use super::{Blocker, Engine, QUIET, offer, start};
use crate::{Worker, WorkerConfig};

#[tokio::test(start_paused = true)]
async fn bids_go_past_the_slots_and_an_award_waits_for_a_free_one() {
    let broker = capstan_brokers::MemoryBroker::new();
    let mut engine = Engine::new(&broker).await;
    let (tx, mut seen) = mpsc::unbounded_channel();
    let config = WorkerConfig::new("w1", ["test"]).bids_per_slot(3);
    let w = start(&broker, Worker::new(config, Blocker { events: tx })).await;
    let offers: Vec<_> = (0..4).map(|i| offer(&format!("run-{i}"), "test", DispatchMode::Auction)).collect();
    // One slot, three bids per slot: three bids are open at once; the fourth offer is kept for
    // `queue_retry_delay` (1 s), and the slot frees only after that, so it gets no bid.
    for o in &offers {
        engine.offer(o).await;
    }
    for o in &offers[..3] {
        let bid: Bid = engine.expect(types::TASK_BID).await.payload().expect("bid");
        assert_eq!(bid.attempt, o.attempt);
    }
    engine.expect_quiet(Duration::from_secs(1)).await;

    // The first award runs; the second and third wait, since the only slot is running.
    engine.award(&offers[0], "w1", 1).await;
    let started: Progress = engine.expect(types::TASK_STARTED).await.payload().expect("started");
    assert_eq!(started.attempt, offers[0].attempt);
    assert_eq!(seen.recv().await, Some("started"));
    engine.award(&offers[1], "w1", 2).await;
    engine.award(&offers[2], "w1", 3).await;
    engine.expect_quiet(QUIET).await;

    // A cancelled waiting award is dropped; the slot the first attempt frees goes to the second.
    engine.cancel(&offers[2], "w1").await;
    engine.cancel(&offers[0], "w1").await;
    assert_eq!(seen.recv().await, Some("cancelled"));
    let started: Progress = engine.expect(types::TASK_STARTED).await.payload().expect("started");
    assert_eq!((started.attempt.clone(), started.token), (offers[1].attempt.clone(), 2));
    assert_eq!(seen.recv().await, Some("started"));
    engine.cancel(&offers[1], "w1").await;
    assert_eq!(seen.recv().await, Some("cancelled"));
    engine.expect_quiet(QUIET).await; // the third never starts
    assert!(seen.try_recv().is_err(), "a dropped award ran");
    w.stop().await;
}
