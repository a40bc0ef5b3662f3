//! Kafka subscriptions: a reader task per subscription polls the consumer all the time (so group
//! rebalances proceed even while the application is busy), decodes records, dead-letters the
//! undecodable ones, holds back records whose `capstan-not-before` lies ahead, and commits what
//! acks freed. [`KafkaSubscription::next`] hands out what the reader queued.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers, Message as _};
use rdkafka::producer::Producer;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, error, warn};

use super::binding::{self, DEAD_LETTER_ORIGIN, DEAD_LETTER_REASON, NOT_BEFORE, REDELIVERIES, Record};
use super::tracker::Tracker;
use super::{Outgoing, Shared, client_config, unavailable};
use crate::{Delivery, Error, Message, Result, Subscription, SubscriptionMode};
use acker::KafkaAcker;

mod acker;

/// Records read ahead of the application before the reader pauses fetching.
const READ_AHEAD: usize = 1000;

/// A decoded record on its way to the application.
struct Incoming {
    message: Message,
    partition: i32,
    offset: i64,
    generation: u64,
    /// Deliveries before this one, as counted in the record's header.
    redeliveries: u32,
}

/// State shared by the reader, the subscription, the rebalance callbacks and the ackers.
struct State {
    tracker: Mutex<Tracker>,
    /// Delivered to the application and not yet settled, by (partition, offset): what a dropped
    /// subscription hands back to its group. Kept here because Kafka has no per-record redelivery
    /// and some brokers (Tansu) drop the commit metadata that would otherwise count it.
    outstanding: Mutex<HashMap<(i32, i64), (Message, u32)>>,
    /// Broadcast nacks come back to this subscriber's reader (no other subscriber wants them).
    retry: mpsc::UnboundedSender<(Instant, Incoming)>,
}

impl State {
    fn tracker(&self) -> std::sync::MutexGuard<'_, Tracker> {
        self.tracker.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn outstanding(&self) -> std::sync::MutexGuard<'_, HashMap<(i32, i64), (Message, u32)>> {
        self.outstanding.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn settle(&self, partition: i32, offset: i64, generation: u64) {
        self.outstanding().remove(&(partition, offset));
        self.tracker().settle(partition, offset, generation);
    }
}

/// Rebalance callbacks: keep the tracker in step with the assignment.
struct Context {
    state: Arc<State>,
    shared: Arc<Shared>,
    assigned: watch::Sender<u64>,
    request_timeout: Duration,
}

impl ClientContext for Context {}

impl ConsumerContext for Context {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance {
            let revoked: Vec<i32> = list.elements().iter().map(|e| e.partition()).collect();
            // What the application holds from these partitions goes back to the group counted
            // as a redelivery (the new owner cannot tell otherwise where commit metadata is
            // dropped, as Tansu does). The callback is synchronous, hence block_on; the send
            // waits on librdkafka's own threads.
            let copies = take_outstanding(&self.state, |p| revoked.contains(&p));
            if !copies.is_empty() {
                let count = copies.len();
                match futures::executor::block_on(hand_back(&self.shared, &self.state, copies)) {
                    Ok(()) => debug!(count, "handed back unsettled deliveries of revoked partitions"),
                    Err(e) => warn!(error = %e, "handing back unsettled deliveries failed"),
                }
            }
            // Commit now, while the partitions are still ours, so the next owner sees how far
            // this member delivered. Asynchronously: librdkafka completes an assignment change
            // (and a close) only once outstanding commits are answered, while a synchronous
            // commit waits without a bound, on the thread polling the consumer, for a broker that
            // may be gone.
            let commits = self.state.tracker().take_commits();
            if let Some(tpl) = commit_list(list.elements().first().map(|e| e.topic()), &commits)
                && let Err(e) = consumer.commit(&tpl, CommitMode::Async)
            {
                debug!(error = %e, "commit before revocation failed");
            }
            self.state.tracker().revoke(list.elements().iter().map(|e| e.partition()));
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(list) => {
                let committed = consumer.committed_offsets((*list).clone(), self.request_timeout);
                let partitions: Vec<(i32, Option<String>)> = match &committed {
                    Ok(c) => c.elements().iter().map(|e| (e.partition(), Some(e.metadata().to_string()))).collect(),
                    Err(e) => {
                        // Without the metadata a redelivery may be reported as a first delivery;
                        // the at-least-once guarantee does not depend on it.
                        warn!(error = %e, "reading committed offsets failed");
                        list.elements().iter().map(|e| (e.partition(), None)).collect()
                    }
                };
                debug!(partitions = partitions.len(), "assigned");
                self.state.tracker().assign(partitions);
                self.assigned.send_modify(|n| *n += 1);
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => warn!(error = %e, "rebalance failed"),
        }
    }
}

