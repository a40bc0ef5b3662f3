//! The one conformance suite every [`Broker`] implementation passes.
//!
//! Each case is a public async function taking a fresh broker and [`Options`]; the
//! [`conformance_tests!`](crate::conformance_tests) macro turns them into one `#[test]` each, and
//! [`suite`] runs them all in sequence. Cases wait on conditions with `Options::patience` as the
//! upper bound, so they run in milliseconds under tokio's paused time (in-memory broker) and
//! within real time against a service. Topic names are unique per call, so cases may share a
//! broker server.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capstan_proto::CloudEvent;
use serde_json::json;
use tokio::time::{Instant, timeout};

use crate::{Broker, Credit, Delivery, Error, Message, Subscription, SubscriptionMode};

mod restart;
pub use restart::{broker_restart, worker_and_watcher};

/// What a case may assume about the broker under test.
#[derive(Debug, Clone)]
pub struct Options {
    /// The broker's message size limit (encoded CloudEvent bytes).
    pub max_payload: usize,
    /// The longest a case waits for a delivery that must come (redeliveries included).
    pub patience: Duration,
    /// How long a case waits to be sure that nothing more comes.
    pub quiet: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options { max_payload: 1024 * 1024, patience: Duration::from_secs(60), quiet: Duration::from_millis(500) }
    }
}

/// Runs every case, each on a broker from `make`.
pub async fn suite<B, F, Fut>(make: F, options: Options)
where
    B: Broker,
    F: Fn() -> Fut,
    Fut: Future<Output = B>,
{
    publish_subscribe(&make().await, &options).await;
    broadcast_gets_everything_after_subscribing(&make().await, &options).await;
    competing_members_share(&make().await, &options).await;
    ack_settles(&make().await, &options).await;
    nack_redelivers_after_delay(&make().await, &options).await;
    dropped_consumer_is_redelivered(&make().await, &options).await;
    order_per_key(&make().await, &options).await;
    redelivery_keeps_the_event_id(&make().await, &options).await;
    payload_limit(&make().await, &options).await;
    many_messages_exactly_once(&make().await, &options).await;
    packed_messages_come_one_by_one(&make().await, &options).await;
}

/// Declares one test per conformance case. `make` is an expression that, called with no
/// argument, gives a future of a fresh broker; the attribute is the test attribute to use.
///
/// ```text
/// capstan_brokers::conformance_tests! {
///     #[tokio::test(start_paused = true)]
///     make = || async { MemoryBroker::new() },
///     options = Options::default(),
/// }
/// ```
#[macro_export]
macro_rules! conformance_tests {
    (#[$test:meta] make = $make:expr, options = $options:expr $(,)?) => {
        $crate::conformance_tests!(@cases #[$test] $make, $options;
            publish_subscribe broadcast_gets_everything_after_subscribing competing_members_share
            ack_settles nack_redelivers_after_delay dropped_consumer_is_redelivered order_per_key
            redelivery_keeps_the_event_id payload_limit many_messages_exactly_once
            packed_messages_come_one_by_one);
    };
    (@cases #[$test:meta] $make:expr, $options:expr; $($case:ident)*) => {
        $(
            #[$test]
            async fn $case() {
                let broker = ($make)().await;
                $crate::testing::$case(&broker, &$options).await;
            }
        )*
    };
}

/// A topic name no other case (or run) uses.
pub fn unique_topic(case: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("conformance.{case}.{}-{nanos}-{n}", std::process::id())
}

/// A message with a fresh event id on `topic`.
pub fn message(topic: &str, key: &str, id: &str, data: serde_json::Value) -> Message {
    Message {
        topic: topic.to_string(),
        key: key.to_string(),
        event: CloudEvent::new(id, "capstan/conformance", "dev.capstan.conformance.v1")
            .with_data(data)
            .with_ext("capstanrun", key),
    }
}

