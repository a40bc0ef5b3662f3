//! NATS JetStream implementation of the [`Broker`] trait (feature `nats`), for servers 2.9 and
//! later: only the 2.9 JetStream API is used (one filter subject per consumer, no metadata).
//!
//! Topology, created idempotently by [`NatsBroker::connect`]:
//! - one stream (`NatsConfig::stream`, interest retention, file storage unless
//!   [`NatsConfig::storage`] says memory) holding the subjects `<subject_prefix>.>`; a topic
//!   `a.b` is the subject `<subject_prefix>.a.b`;
//! - one dead-letter stream (`<stream>_DEAD`, limits retention) holding
//!   `<subject_prefix>-dead.>` for messages that arrive but cannot be decoded.
//!
//! A competing group is a durable pull consumer shared by its members; a broadcast subscription
//! an ephemeral pull consumer delivering only what is published after it was created. Messages
//! use the CloudEvents NATS binding in binary mode (`ce-*` headers, `content-type`, data as the
//! payload); structured mode is accepted on input, and [`Broker::publish_packed`] sends the
//! messages of one topic in packs (see `crate::pack`). The key travels in the `capstan-key` header,
//! and `Nats-Msg-Id` (topic and event id) lets JetStream drop a republished duplicate within
//! the stream's duplicate window.

mod pack;
mod subscription;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, message::PublishMessage, stream};
use async_trait::async_trait;

use crate::binding::{self, HeaderPrefix};
use crate::{Broker, Credit, Error, Message, Result, Subscription, SubscriptionMode};
use subscription::{ConsumerSpec, NatsSubscription};

/// The header carrying [`Message::key`].
pub const KEY_HEADER: &str = "capstan-key";
/// The header a dead-lettered message carries: why it could not be decoded.
pub const DEAD_REASON_HEADER: &str = "capstan-dead-reason";
/// JetStream's deduplication header.
const MSG_ID_HEADER: &str = "Nats-Msg-Id";

/// Where the stream keeps its messages.
///
/// `File` (the default) keeps a confirmed message across a restart of the server. `Memory`
/// spends less of the server's CPU per message (no writes to its files), and a restart of the
/// server loses what was in the stream. For Capstan's own traffic that costs time, not facts,
/// since the store is the truth: lost offers and awards are offered again by the engine's
/// durable timers, and a worker's lost result ends its attempt by timeout, so the task runs
/// again (a task marked `idempotent: false` ends `outcome-unknown` instead).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NatsStorage {
    #[default]
    File,
    Memory,
}

impl NatsStorage {
    fn of_stream(self) -> stream::StorageType {
        match self {
            NatsStorage::File => stream::StorageType::File,
            NatsStorage::Memory => stream::StorageType::Memory,
        }
    }
}

impl std::str::FromStr for NatsStorage {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "file" => Ok(NatsStorage::File),
            "memory" => Ok(NatsStorage::Memory),
            other => Err(Error::Invalid(format!("NATS storage `{other}` (expected file or memory)"))),
        }
    }
}

/// Settings of a [`NatsBroker`].
#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// The JetStream stream's name (no dots or spaces).
    pub stream: String,
    /// The main stream's storage, used when the stream is created; an existing stream with
    /// other storage is refused, since JetStream cannot change it.
    pub storage: NatsStorage,
    /// The first subject token: topics live under `<subject_prefix>.`.
    pub subject_prefix: String,
    /// How long a delivery may stay unsettled before JetStream redelivers it.
    pub ack_wait: Duration,
    /// The largest message (headers and payload) to publish; the server's own limit wins when
    /// it is lower.
    pub max_payload: usize,
    /// How many messages one subscription pulls ahead of its consumer.
    pub prefetch: usize,
    /// How long one pull request waits on the server for messages.
    pub pull_expires: Duration,
    /// How long the stream keeps a message nobody settles.
    pub max_age: Duration,
    /// The window within which JetStream drops a message republished with the same id.
    pub duplicate_window: Duration,
    /// Stream replicas (1 for a single server, 3 in a cluster).
    pub replicas: usize,
    /// How long the server keeps a broadcast consumer that stopped pulling.
    pub broadcast_inactive: Duration,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            stream: "CAPSTAN".into(),
            storage: NatsStorage::File,
            subject_prefix: "capstan".into(),
            ack_wait: Duration::from_secs(30),
            max_payload: 1024 * 1024,
            prefetch: 64,
            pull_expires: Duration::from_secs(5),
            max_age: Duration::from_secs(7 * 24 * 3600),
            duplicate_window: Duration::from_secs(120),
            replicas: 1,
            broadcast_inactive: Duration::from_secs(300),
        }
    }
}

