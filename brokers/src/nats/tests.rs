//! The conformance suite and NATS-specific behaviour against the NATS server on 127.0.0.1:4222
//! (started by `deploy/local/services.sh nats`): structured input, dead letters, and a
//! subscription surviving a server restart.
//!
//! The restart test takes an exclusive file lock and every other test here a shared one, so
//! that no test sees the shared server vanish mid-case, whether tests run as threads
//! (`cargo test`) or as processes (`cargo nextest`).

use std::collections::BTreeSet;
use std::fs::File;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use serde_json::json;
use tokio::time::{Instant, timeout};

use super::{DEAD_REASON_HEADER, NatsBroker, NatsConfig, NatsStorage, check_name, check_topic, durable_name};
use crate::Error;
use crate::testing::{Options, expect_quiet, message, recv, unique_topic, worker_and_watcher};
use crate::{Broker, Credit, Message, Result, Subscription, SubscriptionMode};

const URL: &str = "nats://127.0.0.1:4222";
const PATIENCE: Duration = Duration::from_secs(60);

fn config() -> NatsConfig {
    NatsConfig {
        stream: "CAPSTAN_TEST".into(),
        subject_prefix: "capstantest".into(),
        ack_wait: Duration::from_secs(10),
        // Leftovers of test runs expire by themselves.
        max_age: Duration::from_secs(3600),
        ..NatsConfig::default()
    }
}

/// Serializes the restart test against every other test of the shared server.
fn server_lock(exclusive: bool) -> File {
    let path = std::env::temp_dir().join("capstan-nats-server.lock");
    let file = File::create(&path).unwrap_or_else(|e| panic!("lock file {path:?}: {e}"));
    let locked = if exclusive { file.lock() } else { file.lock_shared() };
    locked.unwrap_or_else(|e| panic!("lock {path:?}: {e}"));
    file
}

async fn connect() -> NatsBroker {
    match NatsBroker::connect(URL, config()).await {
        Ok(b) => b,
        Err(e) => panic!("NATS with JetStream is needed at {URL} ({e}); start it with deploy/local/services.sh nats"),
    }
}

/// A broker holding the shared server lock for as long as the test uses it.
struct Locked {
    broker: NatsBroker,
    _lock: File,
}

#[async_trait]
impl Broker for Locked {
    async fn publish(&self, messages: Vec<Message>) -> Result<()> {
        self.broker.publish(messages).await
    }

    async fn subscribe(&self, topic: &str, mode: SubscriptionMode) -> Result<Box<dyn Subscription>> {
        self.broker.subscribe(topic, mode).await
    }

    async fn subscribe_with_credit(
        &self,
        topic: &str,
        mode: SubscriptionMode,
        credit: Credit,
    ) -> Result<Box<dyn Subscription>> {
        self.broker.subscribe_with_credit(topic, mode, credit).await
    }

    fn packs(&self) -> bool {
        self.broker.packs()
    }

    async fn publish_packed(&self, messages: &[Message]) -> Result<()> {
        self.broker.publish_packed(messages).await
    }
}

async fn locked() -> Locked {
    let lock = server_lock(false);
    Locked { broker: connect().await, _lock: lock }
}

fn options() -> Options {
    Options { max_payload: 1024 * 1024, patience: PATIENCE, quiet: Duration::from_millis(500) }
}

mod conformance {
    use super::*;