/// Subscribes and waits until the subscription is really in place (partitions assigned).
pub(super) async fn subscribe(
    shared: Arc<Shared>,
    topic: &str,
    mode: SubscriptionMode,
) -> Result<Box<dyn Subscription>> {
    let (retry, retry_rx) = mpsc::unbounded_channel();
    let state = Arc::new(State { tracker: Mutex::default(), outstanding: Mutex::default(), retry });
    let (assigned, mut assigned_rx) = watch::channel(0);
    let config = &shared.config;
    let competing = matches!(mode, SubscriptionMode::Competing { .. });
    let group = match &mode {
        // Kafka group ids are cluster-wide, Capstan's groups are per topic.
        SubscriptionMode::Competing { group } => format!("capstan.{topic}.{group}"),
        // Never joined: broadcast assigns partitions itself. librdkafka still wants an id.
        SubscriptionMode::Broadcast => format!("capstan-broadcast-{}", unique()),
    };
    let context = Context {
        state: Arc::clone(&state),
        shared: Arc::clone(&shared),
        assigned,
        request_timeout: config.request_timeout,
    };
    let consumer: StreamConsumer<Context> = client_config(config)
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // A partition nobody committed is read from its start: what a dead member never committed
        // must reach the next one. Broadcast starts at explicit offsets and falls back to the
        // start only when the topic was created again (broker restart).
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", config.session_timeout.as_millis().to_string())
        .set("heartbeat.interval.ms", config.heartbeat_interval.as_millis().to_string())
        .set("fetch.wait.max.ms", "100")
        .create_with_context(context)
        .map_err(unavailable)?;
    if competing {
        consumer.subscribe(&[topic]).map_err(unavailable)?;
    } else {
        assign_at_end(&shared, &consumer, topic).await?;
    }
    let (tx, rx) = mpsc::channel(64);
    let (shutdown, shutdown_rx) = oneshot::channel();
    let reader = Reader {
        shared: Arc::clone(&shared),
        state: Arc::clone(&state),
        topic: topic.to_string(),
        competing,
        ready: VecDeque::new(),
        held: Vec::new(),
        paused: false,
    };
    tokio::spawn(reader.run(consumer, tx, retry_rx, shutdown_rx));
    if competing {
        let wait = assigned_rx.wait_for(|n| *n > 0);
        match tokio::time::timeout(shared.config.assignment_timeout, wait).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return Err(Error::Closed),
            Err(_) => {
                return Err(Error::Unavailable(format!(
                    "group {group} assigned no partitions of {topic} within {:?}",
                    shared.config.assignment_timeout
                )));
            }
        }
    }
    Ok(Box::new(KafkaSubscription { rx, state, shared, competing, _shutdown: shutdown }))
}

/// Assigns every partition of `topic` at its current end (high watermark).
async fn assign_at_end(shared: &Shared, consumer: &StreamConsumer<Context>, topic: &str) -> Result<()> {
    let client = shared.producer();
    let (name, timeout) = (topic.to_string(), shared.config.request_timeout);
    let ends = tokio::task::spawn_blocking(move || -> Result<Vec<(i32, i64)>, KafkaError> {
        let metadata = client.client().fetch_metadata(Some(&name), timeout)?;
        let mut ends = Vec::new();
        for t in metadata.topics() {
            for p in t.partitions() {
                let (_, high) = client.client().fetch_watermarks(&name, p.id(), timeout)?;
                ends.push((p.id(), high));
            }
        }
        Ok(ends)
    })
    .await
    .map_err(|e| Error::Unavailable(e.to_string()))?
    .map_err(unavailable)?;
    if ends.is_empty() {
        return Err(Error::Unavailable(format!("topic {topic} has no partitions")));
    }
    let mut tpl = TopicPartitionList::new();
    for (partition, high) in ends {
        tpl.add_partition_offset(topic, partition, Offset::Offset(high)).map_err(unavailable)?;
    }
    consumer.assign(&tpl).map_err(unavailable)
}

/// The reader task of one subscription.
struct Reader {
    shared: Arc<Shared>,
    state: Arc<State>,
    topic: String,
    competing: bool,
    /// Decoded, due, waiting for room in the channel.
    ready: VecDeque<Incoming>,
    /// Not to be delivered before the instant (not-before header, broadcast nack).
    held: Vec<(Instant, Incoming)>,
    paused: bool,
}