/// A [`Broker`] on NATS JetStream; clones share one connection.
#[derive(Clone)]
pub struct NatsBroker {
    client: async_nats::Client,
    js: jetstream::Context,
    config: Arc<NatsConfig>,
    limit: usize,
}

impl std::fmt::Debug for NatsBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsBroker").field("config", &self.config).field("limit", &self.limit).finish_non_exhaustive()
    }
}

impl NatsBroker {
    /// Creates (or binds to) the consumer of `topic` and starts its pull task, which fetches
    /// against `credit` when there is one.
    async fn open(&self, topic: &str, mode: SubscriptionMode, credit: Option<Credit>) -> Result<Box<dyn Subscription>> {
        let subject = self.subject(topic)?;
        let spec = match mode {
            SubscriptionMode::Competing { group } => {
                if group.is_empty() {
                    return Err(Error::Invalid("group name is empty".into()));
                }
                ConsumerSpec::Durable(durable_name(&group, topic))
            }
            SubscriptionMode::Broadcast => {
                ConsumerSpec::Broadcast(format!("capstan-b-{}", self.client.new_inbox().replace('.', "")))
            }
        };
        let dead_subject = format!("{}-dead.{topic}", self.config.subject_prefix);
        let sub = NatsSubscription::start(
            self.js.clone(),
            Arc::clone(&self.config),
            subject,
            dead_subject,
            spec,
            credit,
            self.limit,
        )
        .await?;
        Ok(Box::new(sub))
    }

    /// Connects (e.g. to `nats://127.0.0.1:4222`) and creates the streams if they are missing.
    /// The client reconnects by itself, without limit, after the connection is lost.
    pub async fn connect(url: &str, config: NatsConfig) -> Result<Self> {
        check_name("stream", &config.stream)?;
        check_name("subject prefix", &config.subject_prefix)?;
        let client = async_nats::ConnectOptions::new()
            .name("capstan")
            .event_callback(|event| async move {
                tracing::info!(%event, "nats connection event");
            })
            .connect(url)
            .await
            .map_err(|e| Error::Unavailable(format!("connect to {url}: {e}")))?;
        let limit = config.max_payload.min(client.server_info().max_payload);
        let js = jetstream::new(client.clone());
        let broker = NatsBroker { client, js, config: Arc::new(config), limit };
        broker.ensure_streams().await?;
        Ok(broker)
    }

    /// The largest message `publish` accepts, in bytes (headers and payload).
    pub fn max_payload(&self) -> usize {
        self.limit
    }

    /// The dead-letter stream's name.
    pub fn dead_letter_stream(&self) -> String {
        dead_letter_stream(&self.config)
    }

    /// The NATS client, for operations beyond the trait (health checks, tests).
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    async fn ensure_streams(&self) -> Result<()> {
        ensure_streams(&self.js, &self.config, self.limit).await
    }

    /// Sends encoded messages pipelined: all of them, then waits for every PubAck.
    async fn send(&self, prepared: Vec<(String, HeaderMap, Vec<u8>)>) -> Result<()> {
        let mut acks = Vec::with_capacity(prepared.len());
        for (subject, headers, payload) in prepared {
            let publish = PublishMessage::build().payload(payload.into()).headers(headers);
            let ack = match self.js.send_publish(subject, publish).await {
                Ok(ack) => ack,
                Err(e) => return Err(self.publish_failed("publish", e).await),
            };
            acks.push(ack);
        }
        for ack in acks {
            if let Err(e) = ack.await {
                return Err(self.publish_failed("publish not confirmed", e).await);
            }
        }
        Ok(())
    }

