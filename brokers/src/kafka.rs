//! Kafka (and Kafka-protocol brokers such as Tansu) as a [`Broker`], through rdkafka.
//!
//! - Topology: each topic is created on first use through the admin API with
//!   [`KafkaConfig::partitions`] partitions ("already exists" is success), again after a broker
//!   that lost it (memory storage restarted) refuses a send.
//! - Publish: an idempotent producer with `acks=all`; all records are queued, then every delivery
//!   report is awaited. The record key is the message key (the run id): one key, one partition,
//!   publish order.
//! - `Competing { group }`: a Kafka consumer group, offsets committed by hand and only up to the
//!   lowest unsettled offset of each partition. `nack(delay)` re-publishes the message (same key,
//!   `capstan-redeliveries` + 1, `capstan-not-before`) and settles the original: Kafka has no
//!   per-message redelivery.
//! - `Broadcast`: no group at all; the subscriber is assigned every partition at its current end,
//!   so it sees exactly what is published after `subscribe` returns.
//! - Records follow the CloudEvents Kafka binding (binary mode out, binary or structured in);
//!   records that are no CloudEvent go to [`KafkaConfig::dead_letter_topic`] with the reason.

mod binding;
mod subscription;
#[cfg(test)]
mod tests;
mod tracker;

use std::collections::HashSet;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tracing::{debug, warn};

use crate::{Broker, Error, Message, Result, Subscription, SubscriptionMode};
use binding::Record;

/// How to reach the Kafka cluster and how to use it.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// `bootstrap.servers`, e.g. `127.0.0.1:9092`.
    pub bootstrap: String,
    /// Partitions of every topic Capstan creates: the most members a group can keep busy.
    pub partitions: i32,
    /// Consumer group session timeout: how long a silent member keeps its partitions.
    pub session_timeout: Duration,
    /// Consumer group heartbeat interval (well under `session_timeout`).
    pub heartbeat_interval: Duration,
    /// Largest record (value plus headers) `publish` accepts; larger is `Error::TooLarge`.
    pub max_message_bytes: usize,
    /// Bound on one broker round trip (admin calls, a delivery report, a commit on close).
    pub request_timeout: Duration,
    /// How long `subscribe` waits for the group to assign partitions to the new member.
    pub assignment_timeout: Duration,
    /// How often a competing subscription commits the offsets its acks freed.
    pub commit_interval: Duration,
    /// Where undecodable records go, with the reason in a header.
    pub dead_letter_topic: String,
}

impl KafkaConfig {
    /// Defaults for a cluster at `bootstrap`.
    pub fn new(bootstrap: impl Into<String>) -> Self {
        KafkaConfig {
            bootstrap: bootstrap.into(),
            partitions: 8,
            session_timeout: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(3),
            max_message_bytes: 1024 * 1024,
            request_timeout: Duration::from_secs(10),
            assignment_timeout: Duration::from_secs(30),
            commit_interval: Duration::from_millis(200),
            dead_letter_topic: "capstan.dead-letter".into(),
        }
    }
}

/// A [`Broker`] on a Kafka cluster. Cheap to clone; clones share the producer.
#[derive(Clone)]
pub struct KafkaBroker {
    shared: Arc<Shared>,
}

/// What the broker, its subscriptions and their ackers share.
pub(crate) struct Shared {
    config: KafkaConfig,
    /// Replaced as a whole when the idempotent producer hits a fatal error (a broker that forgot
    /// the producer id after a restart), since such a producer refuses every later send.
    producer: RwLock<FutureProducer>,
    admin: AdminClient<DefaultClientContext>,
    /// Topics known to exist; forgotten when a send says otherwise.
    topics: Mutex<HashSet<String>>,
}

/// One record to send.
#[derive(Clone)]
pub(crate) struct Outgoing {
    topic: String,
    key: String,
    record: Record,
}

