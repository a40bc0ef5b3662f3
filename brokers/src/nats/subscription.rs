//! A NATS subscription: a task pulls batches from its JetStream consumer into a channel, and
//! `next` decodes them. The task, not `next`, owns the pull requests, so a `next` cancelled by a
//! timeout loses nothing. With a [`Credit`] the task asks for no more messages than the credit
//! allows (and gives back what a batch did not bring), so a member without credit leaves the
//! group's messages on the stream for the others.
//!
//! What is handed back early rather than left to `ack_wait`: a delivery dropped unsettled, the
//! unsettled deliveries and the buffered messages of a dropped subscription, and whatever the
//! pull task still receives after the subscription is gone. Each is NAKed, so another member
//! of the group gets it at once.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_nats::jetstream::consumer::{self, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::{self, AckKind};
use async_nats::{HeaderMap, Subject};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc;

use super::{DEAD_REASON_HEADER, KEY_HEADER, NatsConfig, pack};
use crate::binding::{self, HeaderPrefix};
use crate::{Acker, Credit, Delivery, Error, Message, Result, Subscription};

/// Which consumer a subscription reads.
#[derive(Debug, Clone)]
pub(super) enum ConsumerSpec {
    /// A durable consumer shared by a competing group.
    Durable(String),
    /// An ephemeral consumer of one broadcast subscriber.
    Broadcast(String),
}

impl ConsumerSpec {
    fn name(&self) -> &str {
        match self {
            ConsumerSpec::Durable(n) | ConsumerSpec::Broadcast(n) => n,
        }
    }
}

/// Where the pull task reads from, and how it recreates its consumer after the server lost it.
struct Source {
    js: jetstream::Context,
    config: Arc<NatsConfig>,
    subject: String,
    spec: ConsumerSpec,
    /// The last stream sequence seen: a recreated broadcast consumer resumes after it (in a
    /// stream created again since, whose sequence counts from 1 again, the server starts a
    /// start sequence past the stream's end at its end).
    last_seq: u64,
    /// The publish limit, for a stream created again.
    limit: usize,
}

impl Source {
    fn consumer_config(&self) -> consumer::pull::Config {
        let c = &self.config;
        let mut config = consumer::pull::Config {
            filter_subject: self.subject.clone(),
            ack_policy: AckPolicy::Explicit,
            ack_wait: c.ack_wait,
            max_deliver: -1,
            max_ack_pending: -1,
            ..Default::default()
        };
        match &self.spec {
            ConsumerSpec::Durable(name) => {
                config.durable_name = Some(name.clone());
                config.deliver_policy = DeliverPolicy::New;
            }
            ConsumerSpec::Broadcast(name) => {
                config.name = Some(name.clone());
                config.inactive_threshold = c.broadcast_inactive;
                config.deliver_policy = if self.last_seq == 0 {
                    DeliverPolicy::New
                } else {
                    DeliverPolicy::ByStartSequence { start_sequence: self.last_seq + 1 }
                };
            }
        }
        config
    }

    /// Creates the consumer, or binds to it when it exists (a durable of the group). When that
    /// fails because the server lost the stream (one in memory storage, after a restart), the
    /// stream is created again first.
    async fn ensure(&self) -> Result<PullConsumer> {
        match self.create_or_bind().await {
            Ok(c) => Ok(c),
            Err(first) => {
                let stream = &self.config.stream;
                let lost = match self.js.get_stream(stream).await {
                    Err(e) => matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(j)
                        if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND),
                    Ok(_) => false,
                };
                if !lost {
                    return Err(first);
                }
                super::ensure_streams(&self.js, &self.config, self.limit).await?;
                tracing::warn!(stream = %stream, "the stream was gone: created it again");
                self.create_or_bind().await
            }
        }
    }

    async fn create_or_bind(&self) -> Result<PullConsumer> {
        let stream = &self.config.stream;
        let created = self.js.create_consumer_on_stream(self.consumer_config(), stream).await;
        match created {
            Ok(c) => Ok(c),
            Err(create) => {
                // An existing durable created with other settings (say another ack_wait) is
                // still the group's consumer: use it as it is rather than fail.
                let existing: std::result::Result<PullConsumer, _> =
                    self.js.get_consumer_from_stream(self.spec.name(), stream).await;
                existing.map_err(|get| Error::Unavailable(format!("consumer {}: {create}; {get}", self.spec.name())))
            }
        }
    }
}