async fn sub(broker: &impl Broker, topic: &str, mode: SubscriptionMode) -> Box<dyn Subscription> {
    match broker.subscribe(topic, mode.clone()).await {
        Ok(s) => s,
        Err(e) => panic!("subscribe to {topic} ({mode:?}) failed: {e}"),
    }
}

fn group(name: &str) -> SubscriptionMode {
    SubscriptionMode::Competing { group: name.to_string() }
}

async fn publish(broker: &impl Broker, messages: Vec<Message>) {
    if let Err(e) = broker.publish(messages).await {
        panic!("publish failed: {e}");
    }
}

/// The next delivery, which must come within `patience`.
pub async fn recv(sub: &mut Box<dyn Subscription>, patience: Duration, what: &str) -> Delivery {
    match timeout(patience, sub.next()).await {
        Ok(Ok(d)) => d,
        Ok(Err(e)) => panic!("{what}: subscription failed: {e}"),
        Err(_) => panic!("{what}: nothing delivered within {patience:?}"),
    }
}

/// Asserts that nothing is delivered within `quiet`.
pub async fn expect_quiet(sub: &mut Box<dyn Subscription>, quiet: Duration, what: &str) {
    if let Ok(result) = timeout(quiet, sub.next()).await {
        match result {
            Ok(d) => panic!("{what}: unexpected delivery of {}", d.message.event.id),
            Err(e) => panic!("{what}: subscription failed: {e}"),
        }
    }
}

async fn ack(d: &Delivery) {
    if let Err(e) = d.ack().await {
        panic!("ack of {} failed: {e}", d.message.event.id);
    }
}

/// A subscriber receives what is published, intact and in order.
pub async fn publish_subscribe(broker: &impl Broker, o: &Options) {
    let topic = unique_topic("pubsub");
    let mut s = sub(broker, &topic, SubscriptionMode::Broadcast).await;
    let sent: Vec<Message> = (0..3).map(|i| message(&topic, "run-1", &format!("e{i}"), json!({"i": i}))).collect();
    publish(broker, sent.clone()).await;
    for expected in sent {
        let d = recv(&mut s, o.patience, "publish_subscribe").await;
        assert_eq!(*d.message, expected, "the delivered message equals the published one");
        assert_eq!(d.redeliveries, 0);
        ack(&d).await;
    }
}

/// Every broadcast subscriber gets every message published after it subscribed, and no earlier.
pub async fn broadcast_gets_everything_after_subscribing(broker: &impl Broker, o: &Options) {
    let topic = unique_topic("broadcast");
    let mut a = sub(broker, &topic, SubscriptionMode::Broadcast).await;
    publish(broker, vec![message(&topic, "k", "before", json!(0))]).await;
    let mut b = sub(broker, &topic, SubscriptionMode::Broadcast).await;
    publish(broker, vec![message(&topic, "k", "after", json!(1))]).await;
    for expected in ["before", "after"] {
        let d = recv(&mut a, o.patience, "first broadcast subscriber").await;
        assert_eq!(d.message.event.id, expected);
        ack(&d).await;
    }
    let d = recv(&mut b, o.patience, "second broadcast subscriber").await;
    assert_eq!(d.message.event.id, "after", "broadcast has no replay");
    ack(&d).await;
    expect_quiet(&mut b, o.quiet, "second broadcast subscriber").await;
}

