//! A RabbitMQ subscription: its own channel and consumer, fed into a channel by a task that
//! opens them again after the connection broke. Dropping the subscription closes its AMQP
//! channel, which makes RabbitMQ requeue everything it held unacked.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use futures::StreamExt;
use lapin::message::Delivery as AmqpDelivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Consumer};
use tokio::sync::mpsc;

use super::{DEAD_REASON_HEADER, Inner, KEY_HEADER, REDELIVERIES_HEADER, encode, unavailable};
use crate::binding::{self, HeaderPrefix};
use crate::pack::{self, KEYS_HEADER};
use crate::{Acker, Delivery, Error, Message, Result, Subscription};

/// Which queue a subscription reads.
#[derive(Debug, Clone)]
pub(super) enum QueueSpec {
    /// A durable queue shared by a competing group.
    Durable(String),
    /// A server-named exclusive queue of one broadcast subscriber.
    Exclusive,
}

/// A subscription's channel, consumer and queue name.
struct Opened {
    channel: Channel,
    consumer: Consumer,
    queue: String,
}

async fn open(inner: &Inner, topic: &str, spec: &QueueSpec) -> Result<Opened> {
    let (conn, _) = inner.link().await?;
    let channel = conn.create_channel().await.map_err(unavailable)?;
    channel.basic_qos(inner.config.prefetch, BasicQosOptions::default()).await.map_err(unavailable)?;
    let mut args = FieldTable::default();
    args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(inner.dlx().into()));
    let (name, options) = match spec {
        QueueSpec::Durable(name) => {
            inner.declared.lock().unwrap_or_else(|p| p.into_inner()).insert(name.clone());
            (name.clone(), QueueDeclareOptions::durable())
        }
        QueueSpec::Exclusive => {
            (String::new(), QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() })
        }
    };
    let queue = channel.queue_declare(name.into(), options, args).await.map_err(unavailable)?;
    let queue = queue.name().as_str().to_string();
    channel
        .queue_bind(
            queue.as_str().into(),
            inner.config.exchange.as_str().into(),
            topic.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(unavailable)?;
    let consumer = channel
        .basic_consume(queue.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .map_err(unavailable)?;
    Ok(Opened { channel, consumer, queue })
}

/// A subscription to one queue.
pub(super) struct AmqpSubscription {
    rx: mpsc::Receiver<(AmqpDelivery, String)>,
    inner: Arc<Inner>,
    topic: String,
    /// The deliveries of a pack not handed out yet (see `crate::pack`).
    parts: VecDeque<Delivery>,
}

impl AmqpSubscription {
    /// Declares and binds the queue and starts consuming before returning.
    pub(super) async fn start(inner: Arc<Inner>, topic: String, spec: QueueSpec) -> Result<Self> {
        let opened = open(&inner, &topic, &spec).await?;
        let (tx, rx) = mpsc::channel(usize::from(inner.config.prefetch.max(1)));
        tokio::spawn(consume(Arc::clone(&inner), topic.clone(), spec, opened, tx));
        Ok(AmqpSubscription { rx, inner, topic, parts: VecDeque::new() })
    }

    /// Republishes an undecodable message to the dead-letter exchange with the reason, then
    /// acks it; if that fails, rejects it so that the queue's own dead-lettering takes it.
    async fn dead_letter(&self, d: AmqpDelivery, reason: &str) {
        tracing::warn!(topic = self.topic, reason, "undecodable message moved to dead letters");
        let outcome = match copy_to_dead_letters(&self.inner, &self.topic, &d, reason).await {
            Ok(()) => d.acker.ack(BasicAckOptions::default()).await,
            Err(_) => d.acker.nack(BasicNackOptions::default()).await,
        };
        if let Err(e) = outcome {
            tracing::warn!(error = %e, "settling a dead-lettered message failed");
        }
    }
}

/// Republishes a message, body and properties unchanged plus the reason header, to the
/// dead-letter exchange (routing key: the topic), and waits for the confirmation.
async fn copy_to_dead_letters(inner: &Inner, topic: &str, d: &AmqpDelivery, reason: &str) -> Result<()> {
    let reason = AMQPValue::LongString(LongString::from(reason.to_string()));
    let props = with_header(&d.properties, DEAD_REASON_HEADER, reason);
    inner.publish_confirmed(vec![(inner.dlx(), topic.to_string(), d.data.clone(), props)]).await
}

/// Forwards deliveries; reopens channel and consumer after a failure; closes the channel
/// once the subscription is gone.
async fn consume(
    inner: Arc<Inner>,
    topic: String,
    spec: QueueSpec,
    mut opened: Opened,
    tx: mpsc::Sender<(AmqpDelivery, String)>,
) {
    loop {
        let gone = loop {
            tokio::select! {
                next = opened.consumer.next() => match next {
                    Some(Ok(d)) => {
                        if tx.send((d, opened.queue.clone())).await.is_err() {
                            break true;
                        }
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, topic, "consumer failed");
                        break false;
                    }
                    None => break false,
                },
                () = tx.closed() => break true,
            }
        };
        if gone {
            // Requeues whatever this subscription held unacked.
            opened.channel.close(200, "subscription dropped".into()).await.ok();
            return;
        }
        loop {
            tokio::time::sleep(inner.config.reconnect_delay).await;
            if tx.is_closed() {
                return;
            }
            match open(&inner, &topic, &spec).await {
                Ok(o) => {
                    tracing::info!(topic, queue = o.queue, "subscription reopened");
                    opened = o;
                    break;
                }
                Err(e) => tracing::warn!(error = %e, topic, "subscription not reopened yet"),
            }
        }
    }
}

