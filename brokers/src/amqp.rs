//! RabbitMQ (AMQP 0-9-1) implementation of the [`Broker`] trait (feature `amqp`).
//!
//! Topology, declared idempotently: one durable topic exchange (`AmqpConfig::exchange`), the
//! routing key being the topic; a competing group is the durable queue `<exchange>.<group>.<topic>` bound
//! to it, read with manual acks and `basic_qos(prefetch)`; a broadcast subscriber gets an
//! exclusive, auto-delete, server-named queue. Messages that cannot be decoded are republished
//! with a reason header to the dead-letter exchange `<exchange>.dlx`, which routes everything
//! to the durable queue `<exchange>.dead`; queues also name that exchange as their
//! `x-dead-letter-exchange`, so a message never vanishes silently.
//!
//! `nack(delay)`: RabbitMQ has no delayed redelivery, so a copy of the message (redelivery
//! header incremented) is published to a retry queue `<exchange>.retry.<queue>.<ms>` whose
//! message TTL is the delay and whose dead-letter target is the subscriber's queue (through the
//! default exchange, so only that queue sees it again); then the original is acked. Retry
//! queues expire a minute after their last use. A zero delay publishes the copy straight to
//! the queue. Unacked messages of a closed channel (a dropped subscription, a dead process)
//! return to their queue by RabbitMQ's own rule and come back flagged `redelivered`.
//!
//! Messages follow the CloudEvents AMQP binding in binary mode: `cloudEvents:`-prefixed
//! headers (`cloudEvents_` accepted too), `datacontenttype` as the AMQP content type;
//! structured mode is accepted on input. `publish_packed` sends the messages of one topic in
//! packs (see `crate::pack`). Publishing uses publisher confirms and persistent messages.

mod subscription;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::Mutex;

use crate::binding::{self, BATCH_CONTENT_TYPE, HeaderPrefix};
use crate::pack::{KEYS_HEADER, Piece};
use crate::{Broker, Error, Message, Result, Subscription, SubscriptionMode};
use subscription::{AmqpSubscription, QueueSpec};

/// The header carrying [`Message::key`].
pub const KEY_HEADER: &str = "capstan-key";
/// The header counting redeliveries made by `nack`.
pub const REDELIVERIES_HEADER: &str = "capstan-redeliveries";
/// The header a dead-lettered message carries: why it could not be decoded.
pub const DEAD_REASON_HEADER: &str = "capstan-dead-reason";

/// Settings of an [`AmqpBroker`].
#[derive(Debug, Clone)]
pub struct AmqpConfig {
    /// The topic exchange's name; the dead-letter exchange and queue are named after it.
    pub exchange: String,
    /// How many unacked messages one subscription may hold (`basic_qos`).
    pub prefetch: u16,
    /// The largest message (headers and body) to publish, in bytes.
    pub max_payload: usize,
    /// How long a subscription waits before it tries to reconnect.
    pub reconnect_delay: Duration,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        AmqpConfig {
            exchange: "capstan".into(),
            prefetch: 64,
            max_payload: 1024 * 1024,
            reconnect_delay: Duration::from_millis(500),
        }
    }
}

/// A [`Broker`] on RabbitMQ; clones share the connection.
#[derive(Clone)]
pub struct AmqpBroker {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AmqpBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpBroker").field("config", &self.inner.config).finish_non_exhaustive()
    }
}

/// The connection, opened again after it broke, and a confirm-mode channel for publishing.
pub(crate) struct Inner {
    url: String,
    config: AmqpConfig,
    link: Mutex<Option<(Arc<Connection>, Channel)>>,
    /// The group queues this process declared, for `remove_namespace`.
    declared: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

impl Inner {
    fn dlx(&self) -> String {
        format!("{}.dlx", self.config.exchange)
    }

