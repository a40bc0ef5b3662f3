//! The conformance suite and RabbitMQ-specific behaviour against the RabbitMQ on 127.0.0.1:5672
//! (started by `deploy/local/services.sh rabbitmq`): structured input, dead letters, and a
//! subscription surviving a broker restart (`rabbitmqctl stop_app` / `start_app`).
//!
//! The restart test takes an exclusive file lock and every other test here a shared one, so
//! that no test sees the shared broker vanish mid-case, under `cargo test` and `cargo nextest`.

use std::collections::BTreeSet;
use std::fs::File;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;
use tokio::time::{Instant, timeout};

use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::types::FieldTable;

use super::{AmqpBroker, AmqpConfig, DEAD_REASON_HEADER};
use crate::testing::{Options, expect_quiet, message, recv, unique_topic, worker_and_watcher};
use crate::{Broker, Message, Result, Subscription, SubscriptionMode};

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const PATIENCE: Duration = Duration::from_secs(60);

fn config() -> AmqpConfig {
    AmqpConfig { exchange: "capstan-test".into(), ..AmqpConfig::default() }
}

/// Serializes the restart test against every other test of the shared broker.
fn broker_lock(exclusive: bool) -> File {
    let path = std::env::temp_dir().join("capstan-rabbitmq.lock");
    let file = File::create(&path).unwrap_or_else(|e| panic!("lock file {path:?}: {e}"));
    let locked = if exclusive { file.lock() } else { file.lock_shared() };
    locked.unwrap_or_else(|e| panic!("lock {path:?}: {e}"));
    file
}

async fn connect() -> AmqpBroker {
    match AmqpBroker::connect(URL, config()).await {
        Ok(b) => b,
        Err(e) => panic!("RabbitMQ is needed at {URL} ({e}); start it with deploy/local/services.sh rabbitmq"),
    }
}

/// A broker holding the shared lock for as long as the test uses it.
struct Locked {
    broker: AmqpBroker,
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

    fn packs(&self) -> bool {
        self.broker.packs()
    }

    async fn publish_packed(&self, messages: &[Message]) -> Result<()> {
        self.broker.publish_packed(messages).await
    }
}

async fn locked() -> Locked {
    let lock = broker_lock(false);
    Locked { broker: connect().await, _lock: lock }
}

