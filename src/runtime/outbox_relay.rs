//! Publishes committed outbox rows to the broker. The fast path publishes straight from memory:
//! a partition hands the rows of each commit to the relay right after the commit. The store's
//! outbox table is the safety net: a sweep deletes rows already published and publishes rows that
//! stayed unpublished for a whole sweep interval (a crash between commit and publish, a publish
//! that failed, rows left by a previous process). A row may thus be published twice; consumers
//! deduplicate by CloudEvent id. Advisory messages (rejections, offers) come without rows and are
//! published once, best effort. Derived messages (awards, notifications) come without rows too:
//! they are published until the broker takes them, and only then may the partition's checkpoint
//! pass their commit, since a restart sends again those of the runs after the checkpoint.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use capstan_brokers::Message;
use capstan_proto::{CloudEvent, topics};
use capstan_store::{OutboxMessage, OutboxRow};
use tokio::sync::{mpsc, watch};
use tracing::warn;

use super::Shared;
use super::faults::FaultPoint;

/// What a commit hands the relay.
#[derive(Default)]
pub struct Outgoing {
    /// Messages whose outbox rows the commit wrote: the sweep deletes a row once its message
    /// was published.
    pub stored: Vec<Message>,
    /// Messages without rows (`codec::is_advisory`): published once, best effort.
    pub advisory: Vec<Message>,
    /// Messages without rows that a restart derives again (`codec::is_derived`): published
    /// until the broker takes them.
    pub derived: Vec<Message>,
    /// The partition and its hold number (`Deferred::hold`), when `derived` is not empty: once
    /// they are published, the partition's checkpoint may pass the events they come from.
    pub held: Option<(usize, u64)>,
}

impl Outgoing {
    /// Whether there is nothing to publish.
    pub fn is_empty(&self) -> bool {
        self.stored.is_empty() && self.advisory.is_empty() && self.derived.is_empty()
    }
}

/// How often the table is swept.
const SWEEP_EVERY: Duration = Duration::from_millis(500);
/// The first and the longest wait before publishing derived messages again.
const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// Publishes until shutdown.
pub async fn run(
    shared: Arc<Shared>,
    batch: usize,
    mut committed: mpsc::UnboundedReceiver<Outgoing>,
    mut shutdown: watch::Receiver<bool>,
) {
    // Ids published from memory whose rows are not yet deleted.
    let mut published: HashSet<String> = HashSet::new();
    // Rows seen unpublished by the previous sweep: published by the next one if still there.
    let mut stale: HashSet<i64> = HashSet::new();
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            out = committed.recv() => {
                let Some(Outgoing { stored: mut msgs, mut advisory, mut derived, held }) = out else { return };
                let mut holds: Vec<(usize, u64)> = held.into_iter().collect();
                // Take whatever else is queued: one broker round trip for many commits.
                while msgs.len() + advisory.len() + derived.len() < batch {
                    match committed.try_recv() {
                        Ok(more) => {
                            msgs.extend(more.stored);
                            advisory.extend(more.advisory);
                            derived.extend(more.derived);
                            holds.extend(more.held);
                        }
                        Err(_) => break,
                    }
                }
                // Only stored messages leave rows for the sweep to delete.
                let ids: Vec<String> = msgs.iter().map(|m| m.event.id.clone()).collect();
                msgs.append(&mut advisory);
                let first_derived = msgs.len();
                msgs.append(&mut derived);
                // Derived messages have no row to fall back on: retry them until the broker
                // takes them (or shutdown, after which a restart derives them again). Later
                // commits wait meanwhile, so each partition's messages are released in order.
                // Only they are sent again: stored ones fall back on the sweep, and advisory
                // ones are sent once.
                let sent = match shared.broker.packs() {
                    _ if msgs.is_empty() => Sent::First,
                    true => publish_lent(&shared, msgs, first_derived, &mut shutdown).await,
                    false => publish_owned(&shared, msgs, first_derived, &mut shutdown).await,
                };
                match sent {
                    Sent::First => published.extend(ids),
                    Sent::Retried => {}
                    Sent::ShutDown => return,
                }
                release(&shared, holds);
            }
            _ = sweep.tick() => {
                sweep_table(&shared, batch, &mut published, &mut stale).await;
            }
            _ = shutdown.changed() => return,
        }
    }
}

/// Tells the partitions that the derived messages of these holds are published.
fn release(shared: &Shared, holds: Vec<(usize, u64)>) {
    for (partition, hold) in holds {
        if let Some(mark) = shared.relayed.get(partition) {
            mark.fetch_max(hold, Ordering::Release);
        }
    }
}

/// Deletes rows published from memory; publishes rows that were already pending last time.
async fn sweep_table(shared: &Shared, batch: usize, published: &mut HashSet<String>, stale: &mut HashSet<i64>) {
    loop {
        let rows = match shared.store.outbox_pending(batch).await {
            Ok(rows) => rows,
            Err(e) => {
                warn!(error = %e, "reading the outbox failed; retrying at the next sweep");
                return;
            }
        };
        let full = rows.len() == batch;
        let mut done = Vec::new();
        let mut late: Vec<OutboxRow> = Vec::new();
        let mut still: HashSet<i64> = HashSet::new();
        for row in rows {
            if published.remove(&row.message.id) {
                done.push(row.seq);
            } else if stale.contains(&row.seq) {
                late.push(row);
            } else {
                still.insert(row.seq);
            }
        }
        if !late.is_empty() {
            let seqs: HashMap<String, i64> = late.iter().map(|r| (r.message.id.clone(), r.seq)).collect();
            if publish_once(shared, decode(late.into_iter().map(|r| r.message))).await {
                done.extend(seqs.into_values());
            }
        }
        if !done.is_empty()
            && let Err(e) = shared.store.outbox_delete(&done).await
        {
            warn!(error = %e, "deleting published outbox rows failed; they will be published again");
        }
        *stale = still;
        // A full page means more rows wait; an unchanged page (nothing deleted) means the rest
        // is for the next sweep.
        if !full || done.is_empty() {
            return;
        }
    }
}