impl Reader {
    async fn run(
        mut self,
        consumer: StreamConsumer<Context>,
        tx: mpsc::Sender<Incoming>,
        mut retry: mpsc::UnboundedReceiver<(Instant, Incoming)>,
        mut shutdown: oneshot::Receiver<()>,
    ) {
        let mut commit_tick = tokio::time::interval(self.shared.config.commit_interval);
        loop {
            let due = self.held.iter().map(|(at, _)| *at).min();
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                permit = tx.reserve(), if !self.ready.is_empty() => {
                    let Ok(permit) = permit else { break };
                    if let Some(item) = self.ready.pop_front() {
                        permit.send(item);
                    }
                }
                Some(item) = retry.recv() => self.held.push(item),
                _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => self.release_due(),
                _ = commit_tick.tick(), if self.competing => self.commit(&consumer),
                received = consumer.recv() => {
                    let raw = received.map(|m| Raw::from(&m));
                    match raw {
                        Ok(raw) => self.on_record(raw, &mut shutdown).await,
                        Err(e) => self.on_error(e, &consumer).await,
                    }
                }
            }
            self.flow_control(&consumer);
        }
        if self.competing {
            let copies = take_outstanding(&self.state, |_| true);
            if let Err(e) = hand_back(&self.shared, &self.state, copies).await {
                // Uncommitted, they still reach the group, only not counted as redeliveries.
                warn!(topic = self.topic, error = %e, "handing back unsettled deliveries failed");
            }
            // Asynchronously, for the reason given in `pre_rebalance`; closing waits for it.
            self.commit(&consumer);
        }
        // Closing sends the last commit and leaves the group cleanly (the others rebalance at
        // once), but blocks, for as long as the broker takes to answer. A thread of its own, not
        // tokio's blocking pool: a runtime that shuts down waits for that pool, and must not wait
        // on a broker that is gone.
        let closer = std::thread::Builder::new().name("kafka-close".into()).spawn(move || drop(consumer));
        if let Err(e) = closer {
            warn!(topic = self.topic, error = %e, "no thread to close the consumer on");
        }
    }

    fn commit(&self, consumer: &StreamConsumer<Context>) {
        let commits = self.state.tracker().take_commits();
        // A lost commit only means those records come again.
        if let Some(tpl) = commit_list(Some(&self.topic), &commits)
            && let Err(e) = consumer.commit(&tpl, CommitMode::Async)
        {
            debug!(topic = self.topic, error = %e, "commit failed");
        }
    }

    async fn on_record(&mut self, raw: Raw, shutdown: &mut oneshot::Receiver<()>) {
        let generation = self.state.tracker().generation();
        if self.competing && !self.state.tracker().read(raw.partition, raw.offset, generation) {
            return;
        }
        match binding::decode(&raw.record) {
            Ok(event) => {
                let redeliveries = raw.record.number(REDELIVERIES).map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX));
                let not_before = raw.record.number(NOT_BEFORE).and_then(instant_of_unix_ms);
                let item = Incoming {
                    message: Message { topic: self.topic.clone(), key: raw.key, event },
                    partition: raw.partition,
                    offset: raw.offset,
                    generation,
                    redeliveries,
                };
                match not_before {
                    Some(at) => self.held.push((at, item)),
                    None => self.ready.push_back(item),
                }
            }
            // Dead-lettering from the dead-letter topic itself would loop forever.
            Err(reason) if self.topic == self.shared.config.dead_letter_topic => {
                warn!(offset = raw.offset, reason, "undecodable record on the dead-letter topic, skipped");
                self.settle_now(raw.partition, raw.offset);
            }
            Err(reason) => self.dead_letter(raw, reason, shutdown).await,
        }
    }

    /// Sends an undecodable record to the dead-letter topic, retrying until it is confirmed (it
    /// must not vanish), then settles it so the partition moves on.
    async fn dead_letter(&mut self, raw: Raw, reason: String, shutdown: &mut oneshot::Receiver<()>) {
        warn!(topic = self.topic, partition = raw.partition, offset = raw.offset, reason, "dead-lettering a record");
        let origin = (self.topic.as_str(), raw.partition, raw.offset);
        let out = dead_letter_of(&self.shared, raw.record.clone(), &raw.key, origin, &reason);
        loop {
            let sent = self.shared.send(vec![out.clone()]).await;
            match sent {
                Ok(()) => break,
                Err(e) => error!(error = %e, "dead-letter publish failed; retrying"),
            }
            tokio::select! {
                _ = &mut *shutdown => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        self.settle_now(raw.partition, raw.offset);
    }

    fn settle_now(&self, partition: i32, offset: i64) {
        if self.competing {
            let generation = self.state.tracker().generation();
            self.state.settle(partition, offset, generation);
        }
    }

    async fn on_error(&mut self, e: KafkaError, consumer: &StreamConsumer<Context>) {
        warn!(topic = self.topic, error = %e, "consumer error");
        if e.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition) {
            // The broker lost the topic (memory storage restarted): create it again so the group
            // can carry on with new messages.
            if let Err(e) = self.shared.ensure_topic(&self.topic, true).await {
                warn!(topic = self.topic, error = %e, "could not create the topic again");
            } else if !self.competing {
                // Broadcast offsets pointed into the lost topic; the new one holds only messages
                // published since, so read it from its start.
                self.assign_from_start(consumer);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    fn assign_from_start(&self, consumer: &StreamConsumer<Context>) {
        let mut tpl = TopicPartitionList::new();
        for p in 0..self.shared.config.partitions {
            if let Err(e) = tpl.add_partition_offset(&self.topic, p, Offset::Beginning) {
                warn!(error = %e, "bad partition");
            }
        }
        if let Err(e) = consumer.assign(&tpl) {
            warn!(topic = self.topic, error = %e, "re-assigning after topic loss failed");
        }
    }

    fn release_due(&mut self) {
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = self.held.drain(..).partition(|(at, _)| *at <= now);
        self.held = later;
        self.ready.extend(due.into_iter().map(|(_, item)| item));
    }

    /// Pauses fetching while the application lags far behind, resumes when it caught up.
    fn flow_control(&mut self, consumer: &StreamConsumer<Context>) {
        let want_pause = self.ready.len() >= READ_AHEAD;
        let want_resume = self.paused && self.ready.len() < READ_AHEAD / 4;
        if (want_pause && !self.paused) || want_resume {
            let result =
                consumer.assignment().and_then(|a| if want_resume { consumer.resume(&a) } else { consumer.pause(&a) });
            match result {
                Ok(()) => self.paused = !want_resume,
                Err(e) => debug!(error = %e, "pause/resume failed"),
            }
        }
    }
}

/// The dead letter of a record: value and headers unchanged, plus the reason and the origin
/// (`topic/partition/offset`) headers, for the dead-letter topic under the record's key.
fn dead_letter_of(shared: &Shared, mut record: Record, key: &str, origin: (&str, i32, i64), reason: &str) -> Outgoing {
    let (topic, partition, offset) = origin;
    record.headers.push((DEAD_LETTER_REASON.into(), reason.as_bytes().to_vec()));
    record.headers.push((DEAD_LETTER_ORIGIN.into(), format!("{topic}/{partition}/{offset}").into_bytes()));
    Outgoing { topic: shared.config.dead_letter_topic.clone(), key: key.to_string(), record }
}

/// A record copied out of librdkafka's buffer.
struct Raw {
    partition: i32,
    offset: i64,
    key: String,
    record: Record,
}

impl From<&BorrowedMessage<'_>> for Raw {
    fn from(m: &BorrowedMessage<'_>) -> Self {
        let headers = m
            .headers()
            .map(|h| h.iter().map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec())).collect())
            .unwrap_or_default();
        Raw {
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_default(),
            record: Record { value: m.payload().map(<[u8]>::to_vec), headers },
        }
    }
}

