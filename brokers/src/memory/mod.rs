//! The in-memory broker: topics, broadcast subscribers and competing groups in one process.
//!
//! Used by `capstan dev`, by the engine's and runtime's tests, and as the reference the
//! conformance suite was written against. Semantics beyond the crate's contract:
//! - A competing group is created by its first `subscribe` and then lives as long as the broker:
//!   messages published while it has no member are kept for it and delivered to the next member
//!   (like a durable JetStream consumer or a Kafka consumer group). Before the first subscribe
//!   there is no group, and a message with no subscriber at all is dropped.
//! - A broadcast subscription is a private group with one member, removed when the subscription
//!   is dropped: no replay of earlier messages, but nack and the ack deadline work as for groups.
//! - An ack settles the message even when it comes from a delivery that already expired and was
//!   handed to another member (it saves a duplicate); a nack from such a superseded delivery is
//!   ignored, so it cannot disturb the new holder.
//! - Nothing is kept on disk and memory grows with what subscribers leave unsettled; `publish`
//!   bounds each message (`max_payload`, measured on the encoded CloudEvent).
//! - Messages never need decoding here, so only consumers dead-letter: the dead letters are kept
//!   in memory, the newest `dead_letter_limit` of them, for [`MemoryBroker::dead_letters`].

mod group;
#[cfg(test)]
mod tests;

use foldhash::HashMap;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::{Acker, Broker, Delivery, Error, Message, Result, Subscription, SubscriptionMode};
use group::{Group, MemberId, Take};

/// Settings of a [`MemoryBroker`].
#[derive(Debug, Clone)]
pub struct MemoryConfig {
    /// How long a delivery may stay unsettled before it is redelivered (like JetStream's
    /// `ack_wait`).
    pub ack_deadline: Duration,
    /// The largest encoded CloudEvent `publish` accepts, in bytes.
    pub max_payload: usize,
    /// How many dead letters are kept; beyond it the oldest are forgotten (with a warning), so a
    /// stream of bad messages cannot exhaust memory.
    pub dead_letter_limit: usize,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig { ack_deadline: Duration::from_secs(30), max_payload: 1024 * 1024, dead_letter_limit: 1000 }
    }
}

/// A message a consumer dead-lettered, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// The message as it was delivered.
    pub message: Message,
    /// The reason the consumer gave.
    pub reason: String,
}

/// The in-memory [`Broker`]; clones share the same topics.
#[derive(Clone, Default)]
pub struct MemoryBroker {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBroker")
            .field("config", &self.inner.config)
            .field("closed", &self.inner.closed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Inner {
    config: MemoryConfig,
    closed: AtomicBool,
    next_private: AtomicU64,
    topics: RwLock<HashMap<String, Arc<Topic>>>,
    /// The newest dead letters, oldest first.
    dead: Mutex<VecDeque<DeadLetter>>,
}

impl Inner {
    fn dead(&self) -> std::sync::MutexGuard<'_, VecDeque<DeadLetter>> {
        // Changed by single pushes and pops only, so a poisoned lock is still consistent.
        self.dead.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Keeps a dead letter, forgetting the oldest beyond the limit.
    fn keep_dead(&self, letter: DeadLetter) {
        tracing::warn!(topic = %letter.message.topic, id = %letter.message.event.id, reason = %letter.reason,
            "message moved to dead letters");
        let mut dead = self.dead();
        dead.push_back(letter);
        while dead.len() > self.config.dead_letter_limit {
            if let Some(old) = dead.pop_front() {
                tracing::warn!(id = %old.message.event.id, "dead letter forgotten: over the limit");
            }
        }
    }
}

/// The groups of one topic.
#[derive(Default)]
struct Topic {
    groups: Mutex<TopicGroups>,
}

#[derive(Default)]
struct TopicGroups {
    named: HashMap<String, Arc<Group>>,
    /// One private group per live broadcast subscription.
    private: HashMap<u64, Arc<Group>>,
}

impl Topic {
    fn groups(&self) -> std::sync::MutexGuard<'_, TopicGroups> {
        // The guarded maps are changed by single infallible inserts/removes, so a poisoned
        // lock still holds a consistent state.
        self.groups.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn all(&self) -> Vec<Arc<Group>> {
        let g = self.groups();
        g.named.values().chain(g.private.values()).cloned().collect()
    }
}

impl MemoryBroker {
    /// A broker with the default settings (30 s ack deadline, 1 MiB messages).
    pub fn new() -> Self {
        Self::default()
    }

    /// A broker with the given settings.
    pub fn with_config(config: MemoryConfig) -> Self {
        MemoryBroker { inner: Arc::new(Inner { config, ..Inner::default() }) }
    }

    /// The settings in force.
    pub fn config(&self) -> &MemoryConfig {
        &self.inner.config
    }

    /// Shuts the broker down: publishing fails and every subscription returns [`Error::Closed`].
    pub fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        let topics: Vec<Arc<Topic>> = self.read_topics().values().cloned().collect();
        for topic in topics {
            for group in topic.all() {
                group.notify().notify_waiters();
            }
        }
    }

    /// Whether [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire)
    }