#[async_trait]
impl Subscription for AmqpSubscription {
    async fn next(&mut self) -> Result<Delivery> {
        if let Some(part) = self.parts.pop_front() {
            return Ok(part);
        }
        loop {
            let (d, queue) = self.rx.recv().await.ok_or(Error::Closed)?;
            let mut pairs: Vec<(String, String)> = Vec::new();
            if let Some(headers) = d.properties.headers() {
                for (name, value) in headers.inner() {
                    if let Some(text) = text_of(value) {
                        pairs.push((name.as_str().to_string(), text));
                    }
                }
            }
            let prefix = if pairs.iter().any(|(k, _)| k.starts_with("cloudEvents_")) {
                HeaderPrefix::AMQP_UNDERSCORE
            } else {
                HeaderPrefix::AMQP
            };
            let content_type = d.properties.content_type().as_ref().map(|c| c.as_str());
            let get = |name: &str| pairs.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
            let counted: u32 = get(REDELIVERIES_HEADER).and_then(|v| v.parse().ok()).unwrap_or(0);
            let redeliveries = counted + u32::from(d.redelivered);
            if pack::is_pack(content_type) {
                let messages = match pack::decode(&d.data, get(KEYS_HEADER).as_deref(), &self.topic) {
                    Ok(messages) => messages,
                    Err(e) => {
                        self.dead_letter(d, &e.to_string()).await;
                        continue;
                    }
                };
                let whole = Box::new(self.acker(counted, queue, d));
                let dead = Arc::new(DeadParts { inner: Arc::clone(&self.inner), topic: self.topic.clone() });
                self.parts = pack::deliveries(messages, redeliveries, whole, dead).into();
                match self.parts.pop_front() {
                    Some(first) => return Ok(first),
                    None => continue,
                }
            }
            let decoded =
                binding::decode(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())), content_type, &d.data, prefix);
            let event = match decoded {
                Ok(event) => event,
                Err(e) => {
                    self.dead_letter(d, &e.to_string()).await;
                    continue;
                }
            };
            let key = get(KEY_HEADER).unwrap_or_default();
            return Ok(Delivery {
                message: Arc::new(Message { topic: self.topic.clone(), key, event }),
                redeliveries,
                acker: Box::new(self.acker(counted, queue, d)),
            });
        }
    }
}

impl AmqpSubscription {
    /// The acker of a delivery that `nack` copies with the redelivery count after `counted`.
    fn acker(&self, counted: u32, queue: String, delivery: AmqpDelivery) -> AmqpAcker {
        AmqpAcker {
            inner: Arc::clone(&self.inner),
            settled: AtomicBool::new(false),
            count: counted + 1,
            topic: self.topic.clone(),
            queue,
            delivery,
        }
    }
}

/// Moves one part of a pack, alone and in binary mode, to the dead-letter exchange.
struct DeadParts {
    inner: Arc<Inner>,
    topic: String,
}

