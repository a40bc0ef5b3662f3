//! Tests against a real Kafka-protocol broker: Tansu on 127.0.0.1:9092, started by
//! `deploy/local/services.sh kafka`. They fail (never skip) when it is not running. The restart
//! test runs its own Tansu on 127.0.0.1:9093, with storage that survives its restarts, so that
//! stopping it disturbs no other test.

use std::path::PathBuf;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::json;

use super::{KafkaBroker, KafkaConfig};
use crate::testing::{Options, message, recv, unique_topic};
use crate::{Broker, SubscriptionMode};

const ADDRESS: &str = "127.0.0.1:9092";

fn config(bootstrap: &str) -> KafkaConfig {
    KafkaConfig {
        // Tansu (calfkit build) holds a new group's first join for half the session timeout.
        session_timeout: Duration::from_millis(2000),
        heartbeat_interval: Duration::from_millis(500),
        request_timeout: Duration::from_secs(5),
        partitions: 4,
        ..KafkaConfig::new(bootstrap)
    }
}

async fn broker_at(bootstrap: &str) -> KafkaBroker {
    match KafkaBroker::connect(config(bootstrap)).await {
        Ok(b) => b,
        Err(e) => panic!(
            "Kafka (Tansu) is not reachable at {bootstrap}: {e}. Start it with `deploy/local/services.sh kafka`."
        ),
    }
}

async fn broker() -> KafkaBroker {
    broker_at(ADDRESS).await
}

fn options() -> Options {
    Options { max_payload: config(ADDRESS).max_message_bytes, patience: Duration::from_secs(30), ..Options::default() }
}

/// The conformance suite runs on single-partition topics: its `competing_members_share` case
/// expects one group member to see *all* keys in publish order, which Kafka promises only within
/// a partition. `two_members_share_a_topic` below covers sharing across partitions.
async fn conformance_broker() -> KafkaBroker {
    let config = KafkaConfig { partitions: 1, ..config(ADDRESS) };
    match KafkaBroker::connect(config).await {
        Ok(b) => b,
        Err(e) => {
            panic!("Kafka (Tansu) is not reachable at {ADDRESS}: {e}. Start it with `deploy/local/services.sh kafka`.")
        }
    }
}

crate::conformance_tests! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    make = conformance_broker,
    options = options(),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_members_share_a_topic() {
    let b = broker().await;
    let topic = unique_topic("share");
    let group = competing("share");
    let mut members =
        [b.subscribe(&topic, group.clone()).await.expect("a"), b.subscribe(&topic, group).await.expect("b")];
    let n = 40;
    let sent = (0..n).map(|i| message(&topic, &format!("run-{}", i % 8), &format!("s{i}"), json!({"i": i}))).collect();
    b.publish(sent).await.expect("publish");
    let mut seen = std::collections::HashMap::new();
    let mut last: std::collections::HashMap<String, i64> = std::collections::HashMap::new();
    let mut per_member = [0, 0];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while seen.len() < n {
        assert!(tokio::time::Instant::now() < deadline, "only {} of {n} arrived", seen.len());
        for (which, m) in members.iter_mut().enumerate() {
            let Ok(Ok(d)) = tokio::time::timeout(Duration::from_millis(200), m.next()).await else { continue };
            let i = d.message.event.data.as_ref().and_then(|v| v.to_value()["i"].as_i64()).unwrap_or(-1);
            assert!(seen.insert(d.message.event.id.clone(), which).is_none(), "{} twice", d.message.event.id);
            let prev = last.insert(d.message.key.clone(), i);
            assert!(prev.is_none_or(|p| p < i), "key {} got {i} after {prev:?}", d.message.key);
            per_member[which] += 1;
            d.ack().await.expect("ack");
        }
    }
    assert!(per_member.iter().all(|&c| c > 0), "both members got a share: {per_member:?}");
}