    /// The error of a failed publish. A stream the server no longer has (one in memory storage
    /// after a restart) is created again first, so that the caller's retry finds it.
    async fn publish_failed(&self, what: &str, e: jetstream::context::PublishError) -> Error {
        if e.kind() == jetstream::context::PublishErrorKind::StreamNotFound {
            match self.ensure_streams().await {
                Ok(()) => tracing::warn!(stream = %self.config.stream, "the stream was gone: created it again"),
                Err(again) => return again,
            }
        }
        Error::Unavailable(format!("{what}: {e}"))
    }

    fn subject(&self, topic: &str) -> Result<String> {
        check_topic(topic)?;
        Ok(format!("{}.{topic}", self.config.subject_prefix))
    }
}

#[async_trait]
impl Broker for NatsBroker {
    async fn publish(&self, messages: Vec<Message>) -> Result<()> {
        self.publish_lent(&messages).await
    }

    async fn publish_lent(&self, messages: &[Message]) -> Result<()> {
        // Everything is encoded and checked before the first message leaves, so that a bad
        // batch is refused whole.
        let mut prepared = Vec::with_capacity(messages.len());
        for m in messages {
            let subject = self.subject(&m.topic)?;
            let (headers, payload) = pack::plain(m, self.limit)?;
            prepared.push((subject, headers, payload));
        }
        self.send(prepared).await
    }

    fn packs(&self) -> bool {
        true
    }

    async fn remove_namespace(&self) -> Result<()> {
        for stream in [self.config.stream.clone(), self.dead_letter_stream()] {
            match self.js.delete_stream(&stream).await {
                Ok(_) => tracing::info!(stream, "stream deleted"),
                Err(e) => match e.kind() {
                    jetstream::context::DeleteStreamErrorKind::JetStream(j)
                        if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND => {}
                    _ => return Err(Error::Unavailable(format!("delete stream {stream}: {e}"))),
                },
            }
        }
        Ok(())
    }

    /// The messages of each topic go in packs (see `pack`), the topics in the order they first
    /// come.
    async fn publish_packed(&self, messages: &[Message]) -> Result<()> {
        let mut prepared = Vec::new();
        for (topic, messages) in &crate::pack::by_topic(messages) {
            let subject = self.subject(topic)?;
            for (headers, payload) in pack::encode_packed(messages, self.limit)? {
                prepared.push((subject.clone(), headers, payload));
            }
        }
        self.send(prepared).await
    }

    async fn subscribe(&self, topic: &str, mode: SubscriptionMode) -> Result<Box<dyn Subscription>> {
        self.open(topic, mode, None).await
    }

    /// Pulls only against the credit: a member without it leaves the messages on the stream.
    async fn subscribe_with_credit(
        &self,
        topic: &str,
        mode: SubscriptionMode,
        credit: Credit,
    ) -> Result<Box<dyn Subscription>> {
        self.open(topic, mode, Some(credit)).await
    }
}

/// Binary-mode headers and payload of a message.
fn encode(m: &Message) -> Result<(HeaderMap, Vec<u8>)> {
    let encoded = binding::encode(&m.event, HeaderPrefix::HTTP)?;
    let mut headers = HeaderMap::new();
    for (name, value) in encoded.headers {
        headers.insert(name.as_str(), value);
    }
    if let Some(ct) = encoded.content_type {
        headers.insert(binding::CONTENT_TYPE, ct);
    }
    headers.insert(KEY_HEADER, m.key.as_str());
    headers.insert(MSG_ID_HEADER, format!("{}:{}", m.topic, m.event.id));
    Ok((headers, encoded.body))
}

