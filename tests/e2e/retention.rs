//! The input retention end to end: recorded input ids are kept while the retention lasts and
//! pruned by the runtime once it has passed; a worker's messages that come again are recognised
//! by their run's state and record no id.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use capstan::runtime::{Clock, Runtime, RuntimeConfig, SystemClock, TriggerRequest};
use capstan_brokers::memory::MemoryBroker;
use capstan_brokers::{Broker, Message, SubscriptionMode};
use capstan_proto::{
    AttemptRef, Award, Claim, CloudEvent, Finished, Progress, TaskResult, WorkerInfo, ext, topics, types,
};
use capstan_store::memory::MemoryStore;
use capstan_store::{Batch, Store};
use serde_json::{Value, json};

use crate::support::wait_run_over;

/// One task that workers claim (queue dispatch).
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
            - {name: work, type: work, dispatch: queue}
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

/// Recorded input ids are kept while the retention lasts and pruned by the runtime once it has
/// passed. No input the runtime applies records one today (every worker message is recognised
/// by its run's state, see the test below), so the ids are committed to the store directly.
#[tokio::test]
async fn recorded_inputs_are_kept_for_the_retention_then_pruned() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::new());
    let clock = Arc::new(Shifted::default());
    let config = RuntimeConfig {
        input_retention: Some(Duration::from_secs(3_600)),
        prune_every: Duration::from_millis(20),
        ..RuntimeConfig::default()
    };
    let rt = Runtime::start(config, store.clone(), broker.clone(), clock.clone()).await.expect("runtime starts");
    let ids = ["input-1", "input-2"].map(String::from);
    let batch = Batch { inputs: ids.to_vec(), inputs_at_ms: clock.now_ms(), ..Batch::default() };
    store.commit(batch).await.expect("ids recorded");

    // Five pruning intervals inside the retention: nothing may go.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(rt.metrics().inputs_pruned.load(Ordering::Relaxed), 0, "pruned inside the retention");
    assert_eq!(store.inputs_seen(&ids).await.expect("seen"), ids);

    clock.offset_ms.store(2 * 3_600_000, Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while rt.metrics().inputs_pruned.load(Ordering::Relaxed) < 2 {
        assert!(tokio::time::Instant::now() < deadline, "the recorded inputs were not pruned");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    rt.shutdown().await;
    assert!(store.inputs_seen(&ids).await.expect("seen").is_empty(), "the runtime pruned them all");
}

/// A worker's message to the engine about `attempt`, with the protocol's extensions, under the
/// CloudEvent id `id`.
fn report(id: &str, ty: &str, attempt: &AttemptRef, token: Option<u64>, data: Value) -> Message {
    let mut event = CloudEvent::new(id, "test-worker", ty)
        .with_data(data)
        .with_ext(ext::PROJECT, &attempt.project)
        .with_ext(ext::RUN, &attempt.run_id)
        .with_ext(ext::TASK, &attempt.task)
        .with_ext(ext::ATTEMPT, attempt.attempt)
        .with_ext(ext::WORKER, "w1");
    if let Some(token) = token {
        event = event.with_ext(ext::TOKEN, token);
    }
    Message { topic: topics::ENGINE_INPUTS.into(), key: attempt.run_id.clone(), event }
}

/// A worker's claim, `started` and `finished` are recognised by their run when they come again
/// (the broker redelivers one, or the worker sends it again under a new id), so the runtime
/// records no id for them: each is applied once, and the worker hears no rejection, which would
/// cancel its work.
#[tokio::test]
async fn worker_messages_that_come_again_are_recognised_without_rows() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::new());
    let rt = Runtime::start(RuntimeConfig::default(), store.clone(), broker.clone(), Arc::new(SystemClock))
        .await
        .expect("runtime starts");
    rt.apply_definition("p", ONE_TASK).await.expect("definition applies");
    let mut inbox = broker
        .subscribe(&topics::worker("w1"), SubscriptionMode::Competing { group: "w1".into() })
        .await
        .expect("inbox");
    let trigger =
        TriggerRequest { project: "p".into(), stage: "dev".into(), sequence: "run".into(), ..Default::default() };
    let run_id = rt.trigger(trigger).await.expect("trigger");
    let attempt = AttemptRef { project: "p".into(), run_id: run_id.clone(), task: "work".into(), attempt: 1 };

    let worker = WorkerInfo { id: "w1".into(), labels: BTreeMap::new() };
    let claim = json!(Claim { attempt: attempt.clone(), worker });
    let claims =
        ["claim-1", "claim-1", "claim-2"].map(|id| report(id, types::TASK_CLAIM, &attempt, None, claim.clone()));
    broker.publish(claims.to_vec()).await.expect("claims");
    let award = tokio::time::timeout(Duration::from_secs(10), inbox.next()).await.expect("an award").expect("inbox");
    assert_eq!(
        award.message.event.ty,
        types::TASK_AWARDED,
        "the worker's first message: {:?}",
        award.message.event.data
    );
    let token = award.message.event.payload::<Award>().expect("award").token;
    award.ack().await.expect("ack");

    let progress = json!(Progress { attempt: attempt.clone(), worker_id: "w1".into(), token });
    let started = ["started-1", "started-1", "started-2"]
        .map(|id| report(id, types::TASK_STARTED, &attempt, Some(token), progress.clone()));
    broker.publish(started.to_vec()).await.expect("started");
    let done = Finished {
        attempt: attempt.clone(),
        worker_id: "w1".into(),
        token,
        result: TaskResult::Pass,
        output: Value::Null,
        error: None,
    };
    let finished = ["finished-1", "finished-1", "finished-2"]
        .map(|id| report(id, types::TASK_FINISHED, &attempt, Some(token), json!(done)));
    broker.publish(finished.to_vec()).await.expect("finished");
    wait_run_over(&*store, &run_id, Duration::from_secs(10)).await;
    // A copy still on its way when the run ended would show below, as a rejection to the worker
    // within the quiet window.

    let kinds: Vec<String> = store.read_stream(&run_id, 1).await.expect("stream").into_iter().map(|e| e.kind).collect();
    let count = |kind: &str| kinds.iter().filter(|k| *k == kind).count();
    let counts = (count("task-awarded"), count("task-started"), count("task-ended"), count("input-rejected"));
    assert_eq!(counts, (1, 1, 1, 0), "{kinds:?}");
    let ids = ["claim-1", "claim-2", "started-1", "started-2", "finished-1", "finished-2"].map(String::from);
    assert!(store.inputs_seen(&ids).await.expect("seen").is_empty(), "no row for a worker's message");
    // Nothing else reached the worker: no rejection of the claims or reports that came again.
    let more = tokio::time::timeout(Duration::from_millis(300), inbox.next()).await;
    assert!(more.is_err(), "the worker heard more: {:?}", more.map(|d| d.map(|d| d.message.event.ty.clone())));
    rt.shutdown().await;
}
