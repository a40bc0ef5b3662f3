//! The conformance suite and the in-memory broker's own semantics (ack deadline, close,
//! group lifetime, dead letters).

use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;

use super::{MemoryBroker, MemoryConfig};
use crate::testing::{Options, expect_quiet, message, recv};
use crate::{Broker, Error, SubscriptionMode};

mod conformance {
    use super::*;

    crate::conformance_tests! {
        #[tokio::test(start_paused = true)]
        make = || async { MemoryBroker::new() },
        options = Options::default(),
    }
}

#[tokio::test(start_paused = true)]
async fn credit_bounds_deliveries() {
    crate::testing::credit_bounds_deliveries(&MemoryBroker::new(), &Options::default()).await;
}

fn group(name: &str) -> SubscriptionMode {
    SubscriptionMode::Competing { group: name.into() }
}

const PATIENCE: Duration = Duration::from_secs(120);

#[tokio::test(start_paused = true)]
async fn no_credit_leaves_messages_to_others() {
    crate::testing::no_credit_leaves_messages_to_others(&MemoryBroker::new(), &Options::default()).await;
}

#[tokio::test(start_paused = true)]
async fn whole_suite_runs_through_one_call() {
    crate::testing::suite(|| async { MemoryBroker::new() }, Options::default()).await;
}

/// The dead letters of `broker`: the reason kept with event `id` of `topic`.
fn reason_of(broker: &MemoryBroker, topic: &str, id: &str) -> Option<String> {
    let letters = broker.dead_letters();
    letters.into_iter().find(|d| d.message.topic == topic && d.message.event.id == id).map(|d| d.reason)
}

#[tokio::test(start_paused = true)]
async fn conformance_dead_letter_keeps_the_reason() {
    let broker = MemoryBroker::new();
    let read = async |topic: &str, id: &str| reason_of(&broker, topic, id);
    crate::testing::dead_letter_keeps_the_reason(&broker, &Options::default(), read).await;
}