/// Members of a group share its messages (each to one member); other groups and broadcast
/// subscribers each get all of them.
pub async fn competing_members_share(broker: &impl Broker, o: &Options) {
    let topic = unique_topic("competing");
    let mut members = vec![sub(broker, &topic, group("g")).await, sub(broker, &topic, group("g")).await];
    let mut other = sub(broker, &topic, group("h")).await;
    let mut watcher = sub(broker, &topic, SubscriptionMode::Broadcast).await;
    let n = 20;
    let sent: Vec<Message> =
        (0..n).map(|i| message(&topic, &format!("k{}", i % 4), &format!("e{i}"), json!(i))).collect();
    publish(broker, sent).await;

    let mut seen = HashSet::new();
    let mut turn = 0;
    while seen.len() < n {
        // Poll both members in turn; an idle member must not block the other one.
        let m = &mut members[turn % 2];
        turn += 1;
        if let Ok(Ok(d)) = timeout(o.quiet, m.next()).await {
            assert!(seen.insert(d.message.event.id.clone()), "{} delivered twice in the group", d.message.event.id);
            ack(&d).await;
        } else {
            assert!(turn < 4 * n + 20, "group g received only {} of {n}", seen.len());
        }
    }
    for m in &mut members {
        expect_quiet(m, o.quiet, "group g after all were acked").await;
    }
    for (name, s) in [("group h", &mut other), ("broadcast", &mut watcher)] {
        for i in 0..n {
            let d = recv(s, o.patience, name).await;
            assert_eq!(d.message.event.id, format!("e{i}"), "{name} gets every message in order");
            ack(&d).await;
        }
    }
}

/// An acked message does not come again.
pub async fn ack_settles(broker: &impl Broker, o: &Options) {
    let topic = unique_topic("ack");
    let mut s = sub(broker, &topic, group("g")).await;
    publish(broker, vec![message(&topic, "k", "once", json!(null))]).await;
    let d = recv(&mut s, o.patience, "ack_settles").await;
    ack(&d).await;
    expect_quiet(&mut s, o.quiet, "after ack").await;
}

/// A nacked message comes again, not before its delay, counted as a redelivery.
pub async fn nack_redelivers_after_delay(broker: &impl Broker, o: &Options) {
    let topic = unique_topic("nack");
    let mut s = sub(broker, &topic, group("g")).await;
    publish(broker, vec![message(&topic, "k", "again", json!(null))]).await;
    let d = recv(&mut s, o.patience, "first delivery").await;
    let delay = Duration::from_millis(300);
    let nacked_at = Instant::now();
    if let Err(e) = d.nack(delay).await {
        panic!("nack failed: {e}");
    }
    let again = recv(&mut s, o.patience, "redelivery after nack").await;
    assert!(nacked_at.elapsed() >= delay, "redelivered after {:?}, before the nack delay", nacked_at.elapsed());
    assert_eq!(again.message.event.id, "again");
    assert!(again.redeliveries >= 1, "a redelivery is counted");
    ack(&again).await;
}

/// What a consumer held unacked when its subscription was dropped goes to another member.
pub async fn dropped_consumer_is_redelivered(broker: &impl Broker, o: &Options) {
    let topic = unique_topic("dropped");
    let mut doomed = sub(broker, &topic, group("g")).await;
    publish(broker, vec![message(&topic, "k", "held", json!(null))]).await;
    let held = recv(&mut doomed, o.patience, "delivery to the doomed member").await;
    let mut survivor = sub(broker, &topic, group("g")).await;
    drop(held);
    drop(doomed);
    let d = recv(&mut survivor, o.patience, "redelivery to the survivor").await;
    assert_eq!(d.message.event.id, "held");
    assert!(d.redeliveries >= 1, "a redelivery is counted");
    ack(&d).await;
}

/// A group with one member gets each key's messages in publish order.
pub async fn order_per_key(broker: &impl Broker, o: &Options) {
    let topic = unique_topic("order");
    let mut s = sub(broker, &topic, group("g")).await;
    let keys = ["run-a", "run-b", "run-c"];
    let n = 300;
    for chunk in (0..n).collect::<Vec<_>>().chunks(50) {
        let batch =
            chunk.iter().map(|i| message(&topic, keys[i % keys.len()], &format!("e{i}"), json!({"i": i}))).collect();
        publish(broker, batch).await;
    }
    let mut last: BTreeMap<String, i64> = BTreeMap::new();
    for _ in 0..n {
        let d = recv(&mut s, o.patience, "order_per_key").await;
        let i = d.message.event.data.as_ref().and_then(|v| v.to_value()["i"].as_i64()).unwrap_or(-1);
        let prev = last.insert(d.message.key.clone(), i);
        assert!(prev.is_none_or(|p| p < i), "key {} got {i} after {prev:?}", d.message.key);
        ack(&d).await;
    }
}

