//! Publishes committed outbox rows to the broker. The fast path publishes straight from memory:
//! a partition hands the rows of each commit to the relay right after the commit. The store's
//! outbox table is the safety net: a sweep deletes rows already published and publishes rows that
//! stayed unpublished for a whole sweep interval (a crash between commit and publish, a publish
//! that failed, rows left by a previous process). A row may thus be published twice; consumers
//! deduplicate by CloudEvent id. Advisory messages (rejections) come without rows and are
//! published once, best effort.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use capstan_brokers::Message;
use capstan_proto::CloudEvent;
use capstan_store::{OutboxMessage, OutboxRow};
use tokio::sync::{mpsc, watch};
use tracing::warn;

use super::Shared;
use super::faults::FaultPoint;

/// What a commit hands the relay.
pub struct Outgoing {
    /// Messages whose outbox rows the commit wrote: the sweep deletes a row once its message
    /// was published.
    pub stored: Vec<Message>,
    /// Messages without rows (`codec::is_advisory`): published once, best effort.
    pub advisory: Vec<Message>,
}

/// How often the table is swept.
const SWEEP_EVERY: Duration = Duration::from_millis(500);

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
                let Some(Outgoing { stored: mut msgs, mut advisory }) = out else { return };
                // Take whatever else is queued: one broker round trip for many commits.
                while msgs.len() + advisory.len() < batch {
                    match committed.try_recv() {
                        Ok(more) => {
                            msgs.extend(more.stored);
                            advisory.extend(more.advisory);
                        }
                        Err(_) => break,
                    }
                }
                // Only stored messages leave rows for the sweep to delete.
                let ids: Vec<String> = msgs.iter().map(|m| m.event.id.clone()).collect();
                msgs.append(&mut advisory);
                if publish(&shared, msgs).await {
                    published.extend(ids);
                }
            }
            _ = sweep.tick() => {
                sweep_table(&shared, batch, &mut published, &mut stale).await;
            }
            _ = shutdown.changed() => return,
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
            if publish(shared, decode(late.into_iter().map(|r| r.message))).await {
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

/// Publishes messages; `false` when the broker refused (the sweep publishes them later).
async fn publish(shared: &Shared, messages: Vec<Message>) -> bool {
    let count = messages.len();
    if let Err(e) = shared.broker.publish(messages).await {
        warn!(error = %e, "publishing the outbox failed; the sweep will retry");
        return false;
    }
    shared.faults.point(FaultPoint::AfterPublish).await;
    shared.metrics.published.fetch_add(count as u64, Ordering::Relaxed);
    true
}