/// The messages of outbox rows read from the table.
fn decode(rows: impl Iterator<Item = OutboxMessage>) -> Vec<Message> {
    let mut messages = Vec::new();
    for row in rows {
        match CloudEvent::from_json(&row.payload) {
            Ok(event) => messages.push(Message { topic: row.topic, key: row.key, event }),
            // Written by us, so unreadable only through corruption: drop it loudly rather than
            // block every later message.
            Err(e) => warn!(error = %e, id = %row.id, "unreadable outbox row dropped"),
        }
    }
    messages
}

/// What became of a relay round's messages.
enum Sent {
    /// The broker took them all at once.
    First,
    /// It refused them, then took the derived ones when they were sent again (if any).
    Retried,
    /// Shut down while sending derived messages again.
    ShutDown,
}

/// Sends a round over a broker that packs: everything but queue offers in packs (see
/// `Broker::publish_packed`), all of it lent, so that the derived messages (those from
/// `first_derived` on) can be sent again without a copy.
async fn publish_lent(
    shared: &Shared,
    messages: Vec<Message>,
    first_derived: usize,
    shutdown: &mut watch::Receiver<bool>,
) -> Sent {
    let count = messages.len();
    let split = Split::new(messages, first_derived);
    if published(shared, send_lent(shared, &split.queued, &split.packable).await, count).await {
        return Sent::First;
    }
    let (queued, packable) = split.derived();
    if queued.is_empty() && packable.is_empty() {
        return Sent::Retried;
    }
    let again = queued.len() + packable.len();
    retry(shutdown, || async move { published(shared, send_lent(shared, queued, packable).await, again).await }).await
}

/// A round split for a broker that packs: its queue offers and the rest, each in the round's
/// order, so that the derived messages come last in both.
struct Split {
    queued: Vec<Message>,
    packable: Vec<Message>,
    queued_derived: usize,
    packable_derived: usize,
}

impl Split {
    fn new(messages: Vec<Message>, first_derived: usize) -> Self {
        let mut split = Split { queued: Vec::new(), packable: Vec::new(), queued_derived: 0, packable_derived: 0 };
        for (i, m) in messages.into_iter().enumerate() {
            let derived = usize::from(i >= first_derived);
            if topics::is_queue(&m.topic) {
                split.queued_derived += derived;
                split.queued.push(m);
            } else {
                split.packable_derived += derived;
                split.packable.push(m);
            }
        }
        split
    }

    /// The derived messages: the queued ones, and the ones for packs.
    fn derived(&self) -> (&[Message], &[Message]) {
        (
            &self.queued[self.queued.len() - self.queued_derived..],
            &self.packable[self.packable.len() - self.packable_derived..],
        )
    }
}

/// Sends stored messages once (the sweep's): `false` when the broker refused them.
async fn publish_once(shared: &Shared, messages: Vec<Message>) -> bool {
    let count = messages.len();
    let sent = match shared.broker.packs() {
        true => {
            let split = Split::new(messages, count);
            send_lent(shared, &split.queued, &split.packable).await
        }
        false => shared.broker.publish(messages).await,
    };
    published(shared, sent, count).await
}

/// Queue offers alone, the rest in packs, at the same time.
async fn send_lent(shared: &Shared, queued: &[Message], packable: &[Message]) -> capstan_brokers::Result<()> {
    let queued = async {
        match queued.is_empty() {
            true => Ok(()),
            false => shared.broker.publish_lent(queued).await,
        }
    };
    let packed = async {
        match packable.is_empty() {
            true => Ok(()),
            false => shared.broker.publish_packed(packable).await,
        }
    };
    let (queued, packed) = tokio::join!(queued, packed);
    queued.and(packed)
}

/// Sends a round over a broker that does not pack. The broker takes the messages, so the
/// derived ones (from `first_derived` on) are copied first, for a retry.
async fn publish_owned(
    shared: &Shared,
    messages: Vec<Message>,
    first_derived: usize,
    shutdown: &mut watch::Receiver<bool>,
) -> Sent {
    let again = messages[first_derived..].to_vec();
    let count = messages.len();
    if published(shared, shared.broker.publish(messages).await, count).await {
        return Sent::First;
    }
    if again.is_empty() {
        return Sent::Retried;
    }
    let again = &again;
    retry(shutdown, || async move { published(shared, shared.broker.publish(again.clone()).await, again.len()).await })
        .await
}

/// Calls `send` after a wait that doubles each time, until it succeeds (`Sent::Retried`) or the
/// relay shuts down.
async fn retry<F: Future<Output = bool>>(shutdown: &mut watch::Receiver<bool>, mut send: impl FnMut() -> F) -> Sent {
    let mut backoff = RETRY_FIRST;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return Sent::ShutDown,
        }
        if send().await {
            return Sent::Retried;
        }
        backoff = (backoff * 2).min(RETRY_MAX);
    }
}

/// Counts a publish that succeeded; logs one that failed.
async fn published(shared: &Shared, published: capstan_brokers::Result<()>, count: usize) -> bool {
    if let Err(e) = published {
        warn!(error = %e, "publishing the outbox failed; the sweep will retry");
        return false;
    }
    shared.faults.point(FaultPoint::AfterPublish).await;
    shared.metrics.published.fetch_add(count as u64, Ordering::Relaxed);
    true
}