    /// The live connection and publish channel, reconnecting (and declaring the topology
    /// again) when they broke.
    pub(crate) async fn link(&self) -> Result<(Arc<Connection>, Channel)> {
        let mut link = self.link.lock().await;
        if let Some((conn, channel)) = link.as_ref()
            && conn.status().connected()
            && channel.status().connected()
        {
            return Ok((Arc::clone(conn), channel.clone()));
        }
        let conn = Connection::connect(&self.url, ConnectionProperties::default())
            .await
            .map_err(|e| Error::Unavailable(format!("connect to {}: {e}", self.url)))?;
        let conn = Arc::new(conn);
        let channel = conn.create_channel().await.map_err(unavailable)?;
        channel.confirm_select(ConfirmSelectOptions::default()).await.map_err(unavailable)?;
        self.declare_topology(&channel).await?;
        tracing::info!(url = %self.url, "connected to RabbitMQ");
        *link = Some((Arc::clone(&conn), channel.clone()));
        Ok((conn, channel))
    }

    async fn declare_topology(&self, channel: &Channel) -> Result<()> {
        let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
        let ex = &self.config.exchange;
        channel
            .exchange_declare(ex.as_str().into(), ExchangeKind::Topic, durable, FieldTable::default())
            .await
            .map_err(unavailable)?;
        channel
            .exchange_declare(self.dlx().into(), ExchangeKind::Fanout, durable, FieldTable::default())
            .await
            .map_err(unavailable)?;
        let dead = format!("{ex}.dead");
        channel
            .queue_declare(dead.as_str().into(), QueueDeclareOptions::durable(), FieldTable::default())
            .await
            .map_err(unavailable)?;
        channel
            .queue_bind(dead.into(), self.dlx().into(), "#".into(), QueueBindOptions::default(), FieldTable::default())
            .await
            .map_err(unavailable)
    }

    /// Publishes on the confirm channel and waits for every confirmation.
    pub(crate) async fn publish_confirmed(&self, items: Vec<(String, String, Vec<u8>, BasicProperties)>) -> Result<()> {
        let (_, channel) = self.link().await?;
        let mut confirms = Vec::with_capacity(items.len());
        for (exchange, routing_key, body, props) in items {
            let confirm = channel
                .basic_publish(exchange.into(), routing_key.into(), BasicPublishOptions::default(), &body, props)
                .await
                .map_err(unavailable)?;
            confirms.push(confirm);
        }
        for confirm in confirms {
            let confirmation = confirm.await.map_err(unavailable)?;
            if confirmation.is_nack() {
                return Err(Error::Unavailable("RabbitMQ refused a message (nack)".into()));
            }
        }
        Ok(())
    }
}

fn unavailable(e: lapin::Error) -> Error {
    Error::Unavailable(e.to_string())
}

impl AmqpBroker {
    /// Connects (e.g. to `amqp://guest:guest@127.0.0.1:5672/%2f`) and declares the exchanges.
    pub async fn connect(url: &str, config: AmqpConfig) -> Result<Self> {
        if config.exchange.is_empty() {
            return Err(Error::Invalid("exchange name is empty".into()));
        }
        let inner =
            Arc::new(Inner { url: url.to_string(), config, link: Mutex::new(None), declared: Default::default() });
        inner.link().await?;
        Ok(AmqpBroker { inner })
    }

    /// The largest message `publish` accepts, in bytes (headers and body).
    pub fn max_payload(&self) -> usize {
        self.inner.config.max_payload
    }

    /// The queue that keeps undecodable messages.
    pub fn dead_letter_queue(&self) -> String {
        format!("{}.dead", self.inner.config.exchange)
    }
}

#[async_trait]
impl Broker for AmqpBroker {
    async fn publish(&self, messages: Vec<Message>) -> Result<()> {
        self.publish_lent(&messages).await
    }

    async fn publish_lent(&self, messages: &[Message]) -> Result<()> {
        let limit = self.inner.config.max_payload;
        let mut items = Vec::with_capacity(messages.len());
        for m in messages {
            check_topic(&m.topic)?;
            let (body, props, size) = encode(m)?;
            if size > limit {
                return Err(Error::TooLarge { size, limit });
            }
            items.push((self.inner.config.exchange.clone(), m.topic.clone(), body, props));
        }
        self.inner.publish_confirmed(items).await
    }

