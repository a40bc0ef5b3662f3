//! The broker-restart case of the conformance suite, and the start it shares with the
//! backends' own restart tests.

use std::collections::HashSet;
use std::future::Future;
use std::time::Duration;

use serde_json::json;
use tokio::time::{Instant, timeout};

use super::{Options, ack, group, message, publish, recv, sub, unique_topic};
use crate::{Broker, Message, Subscription, SubscriptionMode};

/// The start of a broker-restart test: a fresh topic, a member of group `g` and a broadcast
/// subscriber, each having read and acked `n` messages (`before-<i>`).
pub async fn worker_and_watcher(
    broker: &impl Broker,
    case: &str,
    n: usize,
    patience: Duration,
) -> (String, Box<dyn Subscription>, Box<dyn Subscription>) {
    let topic = unique_topic(case);
    let mut member = sub(broker, &topic, group("g")).await;
    let mut watcher = sub(broker, &topic, SubscriptionMode::Broadcast).await;
    publish(broker, (0..n).map(|i| message(&topic, &format!("k{i}"), &format!("before-{i}"), json!(i))).collect())
        .await;
    for (name, s) in [("member", &mut member), ("broadcast", &mut watcher)] {
        for _ in 0..n {
            let d = recv(s, patience, &format!("{name} before the restart")).await;
            assert!(d.message.event.id.starts_with("before-"), "{name} got {}", d.message.event.id);
            ack(&d).await;
        }
    }
    (topic, member, watcher)
}

/// The broker restarts mid-stream while a publisher, a competing member and a broadcast
/// subscriber stay alive: they reconnect and carry on, and nothing is lost. `restart` stops the
/// broker and starts it again (keeping its storage, as a production broker does); it is not part
/// of [`suite`] because only the test of a backend knows how to restart its broker.
///
/// Before the restart, `before-*` messages are delivered and acked, and `pending-*` ones are
/// published for the member to receive after it. After the restart, `after-*` messages are
/// published (retried until the broker takes them, within `patience`). The member must then get
/// every `pending-*` and `after-*` message, the broadcast subscriber every one of both too.
/// Duplicates are allowed (delivery is at-least-once; consumers deduplicate by event id), losses
/// are not.
pub async fn broker_restart(broker: &impl Broker, o: &Options, restart: impl Future<Output = ()>) {
    let (topic, mut member, mut watcher) = worker_and_watcher(broker, "restart", 3, o.patience).await;
    let batch = |name: &str| -> Vec<Message> {
        (0..3).map(|i| message(&topic, &format!("k{i}"), &format!("{name}-{i}"), json!(i))).collect()
    };
    publish(broker, batch("pending")).await;

    restart.await;

    let after = batch("after");
    let deadline = Instant::now() + o.patience;
    while let Err(e) = broker.publish(after.clone()).await {
        assert!(Instant::now() < deadline, "publish after the restart still fails: {e}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let expected: HashSet<String> = batch("pending").into_iter().chain(after).map(|m| m.event.id).collect();
    for (name, s) in [("member", &mut member), ("broadcast", &mut watcher)] {
        let mut missing = expected.clone();
        while !missing.is_empty() {
            let d = match timeout(o.patience, s.next()).await {
                Ok(Ok(d)) => d,
                Ok(Err(e)) => panic!("{name} failed after the restart: {e}"),
                Err(_) => panic!("{name} lost {missing:?} in the restart"),
            };
            let id = d.message.event.id.clone();
            assert!(
                missing.remove(&id) || expected.contains(&id) || id.starts_with("before-"),
                "{name} got {id}, which was never published"
            );
            ack(&d).await;
        }
    }
}
