//! The broker is a doorbell, not the truth: it carries CloudEvents between the engine and the
//! workers. One [`Broker`] trait, implemented in memory (always) and for NATS JetStream, Kafka and
//! RabbitMQ (features). [`testing::suite`] is the one conformance suite all of them pass.
//!
//! Semantics every implementation keeps:
//! - `publish` returns only once the broker confirmed every message (at-least-once).
//! - `Broadcast` subscriptions each get every message published after they subscribed.
//! - `Competing { group }` subscriptions share the messages of a topic: each message goes to one
//!   member; a message not acked is redelivered (after `nack`'s delay, after the ack deadline, or
//!   when its holder's subscription is dropped) to some member of the group.
//! - Messages with the same key are delivered in publish order to a competing group with one
//!   member (per-key order), redeliveries aside.
//! - A subscription made with [`Broker::subscribe_with_credit`] hands out no more deliveries
//!   than its [`Credit`] allows (except over Kafka, which ignores the credit).
//! - Messages published with [`Broker::publish_packed`] may travel in packs, whose deliveries
//!   are settled together (NATS packs; the others publish each message alone).
//! - No message vanishes silently: one that cannot be decoded, and one its consumer cannot use
//!   (`dead_letter`), is moved to the broker's dead-letter place with the reason, and only then
//!   settled.

use std::time::Duration;

use async_trait::async_trait;
use capstan_proto::CloudEvent;

#[cfg(feature = "amqp")]
pub mod amqp;
pub mod binding;
pub mod credit;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod memory;
pub mod namespace;
#[cfg(feature = "nats")]
pub mod nats;
pub mod pack;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use credit::Credit;
pub use memory::{DeadLetter, MemoryBroker, MemoryConfig};

/// A message: a CloudEvent on a topic, with a partition / ordering key (the run id).
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// Where it goes (see `capstan_proto::topics`).
    pub topic: String,
    /// The ordering / partition key: the run id.
    pub key: String,
    /// The CloudEvent carried; its id is what consumers deduplicate by.
    pub event: CloudEvent,
}

/// How a subscription shares a topic.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SubscriptionMode {
    /// Every broadcast subscriber gets every message.
    Broadcast,
    /// Members of the same group compete: each message goes to one of them.
    Competing {
        /// The group name; the group is per topic.
        group: String,
    },
}

/// What went wrong; each variant tells the caller what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The message is larger than the broker accepts: do not retry.
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The encoded size of the message.
        size: usize,
        /// The largest size accepted.
        limit: usize,
    },
    /// The broker is unreachable or refused: retry later.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The broker (or subscription) was closed.
    #[error("broker closed")]
    Closed,
    /// Bad input (topic name, configuration); retrying will not help.
    #[error("invalid: {0}")]
    Invalid(String),
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Publishing and subscribing.
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Publishes messages and waits until the broker confirmed all of them.
    async fn publish(&self, messages: Vec<Message>) -> Result<()>;
    /// Subscribes to a topic. The subscription exists once this returns.
    async fn subscribe(&self, topic: &str, mode: SubscriptionMode) -> Result<Box<dyn Subscription>>;

    /// Subscribes with flow control (see [`credit`]): the subscription hands out one delivery
    /// per unit of `credit`, and a broker that fetches ahead of `next` fetches only against it,
    /// so that a competing member without credit leaves the group's messages to the others.
    /// The default waits for a unit before each `next` of a plain subscription; a broker whose
    /// client fetches ahead by itself overrides it. Kafka ignores the credit (its partitions
    /// go to one member each, so there is no other member to leave them to).
    async fn subscribe_with_credit(
        &self,
        topic: &str,
        mode: SubscriptionMode,
        credit: Credit,
    ) -> Result<Box<dyn Subscription>> {
        let inner = self.subscribe(topic, mode).await?;
        Ok(Box::new(credit::Gated::new(inner, credit)))
    }

    /// Whether [`Broker::publish_packed`] packs messages, so that a publisher gains by
    /// gathering its messages into fewer calls.
    fn packs(&self) -> bool {
        false
    }

    /// Publishes like [`Broker::publish`], except that the messages of one topic may travel
    /// together as one broker message (a pack: a CloudEvents JSON batch), which costs the broker
    /// one message where it would cost many. A subscriber still gets each message as a delivery
    /// of its own, in order. The deliveries of a pack are settled together: the pack is acked
    /// once every one of them is acked or dead-lettered, and one nacked (or dropped unsettled)
    /// brings the whole pack back, so deliveries already handled come again (consumers
    /// deduplicate by event id, as for any redelivery). Only for topics where whoever gets one
    /// message may as well get the next: broadcast topics and groups that take everything (the
    /// engine's inputs). Never for a queue whose members share the work by their free slots: a
    /// pack goes to one member whole, and credit counts broker messages, not what they carry.
    /// The messages are lent, so that a publisher can send again, alone, those of a refused
    /// call. The default publishes a copy of each message alone.
    async fn publish_packed(&self, messages: &[Message]) -> Result<()> {
        self.publish(messages.to_vec()).await
    }

    /// Publishes like [`Broker::publish`], from lent messages, so that a publisher can send them
    /// again after a refusal without keeping a copy of each. The default publishes a copy.
    async fn publish_lent(&self, messages: &[Message]) -> Result<()> {
        self.publish(messages.to_vec()).await
    }

    /// Deletes what this broker keeps on the server for its namespace, with every message in
    /// it: NATS its stream and dead-letter stream, RabbitMQ its exchanges, its dead-letter queue
    /// and the group queues this process declared. For a namespace that is done with (a bench
    /// run's); drop its subscriptions first. The default (in-memory, Kafka) deletes nothing.
    async fn remove_namespace(&self) -> Result<()> {
        Ok(())
    }
}