/// The bytes headers take on the wire (`NATS/1.0\r\n`, `name: value\r\n` each, `\r\n`):
/// the server's max_payload counts them.
fn header_bytes(headers: &HeaderMap) -> usize {
    let lines: usize = headers
        .iter()
        .map(|(name, values)| {
            let name: &[u8] = name.as_ref();
            values.iter().map(|v| name.len() + v.as_str().len() + 4).sum::<usize>()
        })
        .sum();
    10 + lines + 2
}

/// A header's name as text, without the copy `to_string` makes (names are ASCII).
fn header_name(name: &async_nats::HeaderName) -> &str {
    std::str::from_utf8(name.as_ref()).unwrap_or_default()
}

/// Creates the stream and the dead-letter stream if they are missing, and checks that an
/// existing one has the configured storage.
async fn ensure_streams(js: &jetstream::Context, c: &NatsConfig, limit: usize) -> Result<()> {
    let main = stream::Config {
        name: c.stream.clone(),
        subjects: vec![format!("{}.>", c.subject_prefix)],
        storage: c.storage.of_stream(),
        retention: stream::RetentionPolicy::Interest,
        max_age: c.max_age,
        duplicate_window: c.duplicate_window,
        num_replicas: c.replicas,
        max_message_size: i32::try_from(limit).unwrap_or(i32::MAX),
        ..Default::default()
    };
    let dead = stream::Config {
        name: dead_letter_stream(c),
        subjects: vec![format!("{}-dead.>", c.subject_prefix)],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        max_age: c.max_age,
        num_replicas: c.replicas,
        ..Default::default()
    };
    // Dead letters stay on file whatever the main stream's storage: they wait for a person.
    for config in [main, dead] {
        let name = config.name.clone();
        let wanted = config.storage;
        let stream =
            js.get_or_create_stream(config).await.map_err(|e| Error::Unavailable(format!("stream {name}: {e}")))?;
        let found = stream.cached_info().config.storage;
        if found != wanted {
            return Err(Error::Invalid(format!(
                "stream {name} exists with {} storage, not {} as configured; JetStream cannot change a \
                 stream's storage: configure {} or delete the stream",
                storage_name(found),
                storage_name(wanted),
                storage_name(found),
            )));
        }
    }
    Ok(())
}

fn dead_letter_stream(c: &NatsConfig) -> String {
    format!("{}_DEAD", c.stream)
}

fn storage_name(storage: stream::StorageType) -> &'static str {
    match storage {
        stream::StorageType::File => "file",
        stream::StorageType::Memory => "memory",
    }
}

/// Topics are subject tokens joined by dots: no empty token, no wildcard, no whitespace.
fn check_topic(topic: &str) -> Result<()> {
    let bad = topic.is_empty()
        || topic.split('.').any(|t| t.is_empty() || t == "*" || t == ">")
        || topic.chars().any(|c| c.is_whitespace() || c.is_control());
    if bad {
        return Err(Error::Invalid(format!("topic {topic:?} is not a NATS subject")));
    }
    Ok(())
}

fn check_name(what: &str, name: &str) -> Result<()> {
    if name.is_empty() || name.contains(['.', '*', '>', ' ', '\t', '/', '\\']) {
        return Err(Error::Invalid(format!("{what} {name:?} is not a valid NATS name")));
    }
    Ok(())
}

/// The durable consumer of a group on a topic. Consumer names may not hold dots, so both are
/// sanitized for reading and a stable hash of the exact pair keeps distinct pairs apart.
fn durable_name(group: &str, topic: &str) -> String {
    let clean = |s: &str| -> String {
        s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).take(48).collect()
    };
    format!("{}--{}--{:016x}", clean(group), clean(topic), fnv1a(&[group, topic]))
}

/// FNV-1a over the parts, each followed by a zero byte: stable across Rust releases, unlike
/// `DefaultHasher`, because the name must stay the same across restarts and versions.
fn fnv1a(parts: &[&str]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in part.bytes().chain(std::iter::once(0)) {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    hash
}
