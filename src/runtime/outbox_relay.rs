//! Publishes committed outbox rows to the broker, then deletes them. A crash between publish and
//! delete publishes a row again; consumers deduplicate by CloudEvent id.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use capstan_brokers::Message;
use capstan_proto::CloudEvent;
use tokio::sync::watch;
use tracing::warn;

use super::Shared;
use super::faults::FaultPoint;

/// Publishes until shutdown; wakes on every commit that wrote outbox rows.
pub async fn run(shared: Arc<Shared>, batch: usize, mut shutdown: watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let rows = match shared.store.outbox_pending(batch).await {
            Ok(rows) => rows,
            Err(e) => {
                warn!(error = %e, "reading the outbox failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        if rows.is_empty() {
            tokio::select! {
                _ = shared.outbox_wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.changed() => return,
            }
            continue;
        }
        let mut seqs = Vec::with_capacity(rows.len());
        let mut messages = Vec::with_capacity(rows.len());
        for row in rows {
            seqs.push(row.seq);
            match CloudEvent::from_json(&row.message.payload) {
                Ok(event) => messages.push(Message { topic: row.message.topic, key: row.message.key, event }),
                // Written by us, so unreadable only through corruption: drop it loudly rather
                // than block every later message.
                Err(e) => warn!(error = %e, id = %row.message.id, "unreadable outbox row dropped"),
            }
        }
        let count = messages.len();
        if let Err(e) = shared.broker.publish(messages).await {
            warn!(error = %e, "publishing the outbox failed; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
            continue;
        }
        shared.faults.point(FaultPoint::AfterPublish).await;
        backoff = Duration::from_millis(50);
        shared.metrics.published.fetch_add(count as u64, Ordering::Relaxed);
        if let Err(e) = shared.store.outbox_delete(&seqs).await {
            warn!(error = %e, "deleting published outbox rows failed; they will be published again");
        }
    }
}