/// A subscription to one JetStream consumer.
pub(super) struct NatsSubscription {
    rx: mpsc::Receiver<jetstream::Message>,
    client: async_nats::Client,
    js: jetstream::Context,
    stream: String,
    spec: ConsumerSpec,
    dead_subject: Arc<str>,
    handed_out: Vec<Weak<Pending>>,
    /// The deliveries of a pack not handed out yet (see `pack`).
    parts: VecDeque<Delivery>,
    /// The credit the pull task fetches against; a message pulled but not handed out (one
    /// skipped or dead-lettered) gives its unit back.
    credit: Option<Credit>,
}

impl NatsSubscription {
    /// Creates (or binds to) the consumer and starts the pull task.
    pub(super) async fn start(
        js: jetstream::Context,
        config: Arc<NatsConfig>,
        subject: String,
        dead_subject: String,
        spec: ConsumerSpec,
        credit: Option<Credit>,
        limit: usize,
    ) -> Result<Self> {
        let source =
            Source { js: js.clone(), config: Arc::clone(&config), subject, spec: spec.clone(), last_seq: 0, limit };
        let consumer = source.ensure().await?;
        let (tx, rx) = mpsc::channel(config.prefetch.max(1));
        tokio::spawn(pull(source, consumer, tx, credit.clone()));
        Ok(NatsSubscription {
            rx,
            client: js.client(),
            js,
            stream: config.stream.clone(),
            spec,
            dead_subject: dead_subject.into(),
            handed_out: Vec::new(),
            parts: VecDeque::new(),
            credit,
        })
    }

    /// A pulled message that will not be handed out returns its unit of credit.
    fn unused(&self) {
        if let Some(credit) = &self.credit {
            credit.grant(1);
        }
    }

    /// Moves an undecodable message to the dead-letter stream with the reason, then ends its
    /// redelivery (TERM), so it neither blocks the consumer nor vanishes.
    async fn dead_letter(&self, msg: &jetstream::Message, reason: &str) {
        tracing::warn!(subject = %msg.subject, reason, "undecodable message moved to dead letters");
        let original = Original {
            js: self.js.clone(),
            dead_subject: Arc::clone(&self.dead_subject),
            headers: msg.headers.clone(),
            payload: msg.payload.clone(),
        };
        if let Err(e) = original.copy_to_dead_letters(reason).await {
            tracing::error!(error = %e, "leaving the undecodable message to redelivery");
            return;
        }
        if let Err(e) = msg.ack_with(AckKind::Term).await {
            tracing::warn!(error = %e, "term of a dead-lettered message failed");
        }
    }
}

/// A message as it arrived, and where its dead letter goes.
pub(super) struct Original {
    pub(super) js: jetstream::Context,
    pub(super) dead_subject: Arc<str>,
    pub(super) headers: Option<HeaderMap>,
    pub(super) payload: Bytes,
}

impl Original {
    /// Publishes the message, headers and payload unchanged plus the reason header, to the
    /// dead-letter stream, and waits until the stream stored it.
    pub(super) async fn copy_to_dead_letters(&self, reason: &str) -> Result<()> {
        let mut headers = self.headers.clone().unwrap_or_default();
        headers.insert(DEAD_REASON_HEADER, reason);
        let ack = self
            .js
            .publish_with_headers(self.dead_subject.to_string(), headers, self.payload.clone())
            .await
            .map_err(|e| Error::Unavailable(format!("dead letter not sent: {e}")))?;
        ack.await.map_err(|e| Error::Unavailable(format!("dead letter not confirmed: {e}")))?;
        Ok(())
    }
}