/// The application's end of a subscription.
struct KafkaSubscription {
    rx: mpsc::Receiver<Incoming>,
    state: Arc<State>,
    shared: Arc<Shared>,
    competing: bool,
    /// Dropping the subscription drops this, which stops the reader (commit, leave the group).
    _shutdown: oneshot::Sender<()>,
}

#[async_trait]
impl Subscription for KafkaSubscription {
    async fn next(&mut self) -> Result<Delivery> {
        loop {
            let item = self.rx.recv().await.ok_or(Error::Closed)?;
            let mut redeliveries = item.redeliveries;
            if self.competing {
                match self.state.tracker().deliver(item.partition, item.offset, item.generation) {
                    // The partition went to another member meanwhile; it will deliver this.
                    None => continue,
                    Some(by_previous_owner) => redeliveries += u32::from(by_previous_owner),
                }
                let entry = (item.message.clone(), redeliveries);
                self.state.outstanding().insert((item.partition, item.offset), entry);
            }
            let message = Arc::new(item.message.clone());
            let acker = KafkaAcker {
                state: Arc::downgrade(&self.state),
                shared: Arc::clone(&self.shared),
                item: Incoming { redeliveries, ..item },
                competing: self.competing,
                settled: AtomicBool::new(false),
            };
            return Ok(Delivery { message, redeliveries, acker: Box::new(acker) });
        }
    }
}