    fn packs(&self) -> bool {
        true
    }

    async fn remove_namespace(&self) -> Result<()> {
        let inner = &self.inner;
        let (_, channel) = inner.link().await?;
        let queues: Vec<String> = inner.declared.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect();
        for queue in queues.iter().chain([&self.dead_letter_queue()]) {
            channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await.map_err(unavailable)?;
        }
        for exchange in [inner.config.exchange.clone(), inner.dlx()] {
            let options = ExchangeDeleteOptions::default();
            channel.exchange_delete(exchange.as_str().into(), options).await.map_err(unavailable)?;
        }
        tracing::info!(exchange = inner.config.exchange, queues = queues.len() + 1, "namespace removed");
        Ok(())
    }

    /// The messages of each topic go in packs (see `crate::pack`), the topics in the order they
    /// first come.
    async fn publish_packed(&self, messages: &[Message]) -> Result<()> {
        let limit = self.inner.config.max_payload;
        let mut items = Vec::new();
        for (topic, messages) in &crate::pack::by_topic(messages) {
            check_topic(topic)?;
            let overhead = BATCH_CONTENT_TYPE.len();
            for piece in crate::pack::pieces(messages, overhead, limit)? {
                let (body, props) = match piece {
                    Piece::Alone(m) => {
                        let (body, props, size) = encode(m)?;
                        if size > limit {
                            return Err(Error::TooLarge { size, limit });
                        }
                        (body, props)
                    }
                    Piece::Pack(pack) => {
                        let mut headers = FieldTable::default();
                        headers.insert(KEYS_HEADER.into(), AMQPValue::LongString(LongString::from(pack.keys)));
                        let props = BasicProperties::default()
                            .with_delivery_mode(2)
                            .with_content_type(BATCH_CONTENT_TYPE.into())
                            .with_headers(headers);
                        (pack.body, props)
                    }
                };
                items.push((self.inner.config.exchange.clone(), topic.to_string(), body, props));
            }
        }
        self.inner.publish_confirmed(items).await
    }

    async fn subscribe(&self, topic: &str, mode: SubscriptionMode) -> Result<Box<dyn Subscription>> {
        check_topic(topic)?;
        let spec = match mode {
            SubscriptionMode::Competing { group } if group.is_empty() => {
                return Err(Error::Invalid("group name is empty".into()));
            }
            SubscriptionMode::Competing { group } => {
                // The exchange name leads so that deployments sharing a vhost never share queues.
                QueueSpec::Durable(format!("{}.{group}.{topic}", self.inner.config.exchange))
            }
            SubscriptionMode::Broadcast => QueueSpec::Exclusive,
        };
        let sub = AmqpSubscription::start(Arc::clone(&self.inner), topic.to_string(), spec).await?;
        Ok(Box::new(sub))
    }
}

/// Body, properties and the size counted against the limit (body and header text).
pub(crate) fn encode(m: &Message) -> Result<(Vec<u8>, BasicProperties, usize)> {
    let encoded = binding::encode(&m.event, HeaderPrefix::AMQP)?;
    let mut headers = FieldTable::default();
    let mut size = encoded.body.len() + KEY_HEADER.len() + m.key.len();
    for (name, value) in encoded.headers {
        size += name.len() + value.len();
        headers.insert(name.into(), AMQPValue::LongString(LongString::from(value)));
    }
    headers.insert(KEY_HEADER.into(), AMQPValue::LongString(LongString::from(m.key.clone())));
    let mut props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id(ShortString::from(m.event.id.clone()))
        .with_headers(headers);
    if let Some(ct) = encoded.content_type {
        size += ct.len();
        props = props.with_content_type(ct.into());
    }
    Ok((encoded.body, props, size))
}

/// Routing keys are at most 255 bytes; wildcards belong to bindings, not to topics.
fn check_topic(topic: &str) -> Result<()> {
    if topic.is_empty() || topic.len() > 200 || topic.contains(['*', '#']) {
        return Err(Error::Invalid(format!("topic {topic:?} is not a routing key")));
    }
    Ok(())
}
