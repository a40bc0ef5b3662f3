//! The input retention end to end: a worker's messages are recorded as processed with the time
//! of their commit, kept while the retention lasts and pruned by the runtime once it has passed.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capstan::runtime::{Clock, Runtime, RuntimeConfig, SystemClock, TriggerRequest};
use capstan_brokers::Broker;
use capstan_brokers::memory::MemoryBroker;
use capstan_proto::TaskResult;
use capstan_store::Store;
use capstan_store::memory::MemoryStore;

use crate::support::{Behaviour, Script, WorkerLog, scripted_worker, wait_run_over};

const ONE_TASK: &str = r#"
apiVersion: capstan.dev/v1
kind: Shipyard
metadata: {name: retention}
spec:
  stages:
    - name: dev
      sequences:
        - name: run
          tasks:
            - name: work
              type: work
"#;

/// The system clock plus an offset the test moves forward.
#[derive(Default)]
struct Shifted {
    offset_ms: AtomicI64,
}

impl Clock for Shifted {
    fn now_ms(&self) -> i64 {
        SystemClock.now_ms() + self.offset_ms.load(Ordering::SeqCst)
    }
}

#[tokio::test]
async fn worker_inputs_are_kept_for_the_retention_then_pruned() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::new());
    let clock = Arc::new(Shifted::default());
    let config = RuntimeConfig {
        input_retention: Some(Duration::from_secs(3_600)),
        prune_every: Duration::from_millis(20),
        ..RuntimeConfig::default()
    };
    let rt = Runtime::start(config, store.clone(), broker.clone(), clock.clone()).await.expect("runtime starts");
    let script: Script = Arc::new(|_, _| Behaviour::Complete {
        after: Duration::from_millis(10),
        result: TaskResult::Pass,
        error: None,
    });
    let log = Arc::new(Mutex::new(WorkerLog::default()));
    let workers = scripted_worker(broker, "w1", BTreeMap::new(), &["work"], script, log).await;
    rt.apply_definition("p", ONE_TASK).await.expect("definition applies");
    let trigger =
        TriggerRequest { project: "p".into(), stage: "dev".into(), sequence: "run".into(), ..Default::default() };
    let run_id = rt.trigger(trigger).await.expect("trigger");
    wait_run_over(&*store, &run_id, Duration::from_secs(20)).await;

    // Five pruning intervals with the worker's `started` and `finished` recorded: they are
    // inside the retention, so none may go.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(rt.metrics().inputs_pruned.load(Ordering::Relaxed), 0, "pruned inside the retention");

    clock.offset_ms.store(2 * 3_600_000, Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while rt.metrics().inputs_pruned.load(Ordering::Relaxed) < 2 {
        assert!(tokio::time::Instant::now() < deadline, "the worker's inputs were not pruned");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    rt.shutdown().await;
    for w in workers {
        w.abort();
    }
    assert_eq!(store.prune_processed_inputs(i64::MAX, 1_000).await.expect("prune"), 0, "the runtime pruned them all");
}
