//! Settling a Kafka delivery: an ack marks its offset free for the next commit; a nack or a dead
//! letter publishes a copy (to the same topic, held back until the delay passed, or to the
//! dead-letter topic) and settles the original once the broker confirmed the copy.

use std::sync::Arc;
use std::sync::Weak;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use tokio::time::Instant;

use super::super::binding::{self, NOT_BEFORE, REDELIVERIES};
use super::super::{Outgoing, Shared};
use super::{Incoming, State, dead_letter_of, unix_ms_ceil};
use crate::{Acker, Result};

/// Settles one delivery.
pub(super) struct KafkaAcker {
    pub(super) state: Weak<State>,
    pub(super) shared: Arc<Shared>,
    pub(super) item: Incoming,
    pub(super) competing: bool,
    pub(super) settled: AtomicBool,
}

impl KafkaAcker {
    fn settle(&self) {
        if let Some(state) = self.state.upgrade() {
            state.settle(self.item.partition, self.item.offset, self.item.generation);
        }
    }

    /// Sends `copy` (a nacked or dead-lettered copy of the record) and settles the original
    /// once the broker confirmed it; if the send fails the delivery stays unsettled.
    async fn replace_with(&self, copy: Outgoing) -> Result<()> {
        if let Err(e) = self.shared.send(vec![copy]).await {
            self.settled.store(false, Ordering::SeqCst);
            return Err(e);
        }
        if self.competing {
            self.settle();
        }
        Ok(())
    }
}

#[async_trait]
impl Acker for KafkaAcker {
    async fn ack(&self) -> Result<()> {
        if !self.settled.swap(true, Ordering::SeqCst) && self.competing {
            self.settle();
        }
        Ok(())
    }

    async fn nack(&self, delay: Duration) -> Result<()> {
        if self.settled.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let again = self.item.redeliveries.saturating_add(1);
        if !self.competing {
            let Some(state) = self.state.upgrade() else { return Ok(()) };
            let item = Incoming { message: self.item.message.clone(), redeliveries: again, ..self.item };
            // A closed reader means the subscription is gone, and with it any interest.
            let _ = state.retry.send((Instant::now() + delay, item));
            return Ok(());
        }
        // Kafka cannot redeliver one record: publish a copy (same key, so same partition) that
        // consumers hold back until the delay passed, and settle the original once it is safe.
        let m = &self.item.message;
        let mut record = binding::encode(&m.event);
        record.headers.push((REDELIVERIES.into(), again.to_string().into_bytes()));
        let not_before = unix_ms_ceil(SystemTime::now() + delay);
        record.headers.push((NOT_BEFORE.into(), not_before.to_string().into_bytes()));
        self.replace_with(Outgoing { topic: m.topic.clone(), key: m.key.clone(), record }).await
    }

    async fn dead_letter(&self, reason: &str) -> Result<()> {
        if self.settled.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let m = &self.item.message;
        let origin = (m.topic.as_str(), self.item.partition, self.item.offset);
        self.replace_with(dead_letter_of(&self.shared, binding::encode(&m.event), &m.key, origin, reason)).await
    }
}