impl KafkaBroker {
    /// Connects, checks that the cluster answers and creates the dead-letter topic.
    pub async fn connect(config: KafkaConfig) -> Result<Self> {
        if config.partitions < 1 || config.max_message_bytes == 0 {
            return Err(Error::Invalid("partitions and max_message_bytes must be positive".into()));
        }
        valid_topic(&config.dead_letter_topic)?;
        let admin = client_config(&config).create().map_err(unavailable)?;
        let producer = RwLock::new(new_producer(&config)?);
        let shared = Arc::new(Shared { config, producer, admin, topics: Mutex::default() });
        let probe = shared.producer();
        let timeout = shared.config.request_timeout;
        tokio::task::spawn_blocking(move || probe.client().fetch_metadata(None, timeout))
            .await
            .map_err(|e| Error::Unavailable(e.to_string()))?
            .map_err(unavailable)?;
        let dead_letter = shared.config.dead_letter_topic.clone();
        shared.ensure_topic(&dead_letter, false).await?;
        Ok(KafkaBroker { shared })
    }

    /// The configuration this broker was connected with.
    pub fn config(&self) -> &KafkaConfig {
        &self.shared.config
    }
}

#[async_trait]
impl Broker for KafkaBroker {
    async fn publish(&self, messages: Vec<Message>) -> Result<()> {
        let mut outgoing = Vec::with_capacity(messages.len());
        // Check every message before sending any, so a refused batch sends nothing.
        for m in messages {
            valid_topic(&m.topic)?;
            let record = binding::encode(&m.event);
            let size = record.size() + m.key.len();
            let limit = self.shared.config.max_message_bytes;
            if size > limit {
                return Err(Error::TooLarge { size, limit });
            }
            outgoing.push(Outgoing { topic: m.topic, key: m.key, record });
        }
        self.shared.send(outgoing).await
    }

    async fn subscribe(&self, topic: &str, mode: SubscriptionMode) -> Result<Box<dyn Subscription>> {
        valid_topic(topic)?;
        self.shared.ensure_topic(topic, false).await?;
        subscription::subscribe(Arc::clone(&self.shared), topic, mode).await
    }

    /// Ignores the credit: a competing group assigns each partition to one member, which gets
    /// its records in order, so a member that stopped reading would hold up its partitions for
    /// the whole group rather than leave their records to another member. The subscriber hands
    /// back what it cannot take (measured: a worker fleet over Kafka that read its queue against
    /// credit stalled, see docs/protocol.md).
    async fn subscribe_with_credit(
        &self,
        topic: &str,
        mode: SubscriptionMode,
        _credit: crate::Credit,
    ) -> Result<Box<dyn Subscription>> {
        self.subscribe(topic, mode).await
    }
}