    crate::conformance_tests! {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        make = locked,
        options = options(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credit_bounds_deliveries() {
    crate::testing::credit_bounds_deliveries(&locked().await, &options()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_credit_leaves_messages_to_others() {
    crate::testing::no_credit_leaves_messages_to_others(&locked().await, &options()).await;
}

fn group(name: &str) -> SubscriptionMode {
    SubscriptionMode::Competing { group: name.into() }
}

#[tokio::test]
async fn reads_structured_events_and_dead_letters_garbage() -> anyhow::Result<()> {
    let b = locked().await;
    let topic = unique_topic("nats-modes");
    let mut s = b.subscribe(&topic, group("g")).await?;
    let subject = format!("capstantest.{topic}");
    let js = async_nats::jetstream::new(b.broker.client().clone());

    let mut garbage = async_nats::HeaderMap::new();
    garbage.insert("ce-id", "no-source-no-type");
    js.publish_with_headers(subject.clone(), garbage, "{}".into()).await?.await?;
    let structured = message(&topic, "", "structured-1", json!({"from": "python"}));
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("content-type", "application/cloudevents+json; charset=utf-8");
    js.publish_with_headers(subject.clone(), headers, structured.event.to_json().into()).await?.await?;

    let d = recv(&mut s, PATIENCE, "the structured event after the garbage").await;
    assert_eq!(d.message.event, structured.event);
    assert_eq!(d.message.topic, topic);
    d.ack().await?;
    expect_quiet(&mut s, Duration::from_millis(500), "garbage is not delivered").await;

    let kept = last_dead_letter(&b.broker, &topic).await?;
    let reason = kept.get(DEAD_REASON_HEADER).map(|v| v.as_str().to_string());
    assert!(reason.as_deref().is_some_and(|r| r.contains("missing")), "the dead letter says why: {reason:?}");
    Ok(())
}

/// The headers of the last dead letter of `topic`.
async fn last_dead_letter(b: &NatsBroker, topic: &str) -> anyhow::Result<async_nats::HeaderMap> {
    Ok(last_dead_message(b, topic).await?.headers)
}

/// The last dead letter of `topic`, as kept.
async fn last_dead_message(
    b: &NatsBroker,
    topic: &str,
) -> anyhow::Result<async_nats::jetstream::message::StreamMessage> {
    let js = async_nats::jetstream::new(b.client().clone());
    let dead = js.get_stream(b.dead_letter_stream()).await?;
    Ok(dead.get_last_raw_message_by_subject(&format!("capstantest-dead.{topic}")).await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_dead_letter_keeps_the_reason() {
    let b = locked().await;
    // A message published alone travels in structured mode, and is dead-lettered as delivered.
    let reason_of = async |topic: &str, id: &str| {
        let kept = last_dead_message(&b.broker, topic).await.ok()?;
        let header = |name: &str| kept.headers.get(name).map(|v| v.as_str().to_string());
        assert_eq!(header("content-type").as_deref(), Some(crate::binding::STRUCTURED_CONTENT_TYPE));
        let event = capstan_proto::CloudEvent::from_json(&kept.payload).ok()?;
        (event.id == id).then(|| header(DEAD_REASON_HEADER)).flatten()
    };
    crate::testing::dead_letter_keeps_the_reason(&b, &options(), reason_of).await;
}

#[tokio::test]
async fn unsettled_deliveries_of_a_dropped_subscription_go_to_the_next_member() -> anyhow::Result<()> {
    let b = locked().await;
    let topic = unique_topic("nats-drop-buffered");
    let mut first = b.subscribe(&topic, group("g")).await?;
    let sent: Vec<Message> = (0..10).map(|i| message(&topic, "k", &format!("b{i}"), json!(i))).collect();
    b.publish(sent).await?;
    // Hold one delivery while the rest sit in the subscription's buffer, then drop both.
    let held = recv(&mut first, PATIENCE, "first delivery").await;
    let mut second = b.subscribe(&topic, group("g")).await?;
    drop(first);
    let started = Instant::now();
    let mut ids = BTreeSet::new();
    while ids.len() < 10 {
        let d = recv(&mut second, PATIENCE, "redelivery to the second member").await;
        ids.insert(d.message.event.id.clone());
        d.ack().await?;
    }
    held.ack().await?;
    assert!(started.elapsed() < config().ack_wait, "handed back at once, not after ack_wait ({:?})", started.elapsed());
    Ok(())
}

/// `publish_packed` sends the messages of a topic as one NATS message; a part dead-lettered
/// goes to the dead letters alone, with its reason, and once the other parts are acked the pack
/// is settled (nothing is pending at the consumer, nothing comes again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packed_messages_travel_as_one_and_settle_together() -> anyhow::Result<()> {
    let b = locked().await;
    let topic = unique_topic("nats-pack");
    let subject = format!("capstantest.{topic}");
    let mut raw = b.broker.client().subscribe(subject.clone()).await?;
    let mut s = b.subscribe(&topic, group("g")).await?;
    let sent: Vec<Message> = (0..5).map(|i| message(&topic, &format!("run-{i}"), &format!("p{i}"), json!(i))).collect();
    b.broker.client().flush().await?;
    b.publish_packed(&sent).await?;

    let wire = timeout(PATIENCE, raw.next()).await?.expect("the raw subscription sees the pack");
    let ct = wire.headers.as_ref().and_then(|h| h.get("content-type")).map(|v| v.as_str().to_string());
    assert_eq!(ct.as_deref(), Some("application/cloudevents-batch+json"));
    assert!(timeout(Duration::from_millis(300), raw.next()).await.is_err(), "five messages, one NATS message");

    let mut held = Vec::new();
    for expected in &sent {
        let d = recv(&mut s, PATIENCE, "a part of the pack").await;
        assert_eq!(*d.message, *expected);
        held.push(d);
    }
    let reason = "conformance: part 2 is unusable";
    held[2].dead_letter(reason).await?;
    for (i, d) in held.iter().enumerate() {
        if i != 2 {
            d.ack().await?;
        }
    }
    let kept = last_dead_letter(&b.broker, &topic).await?;
    assert_eq!(kept.get("ce-id").map(|v| v.as_str()), Some("p2"), "the dead letter is the part alone");
    assert_eq!(kept.get(DEAD_REASON_HEADER).map(|v| v.as_str()), Some(reason));

    let js = async_nats::jetstream::new(b.broker.client().clone());
    let mut consumer: async_nats::jetstream::consumer::PullConsumer =
        js.get_consumer_from_stream(durable_name("g", &topic), config().stream).await?;
    let deadline = Instant::now() + PATIENCE;
    while consumer.info().await?.num_ack_pending > 0 {
        assert!(Instant::now() < deadline, "the pack was never acked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    expect_quiet(&mut s, Duration::from_millis(500), "a settled pack").await;
    Ok(())
}

/// Starts nats-server again when dropped, so that a failing test leaves the server up.
struct Restarter;

impl Restarter {
    fn stop(&self) {
        // Only the shared server on 4222: other tests (the fault suite) run private nats-server
        // processes from the same executable, which `start-stop-daemon --exec` would also stop.
        run("pkill", &["-f", "nats-server -a 127.0.0.1 -p 4222"]);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        // Wait for the process to be gone, not only its port: `start-stop-daemon --pidfile`
        // would take a server still shutting down for a running one and start nothing.
        let alive = || {
            std::process::Command::new("pgrep")
                .args(["-f", "nats-server -a 127.0.0.1 -p 4222"])
                .stdout(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        while alive() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = std::fs::remove_file("/tmp/capstan-shared-nats.pid");
    }
}

impl Drop for Restarter {
    fn drop(&mut self) {
        std::fs::create_dir_all("/var/lib/nats-server").ok();
        run(
            "start-stop-daemon",
            &[
                "--start",
                "--oknodo",
                "--background",
                // Matched by its own pid file, not by executable: a private nats-server of
                // another test must not make this start a no-op.
                "--make-pidfile",
                "--pidfile",
                "/tmp/capstan-shared-nats.pid",
                "--startas",
                "/usr/sbin/nats-server",
                "--",
                "-a",
                "127.0.0.1",
                "-p",
                "4222",
                "-js",
                "-sd",
                "/var/lib/nats-server",
                "-l",
                "/var/log/nats-server.log",
            ],
        );
    }
}

fn run(program: &str, args: &[&str]) {
    match std::process::Command::new(program).args(args).status() {
        Ok(status) if status.success() => {}
        other => panic!("{program} {args:?} failed: {other:?} (see deploy/local/services.sh nats)"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_survive_a_server_restart() -> anyhow::Result<()> {
    let _lock = server_lock(true);
    let b = connect().await;
    let (topic, mut worker, mut watcher) = worker_and_watcher(&b, "nats-restart", 3, PATIENCE).await;

    {
        let restarter = Restarter;
        restarter.stop();
    }

    // Publishing fails until the client has reconnected; a retry of a batch that did reach
    // the stream is dropped as a duplicate (Nats-Msg-Id).
    let after: Vec<Message> = (0..3).map(|i| message(&topic, "k", &format!("after-{i}"), json!(i))).collect();
    let deadline = Instant::now() + PATIENCE;
    while let Err(e) = b.publish(after.clone()).await {
        assert!(Instant::now() < deadline, "publish after the restart: {e}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for (name, s) in [("competing", &mut worker), ("broadcast", &mut watcher)] {
        let mut ids = BTreeSet::new();
        while ids.len() < 3 {
            let next = timeout(PATIENCE, s.next()).await;
            let d = next
                .map_err(|_| anyhow::anyhow!("{name}: nothing after the restart"))?
                .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
            assert!(d.message.event.id.starts_with("after-"), "{name}: {}", d.message.event.id);
            ids.insert(d.message.event.id.clone());
            d.ack().await?;
        }
    }
    Ok(())
}

#[test]
fn names_are_valid_and_stable() {
    let name = durable_name("g.x", "conformance.order.1-2-3");
    assert_eq!(name, durable_name("g.x", "conformance.order.1-2-3"));
    assert!(check_name("consumer", &name).is_ok(), "{name}");
    assert_ne!(name, durable_name("g_x", "conformance.order.1-2-3"));
    assert!(check_topic("dev.capstan.task").is_ok());
    for bad in ["", "a..b", "a.*", ">", "a b", ".a"] {
        assert!(matches!(check_topic(bad), Err(Error::Invalid(_))), "{bad:?}");
    }
}

/// `remove_namespace` deletes the stream and the dead-letter stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_namespace_deletes_the_streams() -> anyhow::Result<()> {
    let _lock = server_lock(false);
    let name = format!("CAPSTAN_TEST_RM_{}", uuid::Uuid::new_v4().simple());
    let config = NatsConfig { stream: name.clone(), subject_prefix: name.to_lowercase(), ..config() };
    let b = NatsBroker::connect(URL, config).await?;
    let js = async_nats::jetstream::new(b.client().clone());
    let dead = b.dead_letter_stream();
    assert!(js.get_stream(&name).await.is_ok() && js.get_stream(&dead).await.is_ok());
    b.remove_namespace().await?;
    assert!(js.get_stream(&name).await.is_err(), "the stream is still there");
    assert!(js.get_stream(&dead).await.is_err(), "the dead-letter stream is still there");
    b.remove_namespace().await?;
    Ok(())
}

/// A stream of its own (`CAPSTAN_TEST_<case>_<uuid>`) in memory storage.
fn in_memory(case: &str) -> (String, NatsConfig) {
    let name = format!("CAPSTAN_TEST_{case}_{}", uuid::Uuid::new_v4().simple());
    let config = NatsConfig {
        stream: name.clone(),
        subject_prefix: name.to_lowercase(),
        storage: NatsStorage::Memory,
        ..config()
    };
    (name, config)
}

/// A stream in memory storage carries messages like one on file; connecting to it with file
/// storage configured is refused with both storages named, and nothing in it is touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_storage_is_used_and_a_mismatch_is_refused() -> anyhow::Result<()> {
    let _lock = server_lock(false);
    let (name, in_memory) = in_memory("MEM");
    let b = NatsBroker::connect(URL, in_memory.clone()).await?;
    let js = async_nats::jetstream::new(b.client().clone());
    let mut stream = js.get_stream(&name).await?;
    assert_eq!(stream.info().await?.config.storage, async_nats::jetstream::stream::StorageType::Memory);
    let mut dead = js.get_stream(b.dead_letter_stream()).await?;
    assert_eq!(dead.info().await?.config.storage, async_nats::jetstream::stream::StorageType::File);
    crate::testing::publish_subscribe(&b, &options()).await;

    let on_file = NatsConfig { storage: NatsStorage::File, ..in_memory.clone() };
    match NatsBroker::connect(URL, on_file).await {
        Err(Error::Invalid(why)) => {
            assert!(why.contains(&name) && why.contains("memory storage, not file"), "{why}");
        }
        other => panic!("a file-storage broker on a memory stream: {other:?}"),
    }
    assert_eq!(stream.info().await?.config.storage, async_nats::jetstream::stream::StorageType::Memory);
    // The same configuration connects again.
    NatsBroker::connect(URL, in_memory).await?;
    b.remove_namespace().await?;
    Ok(())
}

/// A server restart empties a stream in memory storage, the stream itself included. The next
/// publish and the subscriptions' next pulls create it again (in memory), and both kinds of
/// subscription read the new stream, a broadcast one although the new stream's sequence counts
/// from 1 again. What was published while the stream was gone is lost, as documented.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_stream_lost_in_a_restart_is_created_again() -> anyhow::Result<()> {
    let _lock = server_lock(true);
    let (name, in_memory) = in_memory("MEMRS");
    let b = NatsBroker::connect(URL, in_memory).await?;
    // 300: were the server not to start a start sequence past the new stream's end at its end,
    // the broadcast consumer resuming after sequence 300 would miss the deadline.
    let (topic, mut worker, mut watcher) = worker_and_watcher(&b, "nats-mem-restart", 300, PATIENCE).await;

    {
        let restarter = Restarter;
        restarter.stop();
    }

    // Publish until both subscriptions have read something of the new stream: a message sent
    // before the consumers are back finds no interest and is dropped.
    let deadline = Instant::now() + PATIENCE;
    let (mut worker_got, mut watcher_got) = (false, false);
    let mut n = 0;
    while !(worker_got && watcher_got) {
        assert!(Instant::now() < deadline, "after the restart: worker read {worker_got}, watcher read {watcher_got}");
        n += 1;
        let _ = b.publish(vec![message(&topic, "k", &format!("after-{n}"), json!(n))]).await;
        for (got, s) in [(&mut worker_got, &mut worker), (&mut watcher_got, &mut watcher)] {
            while let Ok(Ok(d)) = timeout(Duration::from_millis(200), s.next()).await {
                assert!(d.message.event.id.starts_with("after-"), "{}", d.message.event.id);
                d.ack().await?;
                *got = true;
            }
        }
    }
    let js = async_nats::jetstream::new(b.client().clone());
    let mut stream = js.get_stream(&name).await?;
    assert_eq!(stream.info().await?.config.storage, async_nats::jetstream::stream::StorageType::Memory);
    b.remove_namespace().await?;
    Ok(())
}

#[test]
fn storage_is_parsed_by_name() {
    assert_eq!("file".parse::<NatsStorage>().unwrap(), NatsStorage::File);
    assert_eq!("memory".parse::<NatsStorage>().unwrap(), NatsStorage::Memory);
    assert!(matches!("disk".parse::<NatsStorage>(), Err(Error::Invalid(why)) if why.contains("disk")));
}