fn options() -> Options {
    Options { max_payload: config().max_payload, patience: PATIENCE, quiet: Duration::from_millis(500) }
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

fn group(name: &str) -> SubscriptionMode {
    SubscriptionMode::Competing { group: name.into() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_structured_events_and_dead_letters_garbage() -> anyhow::Result<()> {
    use lapin::options::BasicPublishOptions;
    use lapin::types::AMQPValue;

    let b = locked().await;
    let topic = unique_topic("amqp-modes");
    let mut s = b.subscribe(&topic, group("g")).await?;
    let (_, channel) = b.broker.inner.link().await?;
    let mut garbage = FieldTable::default();
    garbage.insert("cloudEvents:id".into(), AMQPValue::LongString("only-an-id".into()));
    let structured = message(&topic, "", "structured-1", json!({"from": "python"}));
    let sends = [
        (lapin::BasicProperties::default().with_headers(garbage), b"{}".to_vec()),
        (
            lapin::BasicProperties::default().with_content_type("application/cloudevents+json".into()),
            structured.event.to_json(),
        ),
    ];
    for (props, body) in sends {
        channel
            .basic_publish("capstan-test".into(), topic.as_str().into(), BasicPublishOptions::default(), &body, props)
            .await?
            .await?;
    }
    let d = recv(&mut s, PATIENCE, "the structured event after the garbage").await;
    assert_eq!(d.message.event, structured.event);
    d.ack().await?;
    expect_quiet(&mut s, Duration::from_millis(500), "garbage is not delivered").await;

    let reason = take_dead_letter(&b.broker, &topic).await?.and_then(|h| header(&h, DEAD_REASON_HEADER));
    assert!(reason.as_deref().is_some_and(|r| r.contains("missing")), "the dead letter says why: {reason:?}");
    Ok(())
}

/// The headers of the dead letter of `topic` (its routing key), taken from the dead-letter queue.
/// All tests share that queue: every other letter read on the way stays unacked until the
/// channel closes, which puts it back for its own test.
async fn take_dead_letter(b: &AmqpBroker, topic: &str) -> anyhow::Result<Option<FieldTable>> {
    let (conn, _) = b.inner.link().await?;
    let channel = conn.create_channel().await?;
    let queue = b.dead_letter_queue();
    let mut found = None;
    while let Some(m) = channel.basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false }).await? {
        if m.delivery.routing_key.as_str() == topic {
            m.delivery.acker.ack(BasicAckOptions::default()).await?;
            found = Some(m.delivery.properties.headers().clone().unwrap_or_default());
            break;
        }
    }
    channel.close(200, "dead letter read".into()).await?;
    Ok(found)
}

fn header(headers: &FieldTable, name: &str) -> Option<String> {
    headers.inner().get(name).and_then(super::subscription::text_of)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_dead_letter_keeps_the_reason() {
    let b = locked().await;
    let reason_of = async |topic: &str, id: &str| {
        let kept = take_dead_letter(&b.broker, topic).await.ok()??;
        (header(&kept, "cloudEvents:id")? == id).then(|| header(&kept, DEAD_REASON_HEADER)).flatten()
    };
    crate::testing::dead_letter_keeps_the_reason(&b, &options(), reason_of).await;
}

/// Starts the RabbitMQ application again when dropped, so that a failing test leaves it up.
struct Restarter;

impl Drop for Restarter {
    fn drop(&mut self) {
        rabbitmqctl("start_app");
    }
}

fn rabbitmqctl(command: &str) {
    match std::process::Command::new("rabbitmqctl").arg(command).output() {
        Ok(out) if out.status.success() => {}
        other => panic!("rabbitmqctl {command} failed: {other:?} (see deploy/local/services.sh rabbitmq)"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_survive_a_broker_restart() -> anyhow::Result<()> {
    let _lock = broker_lock(true);
    let b = connect().await;
    let (topic, mut worker, _watcher) = worker_and_watcher(&b, "amqp-restart", 3, PATIENCE).await;
    {
        let _restarter = Restarter;
        rabbitmqctl("stop_app");
    }
    let after: Vec<Message> = (0..3).map(|i| message(&topic, "k", &format!("after-{i}"), json!(i))).collect();
    // Give the subscriptions time to reopen their queues: a broadcast queue is a new one, and
    // only gets what is published after it exists.
    let deadline = Instant::now() + PATIENCE;
    loop {
        match b.publish(after.clone()).await {
            Ok(()) => break,
            Err(e) => assert!(Instant::now() < deadline, "publish after the restart: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut ids = BTreeSet::new();
    while ids.len() < 3 {
        let next = timeout(PATIENCE, worker.next()).await;
        let d = next
            .map_err(|_| anyhow::anyhow!("competing: nothing after the restart"))?
            .map_err(|e| anyhow::anyhow!("competing: {e}"))?;
        assert!(d.message.event.id.starts_with("after-"), "{}", d.message.event.id);
        ids.insert(d.message.event.id.clone());
        d.ack().await?;
    }
    Ok(())
}

/// `publish_packed` sends the messages of a topic as one AMQP message; a part dead-lettered
/// goes to the dead letters alone, with its reason, and once the other parts are acked the pack
/// is settled: a member that joins after the first left gets nothing again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packed_messages_travel_as_one_and_settle_together() -> anyhow::Result<()> {
    use lapin::options::{QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions};

    let b = locked().await;
    let topic = unique_topic("amqp-pack");
    let sent: Vec<Message> = (0..5).map(|i| message(&topic, &format!("run-{i}"), &format!("p{i}"), json!(i))).collect();

    // A queue of our own, without a consumer, counts what arrives.
    let (_, channel) = b.broker.inner.link().await?;
    let probe = format!("capstan-test.probe.{topic}");
    channel.queue_declare(probe.as_str().into(), QueueDeclareOptions::default(), FieldTable::default()).await?;
    let bind = QueueBindOptions::default();
    channel
        .queue_bind(probe.as_str().into(), "capstan-test".into(), topic.as_str().into(), bind, FieldTable::default())
        .await?;
    b.publish_packed(&sent).await?;
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    let counted = channel.queue_declare(probe.as_str().into(), passive, FieldTable::default()).await?;
    assert_eq!(counted.message_count(), 1, "five messages, one AMQP message");
    channel.queue_delete(probe.as_str().into(), QueueDeleteOptions::default()).await?;

    let mut first = b.subscribe(&topic, group("g")).await?;
    b.publish_packed(&sent[..3]).await?;
    let mut held = Vec::new();
    for expected in &sent[..3] {
        let d = recv(&mut first, PATIENCE, "a part of the pack").await;
        assert_eq!(*d.message, *expected);
        held.push(d);
    }
    let reason = "conformance: part 1 is unusable";
    held[1].dead_letter(reason).await?;
    held[0].ack().await?;
    held[2].ack().await?;
    let kept = take_dead_letter(&b.broker, &topic).await?.expect("a dead letter");
    assert_eq!(header(&kept, "cloudEvents:id").as_deref(), Some("p1"), "the dead letter is the part alone");
    assert_eq!(header(&kept, DEAD_REASON_HEADER).as_deref(), Some(reason));
    // Closing the first member's channel would hand an unacked pack to the next member.
    let mut second = b.subscribe(&topic, group("g")).await?;
    drop(held);
    drop(first);
    expect_quiet(&mut second, Duration::from_secs(1), "a settled pack").await;
    Ok(())
}

/// `remove_namespace` deletes the exchanges, the dead-letter queue and the group queues the
/// broker declared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_namespace_deletes_exchanges_and_queues() -> anyhow::Result<()> {
    use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};

    let _lock = broker_lock(false);
    let exchange = format!("capstan-test-rm-{}", uuid::Uuid::new_v4().simple());
    let b = AmqpBroker::connect(URL, AmqpConfig { exchange: exchange.clone(), ..AmqpConfig::default() }).await?;
    let topic = unique_topic("amqp-remove");
    drop(b.subscribe(&topic, group("g")).await?);
    b.remove_namespace().await?;
    let (conn, _) = b.inner.link().await?;
    let queues = [format!("{exchange}.g.{topic}"), b.dead_letter_queue()];
    for queue in &queues {
        let channel = conn.create_channel().await?;
        let passive = QueueDeclareOptions { passive: true, ..Default::default() };
        let found = channel.queue_declare(queue.as_str().into(), passive, FieldTable::default()).await;
        assert!(found.is_err(), "queue {queue} is still there");
    }
    for name in [exchange.clone(), format!("{exchange}.dlx")] {
        let channel = conn.create_channel().await?;
        let passive = ExchangeDeclareOptions { passive: true, ..Default::default() };
        let kind = lapin::ExchangeKind::Topic;
        let found = channel.exchange_declare(name.as_str().into(), kind, passive, FieldTable::default()).await;
        assert!(found.is_err(), "exchange {name} is still there");
    }
    Ok(())
}