/// A redelivered message is the same CloudEvent (same id and data), so consumers can
/// deduplicate by id.
pub async fn redelivery_keeps_the_event_id(broker: &impl Broker, o: &Options) {
    let topic = unique_topic("dup");
    let mut s = sub(broker, &topic, group("g")).await;
    let sent = message(&topic, "k", "dup-1", json!({"payload": [1, 2, 3]}));
    publish(broker, vec![sent.clone()]).await;
    let first = recv(&mut s, o.patience, "first delivery").await;
    if let Err(e) = first.nack(Duration::ZERO).await {
        panic!("nack failed: {e}");
    }
    let second = recv(&mut s, o.patience, "redelivery").await;
    assert_eq!(second.message.event, sent.event, "a redelivery carries the same CloudEvent");
    assert_eq!(first.message.event.id, second.message.event.id);
    ack(&second).await;
    // A late settle of the superseded delivery must be harmless.
    let _ = first.ack().await;
    expect_quiet(&mut s, o.quiet, "after the redelivery was acked").await;
}

/// A message over the limit is refused with `TooLarge`; one under it arrives intact.
pub async fn payload_limit(broker: &impl Broker, o: &Options) {
    let topic = unique_topic("large");
    let mut s = sub(broker, &topic, group("g")).await;
    let big = message(&topic, "k", "too-big", json!("x".repeat(o.max_payload + 1)));
    match broker.publish(vec![big]).await {
        Err(Error::TooLarge { size, limit }) => {
            assert!(size > limit, "size {size} is over limit {limit}");
            let text = Error::TooLarge { size, limit }.to_string();
            assert!(text.contains("exceeds"), "the error says what is wrong: {text}");
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    // Leave room for the envelope (attributes and JSON quoting).
    let fits = message(&topic, "k", "fits", json!("y".repeat(o.max_payload - 4096)));
    publish(broker, vec![fits.clone()]).await;
    let d = recv(&mut s, o.patience, "a large message under the limit").await;
    assert_eq!(*d.message, fits);
    ack(&d).await;
}

/// 10,000 messages to a group of three members are each delivered (and acked) exactly once.
pub async fn many_messages_exactly_once(broker: &impl Broker, o: &Options) {
    let topic = unique_topic("many");
    let n: usize = 10_000;
    let seen: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let mut consumers = Vec::new();
    for _ in 0..3 {
        let mut s = sub(broker, &topic, group("workers")).await;
        let seen = Arc::clone(&seen);
        let (quiet, patience) = (o.quiet, o.patience);
        consumers.push(tokio::spawn(async move {
            let mut got = 0usize;
            let started = Instant::now();
            loop {
                match timeout(quiet, s.next()).await {
                    Ok(Ok(d)) => {
                        let id = d.message.event.id.clone();
                        *seen.lock().unwrap_or_else(|p| p.into_inner()).entry(id).or_default() += 1;
                        d.ack().await.expect("ack during the bulk case");
                        got += 1;
                    }
                    Ok(Err(e)) => panic!("a consumer's subscription failed: {e}"),
                    // Stop once all arrived and the topic stayed quiet (which also catches late
                    // duplicates), or when patience ran out.
                    Err(_) => {
                        let all = seen.lock().unwrap_or_else(|p| p.into_inner()).len() >= n;
                        if all || started.elapsed() > patience {
                            break;
                        }
                    }
                }
            }
            got
        }));
    }
    for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
        let batch = chunk
            .iter()
            .map(|i| message(&topic, &format!("run-{}", i % 97), &format!("m{i}"), json!({"i": i})))
            .collect();
        publish(broker, batch).await;
    }
    let mut total = 0;
    for c in consumers {
        total += c.await.expect("a consumer task panicked");
    }
    let seen = seen.lock().unwrap_or_else(|p| p.into_inner());
    let dupes: Vec<_> = seen.iter().filter(|(_, c)| **c > 1).take(5).collect();
    assert!(dupes.is_empty(), "delivered more than once: {dupes:?}");
    assert_eq!(seen.len(), n, "every message was delivered");
    assert_eq!(total, n);
}

/// Messages published with `publish_packed` come as deliveries of their own, in order, each
/// with its topic and key, whether or not the broker packed them. A nacked one comes again
/// (those packed with it may come again too), and once each is acked nothing more comes.
pub async fn packed_messages_come_one_by_one(broker: &impl Broker, o: &Options) {
    let queue = unique_topic("packed-group");
    let fanned = unique_topic("packed-broadcast");
    let mut members = sub(broker, &queue, group("g")).await;
    let mut all = sub(broker, &fanned, SubscriptionMode::Broadcast).await;
    let a: Vec<Message> =
        (0..4).map(|i| message(&queue, &format!("run-{i}"), &format!("a{i}"), json!({"i": i}))).collect();
    let b: Vec<Message> = (0..2).map(|i| message(&fanned, "run-b", &format!("b{i}"), json!(i))).collect();
    let mixed = vec![a[0].clone(), b[0].clone(), a[1].clone(), a[2].clone(), b[1].clone(), a[3].clone()];
    if let Err(e) = broker.publish_packed(&mixed).await {
        panic!("publish_packed failed: {e}");
    }
    for expected in &b {
        let d = recv(&mut all, o.patience, "a packed broadcast message").await;
        assert_eq!(*d.message, *expected);
        ack(&d).await;
    }
    let mut held = Vec::new();
    for expected in &a {
        let d = recv(&mut members, o.patience, "a packed message").await;
        assert_eq!(*d.message, *expected, "packed messages come one by one, in order, with their keys");
        held.push(d);
    }
    for d in &held {
        if d.message.event.id == "a1" {
            if let Err(e) = d.nack(Duration::ZERO).await {
                panic!("nack failed: {e}");
            }
        } else {
            ack(d).await;
        }
    }
    // a1 comes again; its pack-mates may come along. Everything that comes is acked.
    let mut again = HashSet::new();
    while !again.contains("a1") {
        let d = recv(&mut members, o.patience, "the nacked packed message").await;
        again.insert(d.message.event.id.clone());
        ack(&d).await;
    }
    loop {
        match timeout(o.quiet, members.next()).await {
            Ok(Ok(d)) => {
                assert!(
                    d.redeliveries >= 1 || again.contains(&d.message.event.id),
                    "only redeliveries come after the nack"
                );
                ack(&d).await;
            }
            Ok(Err(e)) => panic!("subscription failed: {e}"),
            Err(_) => break,
        }
    }
    expect_quiet(&mut members, o.quiet, "after every packed message was acked").await;
    expect_quiet(&mut all, o.quiet, "the broadcast after its packed messages").await;
}

async fn sub_with_credit(
    broker: &impl Broker,
    topic: &str,
    mode: SubscriptionMode,
    credit: &Credit,
) -> Box<dyn Subscription> {
    match broker.subscribe_with_credit(topic, mode.clone(), credit.clone()).await {
        Ok(s) => s,
        Err(e) => panic!("subscribe to {topic} ({mode:?}) with credit failed: {e}"),
    }
}

/// A subscription with credit hands out one delivery per unit: none without credit, the rest
/// once more is granted, nothing lost in between. Not part of [`suite`]: Kafka ignores credit.
pub async fn credit_bounds_deliveries(broker: &impl Broker, o: &Options) {
    let topic = unique_topic("credit");
    let credit = Credit::new(1);
    let mut s = sub_with_credit(broker, &topic, group("g"), &credit).await;
    publish(broker, (0..3).map(|i| message(&topic, "k", &format!("c{i}"), json!(i))).collect()).await;
    let first = recv(&mut s, o.patience, "the delivery the credit allows").await;
    expect_quiet(&mut s, o.quiet, "a subscription out of credit").await;
    credit.grant(2);
    let second = recv(&mut s, o.patience, "a delivery after more credit").await;
    let third = recv(&mut s, o.patience, "the last delivery").await;
    let mut ids: Vec<String> = [&first, &second, &third].iter().map(|d| d.message.event.id.clone()).collect();
    ids.sort();
    assert_eq!(ids, ["c0", "c1", "c2"], "each message once, none lost while the credit ran out");
    for d in [&first, &second, &third] {
        ack(d).await;
    }
    credit.grant(1);
    expect_quiet(&mut s, o.quiet, "after all were acked").await;
}

/// A competing member without credit leaves the group's messages to a member with credit. Not
/// part of [`suite`]: a broker whose client fetches ahead by itself (RabbitMQ's prefetch,
/// Kafka's partitions) holds messages at a member whatever its credit.
pub async fn no_credit_leaves_messages_to_others(broker: &impl Broker, o: &Options) {
    let topic = unique_topic("nocredit");
    let (none, some) = (Credit::new(0), Credit::new(100));
    let mut starved = sub_with_credit(broker, &topic, group("g"), &none).await;
    let mut fed = sub_with_credit(broker, &topic, group("g"), &some).await;
    // The member without credit asks all along: it must get nothing.
    let asking = tokio::spawn(async move { starved.next().await.map(|d| d.message.event.id.clone()) });
    let n = 10;
    publish(broker, (0..n).map(|i| message(&topic, &format!("k{i}"), &format!("n{i}"), json!(i))).collect()).await;
    for _ in 0..n {
        let d = recv(&mut fed, o.patience, "the member with credit").await;
        assert_eq!(d.redeliveries, 0, "{} reached the member with credit only after a detour", d.message.event.id);
        ack(&d).await;
    }
    tokio::time::sleep(o.quiet).await;
    assert!(!asking.is_finished(), "the member without credit got {:?}", asking.await);
    asking.abort();
}

/// A dead-lettered delivery is settled for good and kept with its reason: the message behind it
/// still comes, a late nack does not bring it back, nor does its subscription's drop hand it to
/// another member of the group; and the broker's dead-letter place holds it with the reason.
/// `reason_of(topic, event id)` reads that place, giving the reason kept with that message (or
/// `None`, after waiting as long as the backend needs). Not part of [`suite`], because only the
/// test of a backend knows where its dead letters are.
pub async fn dead_letter_keeps_the_reason(
    broker: &impl Broker,
    o: &Options,
    reason_of: impl AsyncFn(&str, &str) -> Option<String>,
) {
    let topic = unique_topic("dead");
    let mut doomed = sub(broker, &topic, group("g")).await;
    let sent = vec![message(&topic, "k", "unusable", json!({"bad": true})), message(&topic, "k", "usable", json!(1))];
    publish(broker, sent).await;
    let d = recv(&mut doomed, o.patience, "the unusable message").await;
    assert_eq!(d.message.event.id, "unusable");
    let reason = "conformance: the payload is unusable";
    if let Err(e) = d.dead_letter(reason).await {
        panic!("dead_letter failed: {e}");
    }
    // A settle after the dead letter changes nothing.
    let _ = d.nack(Duration::ZERO).await;
    let next = recv(&mut doomed, o.patience, "the message behind the dead-lettered one").await;
    assert_eq!(next.message.event.id, "usable", "the dead-lettered message came again");
    ack(&next).await;

    // Dropping a subscription hands what it holds unsettled to the group at once (see
    // `dropped_consumer_is_redelivered`): a dead letter is not among it.
    let mut survivor = sub(broker, &topic, group("g")).await;
    drop(d);
    drop(doomed);
    publish(broker, vec![message(&topic, "k", "after", json!(2))]).await;
    let d = recv(&mut survivor, o.patience, "the survivor").await;
    assert_eq!(d.message.event.id, "after", "the group got a message again");
    ack(&d).await;
    expect_quiet(&mut survivor, o.quiet, "the survivor after the last message").await;

    let kept = reason_of(&topic, "unusable").await;
    assert_eq!(kept.as_deref(), Some(reason), "the dead-letter place keeps the message with its reason");
}