    /// The dead letters kept (the newest [`MemoryConfig::dead_letter_limit`]), oldest first.
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        self.inner.dead().iter().cloned().collect()
    }

    /// Unsettled messages of a competing group, or `None` if the group does not exist.
    pub fn backlog(&self, topic: &str, group: &str) -> Option<usize> {
        let topic = self.read_topics().get(topic).cloned()?;
        let group = topic.groups().named.get(group).cloned()?;
        Some(group.backlog())
    }

    /// Live members of a competing group (0 if it does not exist).
    pub fn members(&self, topic: &str, group: &str) -> usize {
        let Some(topic) = self.read_topics().get(topic).cloned() else {
            return 0;
        };
        let group = topic.groups().named.get(group).cloned();
        group.map_or(0, |g| g.members())
    }

    fn read_topics(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<Topic>>> {
        // Only single inserts happen under the write lock, so poisoning leaves it consistent.
        self.inner.topics.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn topic(&self, name: &str) -> Arc<Topic> {
        if let Some(t) = self.read_topics().get(name) {
            return Arc::clone(t);
        }
        let mut topics = self.inner.topics.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        Arc::clone(topics.entry(name.to_string()).or_default())
    }

    fn check_size(&self, message: &Message) -> Result<()> {
        let limit = self.inner.config.max_payload;
        // Almost every message is far below the limit: a bound from the lengths alone settles it
        // without writing the JSON (which was ~9 % of the embedded engine's CPU).
        if size_bound(&message.event) <= limit {
            return Ok(());
        }
        let size = encoded_size(message);
        if size > limit {
            return Err(Error::TooLarge { size, limit });
        }
        Ok(())
    }
}

/// At least the size of the structured-mode JSON encoding: every attribute counted as if each
/// byte needed a six-byte escape; the data exactly.
fn size_bound(event: &capstan_proto::CloudEvent) -> usize {
    fn text(s: &str) -> usize {
        2 + 6 * s.len()
    }
    let member = |name: &str, value: usize| text(name) + 1 + value + 1;
    let mut n = 2 + member("specversion", text(capstan_proto::SPEC_VERSION));
    n += member("id", text(&event.id)) + member("source", text(&event.source)) + member("type", text(&event.ty));
    for (name, value) in event.optional_attributes() {
        n += value.as_deref().map_or(0, |v| member(name, text(v)));
    }
    // The data is written as the text it holds.
    n += event.data.as_ref().map_or(0, |d| member("data", d.as_str().len()));
    n + event.extensions.iter().map(|(k, v)| member(k, text(v))).sum::<usize>()
}

/// The size of the structured-mode JSON encoding, counted without keeping the bytes.
fn encoded_size(message: &Message) -> usize {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    // Writing a JSON value into a counter cannot fail; if it somehow did, the count so far is
    // still a lower bound and the broker stays usable.
    let _ = serde_json::to_writer(&mut counter, &message.event);
    counter.0
}

#[async_trait]
impl Broker for MemoryBroker {
    async fn publish(&self, messages: Vec<Message>) -> Result<()> {
        if self.is_closed() {
            return Err(Error::Closed);
        }
        // All or nothing: check every size before anything becomes visible.
        for message in &messages {
            self.check_size(message)?;
        }
        let mut batch: Vec<Arc<Message>> = Vec::with_capacity(messages.len());
        let mut iter = messages.into_iter().map(Arc::new).peekable();
        // Consecutive messages to one topic go to each group in one step, under one lock.
        while let Some(first) = iter.next() {
            batch.clear();
            let topic_name = first.topic.clone();
            batch.push(first);
            while let Some(next) = iter.next_if(|m| m.topic == topic_name) {
                batch.push(next);
            }
            let topic = self.read_topics().get(&topic_name).cloned();
            let Some(topic) = topic else {
                tracing::trace!(topic = %topic_name, n = batch.len(), "no subscriber; dropped");
                continue;
            };
            for group in topic.all() {
                group.push(&batch);
            }
        }
        Ok(())
    }

    async fn subscribe(&self, topic: &str, mode: SubscriptionMode) -> Result<Box<dyn Subscription>> {
        if self.is_closed() {
            return Err(Error::Closed);
        }
        if topic.is_empty() {
            return Err(Error::Invalid("empty topic name".into()));
        }
        let t = self.topic(topic);
        let ack_deadline = self.inner.config.ack_deadline;
        let (group, private) = match &mode {
            SubscriptionMode::Broadcast => {
                let id = self.inner.next_private.fetch_add(1, Ordering::Relaxed);
                let group = Arc::new(Group::new(ack_deadline));
                t.groups().private.insert(id, Arc::clone(&group));
                (group, Some(id))
            }
            SubscriptionMode::Competing { group } => {
                if group.is_empty() {
                    return Err(Error::Invalid("empty group name".into()));
                }
                let g = Arc::clone(
                    t.groups().named.entry(group.clone()).or_insert_with(|| Arc::new(Group::new(ack_deadline))),
                );
                (g, None)
            }
        };
        let member = group.join();
        tracing::debug!(topic, ?mode, "subscribed");
        Ok(Box::new(MemorySubscription { inner: Arc::clone(&self.inner), topic: t, group, member, private }))
    }
}

/// One member of a group.
struct MemorySubscription {
    inner: Arc<Inner>,
    topic: Arc<Topic>,
    group: Arc<Group>,
    member: MemberId,
    /// The private group's id for a broadcast subscription.
    private: Option<u64>,
}

#[async_trait]
impl Subscription for MemorySubscription {
    async fn next(&mut self) -> Result<Delivery> {
        loop {
            // Register for wake-ups before looking, so a push between the look and the wait
            // cannot be missed.
            let notified = self.group.notify().notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.inner.closed.load(Ordering::Acquire) {
                return Err(Error::Closed);
            }
            match self.group.take(self.member, Instant::now()) {
                Take::Message { message, seq, delivery, redeliveries } => {
                    let acker = MemoryAcker {
                        inner: Arc::clone(&self.inner),
                        group: Arc::clone(&self.group),
                        message: Arc::clone(&message),
                        seq,
                        delivery,
                    };
                    return Ok(Delivery { message, redeliveries, acker: Box::new(acker) });
                }
                Take::Wait(Some(due)) => {
                    tokio::select! {
                        _ = &mut notified => {}
                        _ = tokio::time::sleep_until(due) => {}
                    }
                }
                Take::Wait(None) => notified.await,
            }
        }
    }
}

impl Drop for MemorySubscription {
    fn drop(&mut self) {
        self.group.leave(self.member);
        if let Some(id) = self.private {
            self.topic.groups().private.remove(&id);
        }
    }
}

/// Settles one hand-out of a group's message.
struct MemoryAcker {
    inner: Arc<Inner>,
    group: Arc<Group>,
    /// What a dead letter keeps.
    message: Arc<Message>,
    seq: u64,
    delivery: u64,
}

#[async_trait]
impl Acker for MemoryAcker {
    async fn ack(&self) -> Result<()> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        self.group.ack(self.seq);
        Ok(())
    }

    async fn dead_letter(&self, reason: &str) -> Result<()> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        // Settled and kept in one step: only a message still unsettled becomes a dead letter.
        if self.group.ack(self.seq) {
            let message = Message::clone(&self.message);
            self.inner.keep_dead(DeadLetter { message, reason: reason.to_string() });
        }
        Ok(())
    }

    async fn nack(&self, delay: Duration) -> Result<()> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        self.group.nack(self.seq, self.delivery, delay, Instant::now());
        Ok(())
    }
}