#[async_trait]
impl Subscription for NatsSubscription {
    async fn next(&mut self) -> Result<Delivery> {
        if let Some(part) = self.parts.pop_front() {
            return Ok(part);
        }
        loop {
            let msg = self.rx.recv().await.ok_or(Error::Closed)?;
            let (redeliveries, topic) = match msg.info() {
                Ok(info) => (
                    u32::try_from(info.delivered.saturating_sub(1)).unwrap_or(u32::MAX),
                    msg.subject.as_str().split_once('.').map_or("", |(_, t)| t).to_string(),
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "a message without JetStream metadata was skipped");
                    self.unused();
                    continue;
                }
            };
            let empty = HeaderMap::new();
            let headers = msg.headers.as_ref().unwrap_or(&empty);
            let decoded = if pack::is_pack(headers) {
                pack::decode(headers, &msg.payload, &topic).map(Decoded::Pack)
            } else {
                let key = headers.get(KEY_HEADER).map(|v| v.as_str().to_string()).unwrap_or_default();
                let headers = headers
                    .iter()
                    .flat_map(|(name, values)| values.iter().map(move |v| (super::header_name(name), v.as_str())));
                binding::decode(headers, None, &msg.payload, HeaderPrefix::HTTP)
                    .map(|event| Decoded::One(Box::new(Message { topic, key, event })))
            };
            let decoded = match decoded {
                Ok(decoded) => decoded,
                Err(e) => {
                    self.dead_letter(&msg, &e.to_string()).await;
                    self.unused();
                    continue;
                }
            };
            let Some(reply) = msg.reply.clone() else {
                self.unused();
                continue;
            };
            let pending = self.track(reply);
            let acker = NatsAcker { pending, original: self.original(msg) };
            match decoded {
                Decoded::One(message) => {
                    return Ok(Delivery { message: Arc::new(*message), redeliveries, acker: Box::new(acker) });
                }
                Decoded::Pack(messages) => {
                    let dead =
                        Arc::new(pack::DeadParts { js: self.js.clone(), dead_subject: Arc::clone(&self.dead_subject) });
                    let parts = crate::pack::deliveries(messages, redeliveries, Box::new(acker), dead);
                    self.parts = parts.into();
                    if let Some(first) = self.parts.pop_front() {
                        return Ok(first);
                    }
                }
            }
        }
    }
}

/// What a NATS message carried.
enum Decoded {
    One(Box<Message>),
    Pack(Vec<Message>),
}

impl NatsSubscription {
    /// The settle state of a delivery (or pack) handed out, remembered so that dropping the
    /// subscription hands back what is still unsettled.
    fn track(&mut self, reply: Subject) -> Arc<Pending> {
        let pending = Arc::new(Pending { client: self.client.clone(), reply: Mutex::new(Some(reply)) });
        // Forget settled or dropped deliveries now and then, so the list stays short.
        if self.handed_out.len() >= 64 {
            self.handed_out.retain(|w| w.strong_count() > 0);
        }
        self.handed_out.push(Arc::downgrade(&pending));
        pending
    }

    fn original(&self, msg: jetstream::Message) -> Original {
        Original {
            js: self.js.clone(),
            dead_subject: Arc::clone(&self.dead_subject),
            headers: msg.message.headers,
            payload: msg.message.payload,
        }
    }
}

impl Drop for NatsSubscription {
    fn drop(&mut self) {
        self.rx.close();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mut replies: Vec<Subject> = Vec::new();
        while let Ok(msg) = self.rx.try_recv() {
            replies.extend(msg.reply.clone());
        }
        for pending in self.handed_out.iter().filter_map(Weak::upgrade) {
            replies.extend(pending.take());
        }
        let client = self.client.clone();
        let delete = match &self.spec {
            ConsumerSpec::Broadcast(name) => Some((self.js.clone(), self.stream.clone(), name.clone())),
            ConsumerSpec::Durable(_) => None,
        };
        runtime.spawn(async move {
            for reply in replies {
                settle(&client, reply, AckKind::Nak(None)).await.ok();
            }
            // A broadcast consumer serves only this subscriber; the inactivity threshold
            // would remove it too, later.
            if let Some((js, stream, name)) = delete
                && let Err(e) = js.delete_consumer_from_stream(&name, &stream).await
            {
                tracing::debug!(error = %e, consumer = name, "broadcast consumer not deleted");
            }
        });
    }
}