fn competing(group: &str) -> SubscriptionMode {
    SubscriptionMode::Competing { group: format!("{group}-{}", unique_topic("g")) }
}

/// A record as another Kafka client would write it.
async fn produce_raw(topic: &str, value: &[u8], headers: &[(&str, &str)]) {
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", ADDRESS).create().expect("producer");
    let mut h = OwnedHeaders::new();
    for (key, value) in headers {
        h = h.insert(Header { key, value: Some(*value) });
    }
    let record = FutureRecord::to(topic).key("raw").payload(value).headers(h);
    if let Err((e, _)) = producer.send(record, Duration::from_secs(5)).await {
        panic!("raw produce to {topic} failed: {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_mode_is_accepted() {
    let b = broker().await;
    let topic = unique_topic("structured");
    let mut s = b.subscribe(&topic, competing("structured")).await.expect("subscribe");
    let event = message(&topic, "raw", "structured-1", json!({"x": 1})).event;
    produce_raw(&topic, &event.to_json(), &[("content-type", "application/cloudevents+json")]).await;
    let d = recv(&mut s, Duration::from_secs(30), "structured record").await;
    assert_eq!(d.message.event, event);
    d.ack().await.expect("ack");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_records_go_to_the_dead_letter_topic() {
    let b = broker().await;
    let topic = unique_topic("poison");
    let mut s = b.subscribe(&topic, competing("poison")).await.expect("subscribe");
    produce_raw(&topic, b"not a cloudevent", &[]).await;
    let good = message(&topic, "k", "after-poison", json!(null));
    b.publish(vec![good.clone()]).await.expect("publish");
    let d = recv(&mut s, Duration::from_secs(30), "the record after the poison one").await;
    assert_eq!(*d.message, good, "the poison record does not block the partition");
    d.ack().await.expect("ack");

    let dlq = &b.config().dead_letter_topic;
    let Some(dead) = find_dead_letter(&b, &topic) else { panic!("the poison record never reached {dlq}") };
    assert_eq!(dead.payload.as_deref(), Some(&b"not a cloudevent"[..]), "the record is kept as it was");
    let reason = dead.header("capstan-dead-letter-reason").unwrap_or_default();
    assert!(reason.contains("neither binary"), "the reason is given: {reason}");
}

/// A record of the dead-letter topic.
struct DeadRecord {
    payload: Option<Vec<u8>>,
    headers: Vec<(String, String)>,
}

impl DeadRecord {
    fn header(&self, name: &str) -> Option<String> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }
}

/// Reads the dead-letter topic as raw records from its start, for up to 20 s, until the record
/// that came from `topic` (its origin header).
fn find_dead_letter(b: &KafkaBroker, topic: &str) -> Option<DeadRecord> {
    let dlq = &b.config().dead_letter_topic;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", ADDRESS)
        .set("group.id", unique_topic("dlq-reader"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let metadata = consumer.fetch_metadata(Some(dlq), Duration::from_secs(5)).expect("metadata");
    let mut tpl = TopicPartitionList::new();
    for p in metadata.topics().iter().flat_map(|t| t.partitions()) {
        tpl.add_partition_offset(dlq, p.id(), Offset::Beginning).expect("partition");
    }
    consumer.assign(&tpl).expect("assign");
    let origin_prefix = format!("{topic}/");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) else { continue };
        let Some(headers) = m.headers() else { continue };
        let record = DeadRecord {
            payload: m.payload().map(<[u8]>::to_vec),
            headers: headers
                .iter()
                .map(|h| (h.key.to_string(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned()))
                .collect(),
        };
        if record.header("capstan-dead-letter-origin").is_some_and(|o| o.starts_with(&origin_prefix)) {
            return Some(record);
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_dead_letter_keeps_the_reason() {
    let b = conformance_broker().await;
    let reason_of = async |topic: &str, id: &str| {
        let dead = find_dead_letter(&b, topic)?;
        (dead.header("ce_id")? == id).then(|| dead.header("capstan-dead-letter-reason")).flatten()
    };
    crate::testing::dead_letter_keeps_the_reason(&b, &options(), reason_of).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_republishes_with_the_count_and_delay() {
    let b = broker().await;
    let topic = unique_topic("nack-count");
    let mut s = b.subscribe(&topic, competing("nack")).await.expect("subscribe");
    b.publish(vec![message(&topic, "k", "n1", json!(1))]).await.expect("publish");
    let mut d = recv(&mut s, Duration::from_secs(30), "first").await;
    for expected in 1..=2 {
        let at = tokio::time::Instant::now();
        d.nack(Duration::from_millis(400)).await.expect("nack");
        d = recv(&mut s, Duration::from_secs(30), "redelivery").await;
        assert!(at.elapsed() >= Duration::from_millis(400), "not before the delay");
        assert_eq!((d.message.event.id.as_str(), d.redeliveries), ("n1", expected));
    }
    d.ack().await.expect("ack");
}

/// Runs `deploy/local/kafka.sh` for the Tansu on `port` with `storage` (`memory` or `s3`).
fn tansu(action: &str, port: u16, storage: &str) {
    if let Err(e) = run_tansu(action, port, storage) {
        panic!("{e}");
    }
}

fn run_tansu(action: &str, port: u16, storage: &str) -> Result<(), String> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/local/kafka.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .arg(action)
        .env("CAPSTAN_KAFKA_PORT", port.to_string())
        .env("CAPSTAN_KAFKA_STORAGE", storage)
        .output()
        .map_err(|e| format!("running {} failed: {e}", script.display()))?;
    if out.status.success() {
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        Err(format!("{} {action} (port {port}, {storage} storage) failed: {stderr}", script.display()))
    }
}

/// A private Tansu with s3 storage (a local S3 server that outlives Tansu's restarts, so topics,
/// records and committed offsets survive them as on a real Kafka), taken down when dropped.
struct PrivateTansu(u16);

impl PrivateTansu {
    fn start(port: u16) -> Self {
        // Whatever an earlier, failed run left on the port goes first (it may be memory storage).
        tansu("down", port, "s3");
        tansu("start", port, "s3");
        PrivateTansu(port)
    }

    async fn restart(&self) {
        let port = self.0;
        let restarted = tokio::task::spawn_blocking(move || {
            tansu("stop", port, "s3");
            tansu("start", port, "s3");
        });
        restarted.await.expect("restarting Tansu");
    }
}

impl Drop for PrivateTansu {
    fn drop(&mut self) {
        // No panic here: this also runs while a failed test unwinds.
        if let Err(e) = run_tansu("down", self.0, "s3") {
            eprintln!("{e}");
        }
    }
}

/// The conformance case `broker_restart` with live clients: they live through a restart of a
/// Tansu of their own (port 9093, so that no other test sees the broker vanish).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_broker_restart() {
    let private = PrivateTansu::start(9093);
    let b = match KafkaBroker::connect(config("127.0.0.1:9093")).await {
        Ok(b) => b,
        Err(e) => panic!("the private Tansu on 127.0.0.1:9093 is not reachable: {e}"),
    };
    crate::testing::broker_restart(&b, &options(), private.restart()).await;

    // A subscription dropped while the broker is down goes, and the runtime shuts down: its last
    // commit and its close do not wait for the broker.
    let topic = unique_topic("gone");
    let mut s = b.subscribe(&topic, competing("gone")).await.expect("subscribe");
    b.publish(vec![message(&topic, "k", "last", json!(0))]).await.expect("publish");
    let d = recv(&mut s, Duration::from_secs(30), "the last message").await;
    tokio::task::spawn_blocking(|| tansu("stop", 9093, "s3")).await.expect("stopping Tansu");
    d.ack().await.expect("ack while the broker is down");
    drop((d, s, b));
}