impl Shared {
    fn producer(&self) -> FutureProducer {
        self.producer.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Creates `topic` unless known to exist; `force` asks the cluster again.
    async fn ensure_topic(&self, topic: &str, force: bool) -> Result<()> {
        {
            let mut known = self.topics.lock().unwrap_or_else(|p| p.into_inner());
            if force {
                known.remove(topic);
            } else if known.contains(topic) {
                return Ok(());
            }
        }
        let new = NewTopic::new(topic, self.config.partitions, TopicReplication::Fixed(1));
        let options = AdminOptions::new().request_timeout(Some(self.config.request_timeout));
        let results = self.admin.create_topics([&new], &options).await.map_err(unavailable)?;
        for result in results {
            match result {
                Ok(_) => debug!(topic, partitions = self.config.partitions, "created topic"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => return Err(Error::Unavailable(format!("creating topic {name}: {code}"))),
            }
        }
        self.topics.lock().unwrap_or_else(|p| p.into_inner()).insert(topic.to_string());
        Ok(())
    }

    /// Sends records and awaits every delivery report. Failed records are sent again (in their
    /// order) after repairing what failed them, until `request_timeout` runs out; the ones that
    /// did arrive may then arrive twice, which consumers absorb by deduplicating on event id.
    async fn send(&self, outgoing: Vec<Outgoing>) -> Result<()> {
        for topic in outgoing.iter().map(|o| o.topic.as_str()).collect::<HashSet<_>>() {
            self.ensure_topic(topic, false).await?;
        }
        let deadline = tokio::time::Instant::now() + self.config.request_timeout * 3;
        let mut pending: Vec<&Outgoing> = outgoing.iter().collect();
        loop {
            let producer = self.producer();
            let mut reports = Vec::with_capacity(pending.len());
            let mut failed: Vec<(&Outgoing, KafkaError)> = Vec::new();
            for &o in &pending {
                loop {
                    match producer.send_result(future_record(o)) {
                        Ok(report) => {
                            reports.push((o, report));
                            break;
                        }
                        // librdkafka's queue is full: wait for it to drain rather than reorder.
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        Err((e, _)) => {
                            failed.push((o, e));
                            break;
                        }
                    }
                }
            }
            for (o, report) in reports {
                match report.await {
                    Ok(Ok(_)) => {}
                    Ok(Err((e, _))) => failed.push((o, e)),
                    Err(_) => failed.push((o, KafkaError::Canceled)),
                }
            }
            let Some((_, last)) = failed.last() else { return Ok(()) };
            let reason = last.to_string();
            if tokio::time::Instant::now() > deadline {
                return Err(Error::Unavailable(format!("{} records not confirmed: {reason}", failed.len())));
            }
            warn!(failed = failed.len(), %reason, "sending again after failed deliveries");
            self.repair(&failed).await;
            pending = failed.into_iter().map(|(o, _)| o).collect();
        }
    }

    /// Fixes what failed a send: the producer is replaced (after a broker restart the old one
    /// keeps retrying under a producer id and metadata the broker forgot, or failed fatally), and
    /// the topics are created again in case the broker lost them.
    async fn repair(&self, failed: &[(&Outgoing, KafkaError)]) {
        if let Some((code, reason)) = self.producer().client().fatal_error() {
            warn!(?code, reason, "the producer failed fatally");
        }
        match new_producer(&self.config) {
            Ok(p) => *self.producer.write().unwrap_or_else(|p| p.into_inner()) = p,
            Err(e) => warn!(error = %e, "could not replace the producer"),
        }
        let topics: HashSet<&str> = failed.iter().map(|(o, _)| o.topic.as_str()).collect();
        for topic in topics {
            if let Err(e) = self.ensure_topic(topic, true).await {
                warn!(topic, error = %e, "could not create the topic again");
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn future_record(o: &Outgoing) -> FutureRecord<'_, str, [u8]> {
    let mut headers = OwnedHeaders::new_with_capacity(o.record.headers.len());
    for (key, value) in &o.record.headers {
        headers = headers.insert(Header { key, value: Some(value.as_slice()) });
    }
    let record = FutureRecord::to(&o.topic).key(o.key.as_str()).headers(headers);
    match &o.record.value {
        Some(value) => record.payload(value.as_slice()),
        None => record,
    }
}

/// The settings every client shares.
fn client_config(config: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.bootstrap)
        .set("socket.timeout.ms", config.request_timeout.as_millis().to_string())
        // A broker that comes back is found within a second; librdkafka's default backs off to
        // 10 s between attempts, which can leave a restarted broker unused for that long.
        .set("reconnect.backoff.max.ms", "1000");
    c
}

fn new_producer(config: &KafkaConfig) -> Result<FutureProducer> {
    // Headroom over the payload limit for the record's framing, so the limit Capstan enforces is
    // the one callers see.
    let max = (config.max_message_bytes + 64 * 1024).max(1_000_000);
    client_config(config)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.max.bytes", max.to_string())
        .set("message.timeout.ms", config.request_timeout.as_millis().to_string())
        .set("linger.ms", "2")
        .create()
        .map_err(unavailable)
}

/// Kafka topic names: 1 to 249 of `[a-zA-Z0-9._-]`, not `.` or `..`.
fn valid_topic(topic: &str) -> Result<()> {
    let ok = !topic.is_empty()
        && topic.len() <= 249
        && topic != "."
        && topic != ".."
        && topic.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok { Ok(()) } else { Err(Error::Invalid(format!("`{topic}` is not a valid Kafka topic name"))) }
}

fn unavailable(e: KafkaError) -> Error {
    Error::Unavailable(e.to_string())
}