/// The pull loop: one batch request at a time, each message into the channel. After the
/// subscription is gone it keeps draining the open request, NAKing what still arrives. With
/// credit, a request asks for what the credit allows, up to the prefetch, and the units a batch
/// did not bring (it expired first, or failed) are given back.
async fn pull(
    mut source: Source,
    mut consumer: PullConsumer,
    tx: mpsc::Sender<jetstream::Message>,
    credit: Option<Credit>,
) {
    let config = Arc::clone(&source.config);
    let prefetch = config.prefetch.max(1);
    let mut backoff = Duration::from_millis(100);
    loop {
        if tx.is_closed() {
            return;
        }
        let wanted = match &credit {
            Some(credit) => tokio::select! {
                taken = credit.take(prefetch) => taken,
                () = tx.closed() => return,
            },
            None => prefetch,
        };
        let mut received = 0;
        let batch = consumer.batch().max_messages(wanted).expires(config.pull_expires).messages().await;
        let mut failed = match batch {
            Ok(mut batch) => {
                let mut failed = false;
                while let Some(item) = batch.next().await {
                    match item {
                        Ok(msg) => {
                            received += 1;
                            if let Ok(info) = msg.info() {
                                source.last_seq = info.stream_sequence;
                            }
                            if let Err(mpsc::error::SendError(msg)) = tx.send(msg).await
                                && let Some(reply) = msg.reply.clone()
                            {
                                settle(&msg.context.client(), reply, AckKind::Nak(None)).await.ok();
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, consumer = source.spec.name(), "pull failed");
                            failed = true;
                            break;
                        }
                    }
                }
                failed
            }
            Err(e) => {
                tracing::warn!(error = %e, consumer = source.spec.name(), "pull request failed");
                true
            }
        };
        if let Some(credit) = &credit {
            credit.grant(wanted.saturating_sub(received));
        }
        while failed && !tx.is_closed() {
            // The server may have restarted and lost the consumer (ephemeral ones are not
            // kept): wait, then create it again, resuming a broadcast after the last message.
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
            match source.ensure().await {
                Ok(c) => {
                    consumer = c;
                    failed = false;
                }
                Err(e) => tracing::warn!(error = %e, "consumer not recreated yet"),
            }
        }
        if !failed {
            backoff = Duration::from_millis(100);
        }
    }
}

/// The reply subject of one delivery (or pack), taken by whichever settles it first.
struct Pending {
    client: async_nats::Client,
    reply: Mutex<Option<Subject>>,
}

impl Pending {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Subject>> {
        self.reply.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take(&self) -> Option<Subject> {
        self.lock().take()
    }

    fn is_settled(&self) -> bool {
        self.lock().is_none()
    }
}

async fn settle(client: &async_nats::Client, reply: Subject, kind: AckKind) -> Result<()> {
    client.publish(reply, Bytes::from(kind)).await.map_err(|e| Error::Unavailable(format!("settle: {e}")))
}

/// Settles one NATS delivery. A second settle is a no-op; dropping it unsettled NAKs it.
struct NatsAcker {
    pending: Arc<Pending>,
    original: Original,
}

impl NatsAcker {
    async fn settle(&self, kind: AckKind) -> Result<()> {
        match self.pending.take() {
            Some(reply) => settle(&self.pending.client, reply, kind).await,
            None => Ok(()),
        }
    }
}

#[async_trait]
impl Acker for NatsAcker {
    async fn ack(&self) -> Result<()> {
        self.settle(AckKind::Ack).await
    }

    async fn nack(&self, delay: Duration) -> Result<()> {
        // JetStream (2.7+) holds a NAKed message back for the delay itself.
        self.settle(AckKind::Nak((!delay.is_zero()).then_some(delay))).await
    }

    async fn dead_letter(&self, reason: &str) -> Result<()> {
        if self.pending.is_settled() {
            return Ok(());
        }
        // Stored in the dead-letter stream first; only then is redelivery ended (TERM).
        self.original.copy_to_dead_letters(reason).await?;
        self.settle(AckKind::Term).await
    }
}

impl Drop for NatsAcker {
    fn drop(&mut self) {
        let Some(reply) = self.pending.take() else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let client = self.pending.client.clone();
            runtime.spawn(async move { settle(&client, reply, AckKind::Nak(None)).await.ok() });
        }
    }
}