#[async_trait]
impl pack::DeadLetterPart for DeadParts {
    async fn dead_letter_part(&self, part: &Message, reason: &str) -> Result<()> {
        let (body, props, _) = encode(part)?;
        let props =
            with_header(&props, DEAD_REASON_HEADER, AMQPValue::LongString(LongString::from(reason.to_string())));
        self.inner.publish_confirmed(vec![(self.inner.dlx(), self.topic.clone(), body, props)]).await
    }
}

/// A header value as text: strings as they are, numbers and booleans printed.
pub(super) fn text_of(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        AMQPValue::Boolean(b) => Some(b.to_string()),
        AMQPValue::ShortInt(n) => Some(n.to_string()),
        AMQPValue::LongInt(n) => Some(n.to_string()),
        AMQPValue::LongLongInt(n) => Some(n.to_string()),
        AMQPValue::LongUInt(n) => Some(n.to_string()),
        _ => None,
    }
}

fn with_header(props: &BasicProperties, name: &str, value: AMQPValue) -> BasicProperties {
    let mut headers = props.headers().clone().unwrap_or_default();
    headers.insert(name.into(), value);
    props.clone().with_headers(headers)
}

/// Settles one RabbitMQ delivery; the second settle is a no-op.
struct AmqpAcker {
    inner: Arc<Inner>,
    settled: AtomicBool,
    /// The redelivery count a nacked copy carries.
    count: u32,
    /// The routing key of a dead letter.
    topic: String,
    queue: String,
    delivery: AmqpDelivery,
}

impl AmqpAcker {
    /// Publishes the copy that comes back after `delay`: straight to the queue, or through a
    /// retry queue whose TTL is the delay and whose dead-letter target is the queue.
    async fn send_copy(&self, delay: std::time::Duration) -> Result<()> {
        let props = with_header(
            &self.delivery.properties,
            REDELIVERIES_HEADER,
            AMQPValue::LongString(LongString::from(self.count.to_string())),
        );
        let target = if delay.is_zero() {
            self.queue.clone()
        } else {
            let ms = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
            let retry = format!("{}.retry.{}.{ms}", self.inner.config.exchange, self.queue);
            let mut args = FieldTable::default();
            args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ms));
            args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString("".into()));
            args.insert("x-dead-letter-routing-key".into(), AMQPValue::LongString(self.queue.as_str().into()));
            args.insert("x-expires".into(), AMQPValue::LongLongInt(ms.saturating_add(60_000)));
            let (_, channel) = self.inner.link().await?;
            channel
                .queue_declare(retry.as_str().into(), QueueDeclareOptions::durable(), args)
                .await
                .map_err(unavailable)?;
            retry
        };
        let copy = vec![(String::new(), target, self.delivery.data.clone(), props)];
        self.inner.publish_confirmed(copy).await
    }
}

#[async_trait]
impl Acker for AmqpAcker {
    async fn ack(&self) -> Result<()> {
        if self.settled.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        self.delivery.acker.ack(BasicAckOptions::default()).await.map(drop).map_err(unavailable)
    }

    async fn nack(&self, delay: std::time::Duration) -> Result<()> {
        if self.settled.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        match self.send_copy(delay).await {
            Ok(()) => self.delivery.acker.ack(BasicAckOptions::default()).await,
            Err(e) => {
                tracing::warn!(error = %e, "delayed retry not published; requeueing at once");
                let requeue = BasicNackOptions { requeue: true, ..Default::default() };
                self.delivery.acker.nack(requeue).await
            }
        }
        .map(drop)
        .map_err(unavailable)
    }

    async fn dead_letter(&self, reason: &str) -> Result<()> {
        if self.settled.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        if let Err(e) = copy_to_dead_letters(&self.inner, &self.topic, &self.delivery, reason).await {
            // Still held unsettled: the caller nacks it, or dropping it requeues it.
            self.settled.store(false, Ordering::SeqCst);
            return Err(e);
        }
        self.delivery.acker.ack(BasicAckOptions::default()).await.map(drop).map_err(unavailable)
    }
}

impl Drop for AmqpAcker {
    fn drop(&mut self) {
        // A delivery dropped unsettled goes back to its queue at once, not when the channel
        // closes (which for a long-lived subscription may be never).
        if self.settled.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let acker = self.delivery.acker.clone();
            let requeue = BasicNackOptions { requeue: true, ..Default::default() };
            runtime.spawn(async move { acker.nack(requeue).await.ok() });
        }
    }
}
