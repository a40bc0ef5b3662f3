//! Forgets processed-input ids once their retention has passed, so `processed_inputs` holds
//! one retention's worth of traffic instead of growing forever.
//!
//! The ids only exist to turn a broker's redelivery into a no-op, and a redelivery arrives within
//! the broker's redelivery window (minutes to hours). The default retention of seven days keeps
//! every id that can still come back. An input older than that is stale anyway: fencing tokens
//! and the run's state refuse it, and a trigger's run id derives from its request id.
//!
//! Rows go in batches of [`BATCH`], each its own short statement, so a large backlog (say the
//! first run after an upgrade, when every existing id has time 0) never holds a long lock.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use capstan_store::Store;
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, warn};

use super::Shared;

/// Ids deleted per statement.
const BATCH: usize = 10_000;
/// The first pruning runs this long after start (or after `every`, if sooner): soon enough to
/// catch up after a long stop, late enough not to compete with resuming runs.
const FIRST_AFTER: Duration = Duration::from_secs(30);

/// Every `every`, prunes the ids processed more than `retention` ago, until shutdown.
pub async fn run(shared: Arc<Shared>, retention: Duration, every: Duration, mut shutdown: watch::Receiver<bool>) {
    let retention_ms = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
    let every = every.max(Duration::from_millis(1));
    let mut tick = tokio::time::interval_at(Instant::now() + every.min(FIRST_AFTER), every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let before_ms = shared.clock.now_ms().saturating_sub(retention_ms);
        match prune(&*shared.store, before_ms, BATCH, &shared.metrics.inputs_pruned, &shutdown).await {
            Ok(pruned) => debug!(pruned, before_ms, "pruned processed inputs past the retention"),
            Err(e) => warn!(error = %e, "pruning processed inputs failed; retrying at the next tick"),
        }
    }
}

/// Deletes the ids processed before `before_ms`, `batch` at a time, until a call finds fewer than
/// a batch (or shutdown is signalled). Counts into `pruned` as it goes, so work done before a
/// failure is counted too.
async fn prune(
    store: &dyn Store,
    before_ms: i64,
    batch: usize,
    pruned: &AtomicU64,
    shutdown: &watch::Receiver<bool>,
) -> Result<u64, capstan_store::Error> {
    let mut total = 0;
    loop {
        let n = store.prune_processed_inputs(before_ms, batch).await?;
        pruned.fetch_add(n, Ordering::Relaxed);
        total += n;
        if n < batch as u64 || *shutdown.borrow() {
            return Ok(total);
        }
    }
}

#[cfg(test)]
mod tests {
    use capstan_brokers::Broker;
    use capstan_brokers::memory::MemoryBroker;
    use capstan_store::{Batch, MemoryStore};

    use super::*;
    use crate::runtime::{Clock, Runtime, RuntimeConfig};

    const NOW: i64 = 1_800_000_000_000;
    const HOUR: i64 = 3_600_000;

    /// A clock standing still at [`NOW`].
    struct Frozen;

    impl Clock for Frozen {
        fn now_ms(&self) -> i64 {
            NOW
        }
    }

    async fn processed(store: &dyn Store, ids: &[(&str, i64)]) {
        for (id, at) in ids {
            let batch = Batch { inputs: vec![(*id).to_owned()], inputs_at_ms: *at, ..Batch::default() };
            store.commit(batch).await.expect("commit");
        }
    }

    async fn seen(store: &dyn Store, ids: &[&str]) -> Vec<String> {
        let ids: Vec<String> = ids.iter().map(|id| (*id).to_owned()).collect();
        let mut seen = store.inputs_seen(&ids).await.expect("seen");
        seen.sort();
        seen
    }

    #[tokio::test]
    async fn a_backlog_goes_in_batches_until_fewer_than_a_batch_remain() {
        let store = MemoryStore::new();
        processed(&store, &[("a", 1), ("b", 2), ("c", 3), ("d", 4), ("e", 5), ("kept", 50)]).await;
        let counter = AtomicU64::new(0);
        let (_stop, shutdown) = watch::channel(false);
        assert_eq!(prune(&store, 10, 2, &counter, &shutdown).await.expect("prune"), 5);
        assert_eq!(counter.load(Ordering::Relaxed), 5);
        assert_eq!(seen(&store, &["a", "b", "c", "d", "e", "kept"]).await, ["kept"]);
    }

    #[tokio::test]
    async fn the_runtime_prunes_inputs_past_the_retention() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        processed(&*store, &[("old", NOW - 2 * HOUR), ("recent", NOW - HOUR / 60)]).await;
        let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::new());
        let config = RuntimeConfig {
            input_retention: Some(Duration::from_secs(3_600)),
            prune_every: Duration::from_millis(10),
            ..RuntimeConfig::default()
        };
        let rt = Runtime::start(config, store.clone(), broker, Arc::new(Frozen)).await.expect("starts");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while seen(&*store, &["old"]).await.len() == 1 {
            assert!(tokio::time::Instant::now() < deadline, "the old input was never pruned");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(seen(&*store, &["old", "recent"]).await, ["recent"], "inputs inside the retention stay");
        assert_eq!(rt.metrics().inputs_pruned.load(Ordering::Relaxed), 1);
        rt.shutdown().await;
    }

    #[tokio::test]
    async fn no_retention_keeps_every_input() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        processed(&*store, &[("old", 0)]).await;
        let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::new());
        let config =
            RuntimeConfig { input_retention: None, prune_every: Duration::from_millis(5), ..RuntimeConfig::default() };
        let rt = Runtime::start(config, store.clone(), broker, Arc::new(Frozen)).await.expect("starts");
        // Twenty pruning intervals: a pruner would have run by now.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(seen(&*store, &["old"]).await, ["old"]);
        assert_eq!(rt.metrics().inputs_pruned.load(Ordering::Relaxed), 0);
        rt.shutdown().await;
    }
}