/// A shared broker is a broker, so wrappers (e.g. [`namespace::Namespaced`]) take either.
#[async_trait]
impl<B: Broker + ?Sized> Broker for std::sync::Arc<B> {
    async fn publish(&self, messages: Vec<Message>) -> Result<()> {
        (**self).publish(messages).await
    }

    async fn subscribe(&self, topic: &str, mode: SubscriptionMode) -> Result<Box<dyn Subscription>> {
        (**self).subscribe(topic, mode).await
    }

    async fn subscribe_with_credit(
        &self,
        topic: &str,
        mode: SubscriptionMode,
        credit: Credit,
    ) -> Result<Box<dyn Subscription>> {
        (**self).subscribe_with_credit(topic, mode, credit).await
    }

    fn packs(&self) -> bool {
        (**self).packs()
    }

    async fn publish_packed(&self, messages: &[Message]) -> Result<()> {
        (**self).publish_packed(messages).await
    }

    async fn publish_lent(&self, messages: &[Message]) -> Result<()> {
        (**self).publish_lent(messages).await
    }

    async fn remove_namespace(&self) -> Result<()> {
        (**self).remove_namespace().await
    }
}

/// A stream of deliveries.
#[async_trait]
pub trait Subscription: Send {
    /// The next delivery; `Err(Error::Closed)` when the broker shut down.
    async fn next(&mut self) -> Result<Delivery>;
}

/// Acknowledges or rejects one delivery.
#[async_trait]
pub trait Acker: Send + Sync {
    /// Settles the message for good.
    async fn ack(&self) -> Result<()>;
    /// Gives the message back for redelivery after `delay`.
    async fn nack(&self, delay: Duration) -> Result<()>;
    /// Moves the message, as delivered, to the broker's dead-letter place with `reason`, then
    /// settles it: for a message that is a CloudEvent its consumer can never use, which must
    /// neither come again nor vanish. When the move fails the message stays unsettled and the
    /// error is returned: the caller nacks it (or tries again), so it is not lost. A delivery
    /// already settled is left alone.
    async fn dead_letter(&self, reason: &str) -> Result<()>;
}

/// One delivered message and the means to settle it.
pub struct Delivery {
    /// The message as published; shared with the broker, which may hold it for a redelivery, so
    /// handing it out copies nothing.
    pub message: std::sync::Arc<Message>,
    /// How many times this message was delivered before (0 on first delivery).
    pub redeliveries: u32,
    /// Settles this delivery (see [`Delivery::ack`] and [`Delivery::nack`]).
    pub acker: Box<dyn Acker>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("message", &self.message)
            .field("redeliveries", &self.redeliveries)
            .finish_non_exhaustive()
    }
}

impl Delivery {
    /// Acknowledges the delivery: it will not come again.
    pub async fn ack(&self) -> Result<()> {
        self.acker.ack().await
    }

    /// Rejects the delivery: it comes again after `delay`.
    pub async fn nack(&self, delay: Duration) -> Result<()> {
        self.acker.nack(delay).await
    }

    /// Dead-letters the delivery with `reason` (see [`Acker::dead_letter`]): it will not come
    /// again, and the broker keeps it with the reason. On an error it is still unsettled.
    pub async fn dead_letter(&self, reason: &str) -> Result<()> {
        self.acker.dead_letter(reason).await
    }
}