#[tokio::test(start_paused = true)]
async fn dead_letters_are_kept_once_and_bounded() -> anyhow::Result<()> {
    let broker = MemoryBroker::with_config(MemoryConfig { dead_letter_limit: 2, ..MemoryConfig::default() });
    let mut s = broker.subscribe("t", group("g")).await?;
    broker.publish((0..3).map(|i| message("t", "k", &format!("d{i}"), json!(i))).collect()).await?;
    for i in 0..3 {
        let d = recv(&mut s, PATIENCE, "a message to dead-letter").await;
        d.dead_letter(&format!("reason {i}")).await?;
        // A second settle of a dead-lettered delivery keeps nothing more.
        d.dead_letter("again").await?;
    }
    let kept: Vec<(String, String)> =
        broker.dead_letters().into_iter().map(|d| (d.message.event.id, d.reason)).collect();
    let expected = [("d1", "reason 1"), ("d2", "reason 2")].map(|(id, r)| (id.to_string(), r.to_string()));
    assert_eq!(kept, expected, "the newest two, oldest first");
    assert_eq!(broker.backlog("t", "g"), Some(0), "dead letters are settled");

    broker.publish(vec![message("t", "k", "late", json!(null))]).await?;
    let d = recv(&mut s, PATIENCE, "a message held over close").await;
    broker.close();
    assert!(matches!(d.dead_letter("closed").await, Err(Error::Closed)));
    assert_eq!(reason_of(&broker, "t", "late"), None, "a failed dead letter keeps nothing");
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn unacked_delivery_comes_back_after_the_ack_deadline() -> anyhow::Result<()> {
    let deadline = Duration::from_secs(5);
    let broker = MemoryBroker::with_config(MemoryConfig { ack_deadline: deadline, ..MemoryConfig::default() });
    let mut s = broker.subscribe("t", group("g")).await?;
    broker.publish(vec![message("t", "k", "slow", json!(null))]).await?;
    let first = recv(&mut s, PATIENCE, "first").await;
    let at = Instant::now();
    let again = recv(&mut s, PATIENCE, "after the deadline").await;
    assert_eq!(at.elapsed(), deadline);
    assert_eq!((again.message.event.id.as_str(), again.redeliveries), ("slow", 1));
    // The first holder's late ack settles the message for everyone.
    first.ack().await?;
    expect_quiet(&mut s, Duration::from_secs(60), "settled by the late ack").await;
    assert_eq!(broker.backlog("t", "g"), Some(0));
    Ok(())
}

/// A delivery hands out the message the broker holds, not a copy of it: a redelivery and every
/// broadcast subscriber see the very same allocation (a deep copy per delivery was ~5 % of the
/// embedded engine's CPU).
#[tokio::test(start_paused = true)]
async fn deliveries_share_the_published_message() -> anyhow::Result<()> {
    let broker = MemoryBroker::new();
    let mut a = broker.subscribe("t", SubscriptionMode::Broadcast).await?;
    let mut b = broker.subscribe("t", SubscriptionMode::Broadcast).await?;
    let mut g = broker.subscribe("t", group("g")).await?;
    broker.publish(vec![message("t", "k", "m", json!({"big": [1, 2, 3]}))]).await?;
    let (da, db) = (recv(&mut a, PATIENCE, "a").await, recv(&mut b, PATIENCE, "b").await);
    assert!(std::sync::Arc::ptr_eq(&da.message, &db.message), "broadcast subscribers got copies");
    let first = recv(&mut g, PATIENCE, "first").await;
    first.nack(Duration::ZERO).await?;
    let again = recv(&mut g, PATIENCE, "again").await;
    assert_eq!(again.redeliveries, 1);
    assert!(std::sync::Arc::ptr_eq(&first.message, &again.message), "the redelivery is a copy");
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_group_keeps_messages_while_it_has_no_member() -> anyhow::Result<()> {
    let broker = MemoryBroker::new();
    // No group yet: nobody keeps the message.
    broker.publish(vec![message("t", "k", "lost", json!(null))]).await?;
    let s = broker.subscribe("t", group("g")).await?;
    drop(s);
    assert_eq!(broker.members("t", "g"), 0);
    broker.publish(vec![message("t", "k", "kept", json!(null))]).await?;
    assert_eq!(broker.backlog("t", "g"), Some(1));
    let mut s = broker.subscribe("t", group("g")).await?;
    let d = recv(&mut s, PATIENCE, "kept for the group").await;
    assert_eq!(d.message.event.id, "kept");
    d.ack().await?;
    assert_eq!(broker.backlog("t", "g"), Some(0));
    assert_eq!(broker.backlog("t", "nope"), None);
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_dropped_broadcast_subscription_keeps_nothing() -> anyhow::Result<()> {
    let broker = MemoryBroker::new();
    let s = broker.subscribe("t", SubscriptionMode::Broadcast).await?;
    drop(s);
    broker.publish(vec![message("t", "k", "x", json!(null))]).await?;
    let topic = broker.read_topics().get("t").cloned().expect("topic exists");
    assert!(topic.all().is_empty(), "the private group left with its subscription");
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn close_ends_waiting_subscriptions_and_refuses_publishing() -> anyhow::Result<()> {
    let broker = MemoryBroker::new();
    let mut s = broker.subscribe("t", SubscriptionMode::Broadcast).await?;
    let waiting = tokio::spawn(async move { s.next().await.map(|d| d.message.event.id.clone()) });
    tokio::task::yield_now().await;
    broker.close();
    assert!(broker.is_closed());
    assert!(matches!(waiting.await?, Err(Error::Closed)));
    assert!(matches!(broker.publish(vec![message("t", "k", "x", json!(null))]).await, Err(Error::Closed)));
    assert!(matches!(broker.subscribe("t", group("g")).await, Err(Error::Closed)));
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn bad_names_and_oversized_batches_are_refused_whole() -> anyhow::Result<()> {
    let broker = MemoryBroker::with_config(MemoryConfig { max_payload: 1000, ..MemoryConfig::default() });
    assert!(matches!(broker.subscribe("", SubscriptionMode::Broadcast).await, Err(Error::Invalid(_))));
    assert!(matches!(broker.subscribe("t", group("")).await, Err(Error::Invalid(_))));
    let mut s = broker.subscribe("t", group("g")).await?;
    let batch = vec![message("t", "k", "small", json!(1)), message("t", "k", "big", json!("z".repeat(1000)))];
    let err = broker.publish(batch).await.expect_err("the batch holds an oversized message");
    assert!(matches!(err, Error::TooLarge { limit: 1000, .. }), "{err}");
    expect_quiet(&mut s, Duration::from_secs(1), "nothing of a refused batch").await;
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn clones_share_topics() -> anyhow::Result<()> {
    let broker = MemoryBroker::new();
    let clone = broker.clone();
    let mut s = clone.subscribe("t", SubscriptionMode::Broadcast).await?;
    broker.publish(vec![message("t", "k", "shared", json!(null))]).await?;
    assert_eq!(recv(&mut s, PATIENCE, "via the clone").await.message.event.id, "shared");
    Ok(())
}

/// The quick size bound never undercounts, so a message it lets through really fits: escapes,
/// extreme numbers, nesting, extensions and every optional attribute.
#[test]
fn the_size_bound_never_undercounts() {
    let datas = [
        json!(null),
        json!(-1.797_693_134_862_315_7e308),
        json!(i64::MIN),
        json!(u64::MAX),
        json!("\u{1}\u{2}\"\\\n ü 𝄞"),
        json!({"a": [1, {"b": [true, false, null, "\u{7f}"]}], "": ""}),
        json!([[], {}, [[]], ""]),
    ];
    for data in datas {
        let mut m = message("t", "k", "id\u{0}", data);
        m.event.subject = Some("s\t".into());
        m.event.time = Some("2026-11-27T10:00:00Z".into());
        m.event.datacontenttype = Some("application/json".into());
        m.event.dataschema = Some("x".into());
        m.event.data_base64 = Some("AAEC".into());
        m.event.extensions.insert("capstan\u{1}".into(), "\u{0}".into());
        let (bound, exact) = (super::size_bound(&m.event), super::encoded_size(&m));
        assert!(bound >= exact, "bound {bound} < encoded {exact} for {:?}", m.event.data);
    }
}

/// A message whose quick bound passes the limit but whose encoding fits is measured exactly
/// and accepted.
#[tokio::test(start_paused = true)]
async fn a_message_over_the_quick_bound_is_measured_exactly() -> anyhow::Result<()> {
    let broker = MemoryBroker::with_config(MemoryConfig { max_payload: 1000, ..MemoryConfig::default() });
    let mut s = broker.subscribe("t", group("g")).await?;
    let m = message("t", "k", "fits", json!("a".repeat(400)));
    assert!(super::size_bound(&m.event) > 1000 && super::encoded_size(&m) < 1000);
    broker.publish(vec![m]).await?;
    assert_eq!(recv(&mut s, PATIENCE, "the message that fits").await.message.event.id, "fits");
    Ok(())
}