/// Unsettled deliveries of the partitions `which` selects, removed from the outstanding set.
type Held = Vec<((i32, i64), (Message, u32))>;

fn take_outstanding(state: &State, which: impl Fn(i32) -> bool) -> Held {
    let mut outstanding = state.outstanding();
    let keys: Vec<(i32, i64)> = outstanding.keys().filter(|(p, _)| which(*p)).copied().collect();
    keys.into_iter().filter_map(|k| outstanding.remove(&k).map(|v| (k, v))).collect()
}

/// Re-publishes unsettled deliveries counted as a redelivery and settles the originals, so the
/// group gets them at once, and counted, when their holder goes away.
async fn hand_back(shared: &Shared, state: &State, held: Held) -> Result<()> {
    if held.is_empty() {
        return Ok(());
    }
    let copies = held
        .iter()
        .map(|(_, (m, redeliveries))| {
            let mut record = binding::encode(&m.event);
            record.headers.push((REDELIVERIES.into(), (redeliveries + 1).to_string().into_bytes()));
            Outgoing { topic: m.topic.clone(), key: m.key.clone(), record }
        })
        .collect();
    shared.send(copies).await?;
    let mut tracker = state.tracker();
    let generation = tracker.generation();
    for ((partition, offset), _) in held {
        tracker.settle(partition, offset, generation);
    }
    Ok(())
}

/// The commits as a partition list for `topic`.
fn commit_list(topic: Option<&str>, commits: &[super::tracker::Commit]) -> Option<TopicPartitionList> {
    let topic = topic?;
    if commits.is_empty() {
        return None;
    }
    let mut tpl = TopicPartitionList::new();
    for c in commits {
        if tpl.add_partition_offset(topic, c.partition, Offset::Offset(c.position)).is_err() {
            continue;
        }
        if let Some(mut e) = tpl.find_partition(topic, c.partition) {
            e.set_metadata(c.metadata.clone());
        }
    }
    Some(tpl)
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Unix milliseconds rounded up, for a not-before time: rounding down would let a delayed
/// redelivery come up to a millisecond before its delay passed.
fn unix_ms_ceil(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        if d.subsec_nanos() % 1_000_000 == 0 { ms } else { ms.saturating_add(1) }
    })
}

/// The instant for a unix-millisecond time, if it lies in the future (measured against the
/// clock's full precision, not whole milliseconds).
fn instant_of_unix_ms(ms: u64) -> Option<Instant> {
    let at = UNIX_EPOCH + Duration::from_millis(ms);
    at.duration_since(SystemTime::now()).ok().filter(|d| !d.is_zero()).map(|d| Instant::now() + d)
}

/// A process-unique suffix for broadcast group ids.
fn unique() -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{}-{}-{n}", std::process::id(), unix_ms(SystemTime::now()))
}

#[cfg(test)]
mod clock_tests {
    use super::*;

    #[test]
    fn a_not_before_time_never_lies_before_the_delay() {
        let whole = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        assert_eq!(unix_ms_ceil(whole), 1_700_000_000_123);
        for nanos in [1, 999_999, 500_000] {
            let t = whole + Duration::from_nanos(nanos);
            assert_eq!(unix_ms_ceil(t), 1_700_000_000_124, "{nanos} ns past a millisecond");
            assert!(UNIX_EPOCH + Duration::from_millis(unix_ms_ceil(t)) >= t);
        }
    }

    #[test]
    fn the_instant_of_a_not_before_time_keeps_sub_millisecond_precision() {
        assert_eq!(instant_of_unix_ms(unix_ms(SystemTime::now()).saturating_sub(1)), None, "past");
        let before = Instant::now();
        let requested = SystemTime::now() + Duration::from_millis(400);
        let at = instant_of_unix_ms(unix_ms_ceil(requested)).expect("in the future");
        // Both clocks are read after `before`, so the instant lies at least the delay after it;
        // the slack only absorbs the two clocks' rates differing over the microseconds between
        // reads. Whole-millisecond rounding would come up to a millisecond early.
        let earliest = before + Duration::from_millis(400) - Duration::from_micros(20);
        assert!(at >= earliest, "{:?} early", earliest.saturating_duration_since(at));
    }
}
