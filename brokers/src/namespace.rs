//! A namespace over any broker: every topic gets a prefix, so deployments (or test runs) that
//! share one broker never see each other's messages, whatever the backend's own naming allows.

use async_trait::async_trait;

use crate::{Broker, Credit, Delivery, Message, Result, Subscription, SubscriptionMode};

/// Prefixes every topic with `<namespace>.` on the way in and strips it on the way out.
pub struct Namespaced<B> {
    inner: B,
    prefix: String,
}

impl<B: Broker> Namespaced<B> {
    /// Wraps `inner`; `namespace` must itself be a valid topic segment.
    pub fn new(inner: B, namespace: &str) -> Self {
        Namespaced { inner, prefix: format!("{namespace}.") }
    }

    fn prefixed(&self, messages: Vec<Message>) -> Vec<Message> {
        messages.into_iter().map(|m| Message { topic: format!("{}{}", self.prefix, m.topic), ..m }).collect()
    }
}

#[async_trait]
impl<B: Broker> Broker for Namespaced<B> {
    async fn publish(&self, messages: Vec<Message>) -> Result<()> {
        self.inner.publish(self.prefixed(messages)).await
    }

    fn packs(&self) -> bool {
        self.inner.packs()
    }

    async fn publish_packed(&self, messages: &[Message]) -> Result<()> {
        self.inner.publish_packed(&self.prefixed(messages.to_vec())).await
    }

    async fn subscribe(&self, topic: &str, mode: SubscriptionMode) -> Result<Box<dyn Subscription>> {
        let inner = self.inner.subscribe(&format!("{}{topic}", self.prefix), mode).await?;
        Ok(Box::new(Stripped { inner, prefix: self.prefix.clone() }))
    }

    async fn subscribe_with_credit(
        &self,
        topic: &str,
        mode: SubscriptionMode,
        credit: Credit,
    ) -> Result<Box<dyn Subscription>> {
        let inner = self.inner.subscribe_with_credit(&format!("{}{topic}", self.prefix), mode, credit).await?;
        Ok(Box::new(Stripped { inner, prefix: self.prefix.clone() }))
    }
}

struct Stripped {
    inner: Box<dyn Subscription>,
    prefix: String,
}

#[async_trait]
impl Subscription for Stripped {
    async fn next(&mut self) -> Result<Delivery> {
        let mut d = self.inner.next().await?;
        if let Some(rest) = d.message.topic.strip_prefix(&self.prefix) {
            // A copy of the message only when the broker still holds it too.
            std::sync::Arc::make_mut(&mut d.message).topic = rest.to_string();
        }
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryBroker;
    use crate::testing;

    #[tokio::test]
    async fn namespaces_do_not_see_each_other() {
        let shared = MemoryBroker::new();
        let a = Namespaced::new(shared.clone(), "a");
        let b = Namespaced::new(shared.clone(), "b");
        let mut sub_a = a.subscribe("t", SubscriptionMode::Broadcast).await.unwrap();
        let mut sub_b = b.subscribe("t", SubscriptionMode::Broadcast).await.unwrap();
        b.publish(vec![testing::message("t", "k", "1", serde_json::json!({}))]).await.unwrap();
        let got = sub_b.next().await.unwrap();
        assert_eq!(got.message.topic, "t", "the prefix is stripped on delivery");
        let quiet = tokio::time::timeout(std::time::Duration::from_millis(50), sub_a.next()).await;
        assert!(quiet.is_err(), "namespace a saw a message of namespace b");
    }

    #[tokio::test]
    async fn dead_letters_pass_through() {
        let shared = MemoryBroker::new();
        let ns = Namespaced::new(shared.clone(), "ns");
        let mut sub = ns.subscribe("t", SubscriptionMode::Competing { group: "g".into() }).await.unwrap();
        ns.publish(vec![testing::message("t", "k", "bad", serde_json::json!({}))]).await.unwrap();
        let d = sub.next().await.unwrap();
        d.dead_letter("unusable").await.unwrap();
        let dead = shared.dead_letters();
        let kept: Vec<(&str, &str, &str)> =
            dead.iter().map(|d| (d.message.topic.as_str(), d.message.event.id.as_str(), d.reason.as_str())).collect();
        assert_eq!(kept, [("ns.t", "bad", "unusable")], "kept by the broker underneath, under its own topic");
        assert_eq!(shared.backlog("ns.t", "g"), Some(0), "and settled");
    }
}
