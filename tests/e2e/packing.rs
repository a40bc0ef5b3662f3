//! Over a broker that packs (NATS), the engine and the workers send in packs everything whose
//! readers may take it in bulk (inputs, awards, auction offers, run events), and queue offers
//! one by one: a queue's members share its offers by their free slots, and a pack would go to
//! one member whole. A refused round sends its derived messages (awards) again, and nothing
//! else.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use capstan::runtime::{Runtime, RuntimeConfig, SystemClock, TriggerRequest};
use capstan_brokers::memory::MemoryBroker;
use capstan_brokers::{Broker, Message, Subscription, SubscriptionMode};
use capstan_proto::topics;
use capstan_store::Store;
use capstan_store::memory::MemoryStore;
use capstan_workers::{EchoWorker, Worker, WorkerConfig};
use serde_json::json;

use crate::support::{spawn_worker, wait_run_over};

const MIXED: &str = r#"
apiVersion: capstan.dev/v1
kind: Shipyard
metadata: {name: packing}
spec:
  stages:
    - name: dev
      sequences:
        - name: delivery
          tasks:
            - {name: build, type: work, dispatch: queue}
            - {name: test, type: work, dispatch: auction}
            - {name: ship, type: work, dispatch: queue}
"#;

/// The in-memory broker, claiming to pack: it records the topic of every message and whether
/// it came through `publish_packed`; it refuses the first `refuse` packs that carry an award.
#[derive(Default)]
struct Recorder {
    inner: MemoryBroker,
    sent: Mutex<Vec<(String, bool)>>,
    refuse: AtomicUsize,
    /// Event ids of the messages that went through, with their topics.
    taken: Mutex<Vec<(String, String)>>,
    refused: Mutex<Vec<String>>,
}

impl Recorder {
    fn note(&self, messages: &[Message], packed: bool) {
        self.sent.lock().expect("lock").extend(messages.iter().map(|m| (m.topic.clone(), packed)));
    }

    fn take(&self, messages: &[Message]) {
        self.taken.lock().expect("lock").extend(messages.iter().map(|m| (m.topic.clone(), m.event.id.clone())));
    }
}

#[async_trait]
impl Broker for Recorder {
    async fn publish(&self, messages: Vec<Message>) -> capstan_brokers::Result<()> {
        self.note(&messages, false);
        self.take(&messages);
        self.inner.publish(messages).await
    }

    async fn subscribe(&self, topic: &str, mode: SubscriptionMode) -> capstan_brokers::Result<Box<dyn Subscription>> {
        self.inner.subscribe(topic, mode).await
    }

    fn packs(&self) -> bool {
        true
    }

    async fn publish_packed(&self, messages: &[Message]) -> capstan_brokers::Result<()> {
        self.note(messages, true);
        let award = messages.iter().find(|m| m.event.ty == capstan_proto::types::TASK_AWARDED);
        if let Some(award) = award
            && self.refuse.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
        {
            self.refused.lock().expect("lock").push(award.event.id.clone());
            return Err(capstan_brokers::Error::Unavailable("refused by the test".into()));
        }
        self.take(messages);
        self.inner.publish(messages.to_vec()).await
    }
}

/// Runs five of the mixed sequence over `recorder` with one worker, each to a pass.
async fn run_five(recorder: Arc<Recorder>) {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let broker: Arc<dyn Broker> = recorder;
    let rt = Runtime::start(RuntimeConfig::default(), store.clone(), broker.clone(), Arc::new(SystemClock))
        .await
        .expect("runtime starts");
    let _w = spawn_worker(Worker::new(WorkerConfig::new("w1", ["work"]), EchoWorker::new()), broker.clone());
    rt.apply_definition("p", MIXED).await.expect("definition");
    let mut runs = Vec::new();
    for _ in 0..5 {
        let request = TriggerRequest {
            project: "p".into(),
            stage: "dev".into(),
            sequence: "delivery".into(),
            data: json!({}),
            ..Default::default()
        };
        runs.push(rt.trigger(request).await.expect("trigger"));
    }
    for run in &runs {
        assert_eq!(wait_run_over(&*store, run, Duration::from_secs(30)).await.result.as_deref(), Some("pass"));
    }
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_offers_go_one_by_one_and_the_rest_in_packs() {
    let recorder = Arc::new(Recorder::default());
    run_five(recorder.clone()).await;
    let sent = recorder.sent.lock().expect("lock").clone();
    let queue = topics::queue("work");
    let queued: Vec<bool> = sent.iter().filter(|(t, _)| *t == queue).map(|(_, packed)| *packed).collect();
    assert!(queued.len() >= 10, "two queue offers per run: {queued:?}");
    assert!(queued.iter().all(|packed| !packed), "a queue offer went in a pack");
    for topic in [topics::ENGINE_INPUTS.to_string(), topics::tasks("work"), topics::worker("w1")] {
        let packed = sent.iter().filter(|(t, packed)| *t == topic && *packed).count();
        assert!(packed > 0, "nothing on {topic} went through publish_packed");
    }
}

/// A refused round: the awards in it are sent again until the broker takes them (the runs
/// finish), while its queue offers, sent once at best, are not sent twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_round_sends_its_awards_again_and_its_offers_once() {
    let recorder = Arc::new(Recorder { refuse: AtomicUsize::new(3), ..Default::default() });
    run_five(recorder.clone()).await;
    let refused = recorder.refused.lock().expect("lock").clone();
    assert_eq!(refused.len(), 3, "three packs with awards refused");
    let taken = recorder.taken.lock().expect("lock").clone();
    for id in &refused {
        assert!(taken.iter().any(|(_, t)| t == id), "award {id} was never sent again");
    }
    let queue = topics::queue("work");
    let mut offers: Vec<&String> = taken.iter().filter(|(t, _)| *t == queue).map(|(_, id)| id).collect();
    let all = offers.len();
    offers.sort();
    offers.dedup();
    assert_eq!(offers.len(), all, "a queue offer was sent twice");
}
