//! The partition's checkpoint, and derived messages (awards, notifications: `codec::is_derived`)
//! after a commit that failed.
//!
//! The checkpoint is where a restart starts deriving lost timers and messages from
//! (`recovery.rs`): it stays before every kept timer (`deferred.rs`) and before the events of
//! every commit whose derived messages the relay has not yet published.
//!
//! A failed commit may have been written all the same (its reply was lost); the inputs, applied
//! again, then decide nothing, and the messages it carried would reach no one before a restart.
//! So they are sent again from the stored states, under a hold that keeps the checkpoint before
//! the failed commit until the relay has published them.

use foldhash::{HashSet, HashSetExt};
use std::sync::atomic::Ordering;

use tracing::{debug, warn};

use super::{Partition, fold};
use crate::runtime::codec;
use crate::runtime::outbox_relay::Outgoing;

impl Partition {
    /// Releases the commits whose derived messages the relay has published since.
    pub(super) fn note_relayed(&mut self) {
        if let Some(mark) = self.shared.relayed.get(self.id) {
            self.deferred.relayed(mark.load(Ordering::Acquire));
        }
    }

    /// The name of this partition's timer checkpoint in the store.
    pub fn checkpoint_name(id: usize) -> String {
        format!("partition/{id}")
    }

    /// Writes the timer checkpoint when it moved (in a task of its own: a checkpoint written
    /// late or lost only makes a recovery read more).
    pub(super) fn write_checkpoint(&mut self) {
        self.note_relayed();
        let now_ms = self.shared.clock.now_ms();
        if let Some(position) = self.deferred.checkpoint_due(now_ms) {
            let store = self.shared.store.clone();
            let name = Self::checkpoint_name(self.id);
            tokio::spawn(async move {
                if let Err(e) = store.set_timer_checkpoint(&name, position).await {
                    warn!(%name, error = %e, "writing the timer checkpoint failed; retrying later");
                }
            });
        }
    }

    /// Notes that a commit carrying derived messages failed (see `resend`).
    pub(super) fn commit_failed(&mut self, outgoing: &Outgoing) {
        if outgoing.derived.is_empty() {
            return;
        }
        let (_, runs) =
            self.resend.get_or_insert_with(|| (self.deferred.hold(self.deferred.checkpoint()), HashSet::new()));
        runs.extend(outgoing.derived.iter().map(|m| m.key.clone()));
    }

    /// Sends again the derived messages of `runs` from their stored states, under `hold`.
    pub(super) async fn resend_derived(&mut self, hold: u64, runs: HashSet<String>) {
        let runs: Vec<String> = runs.into_iter().collect();
        let mut outgoing = Outgoing { held: Some((self.id, hold)), ..Outgoing::default() };
        match self.shared.store.read_streams(&runs).await {
            Ok(stored) => {
                let time = codec::rfc3339(self.shared.clock.now_ms());
                for stream in stored.chunk_by(|a, b| a.run_id == b.run_id) {
                    // A run that cannot be folded is refused at its next input too.
                    let Ok((state, _)) = fold(&self.shared, &stream[0].run_id, stream).await else { continue };
                    outgoing.derived.extend(codec::derived_messages(&state, &time));
                }
            }
            // The attempts' timeouts recover what this would have sent.
            Err(e) => warn!(partition = self.id, error = %e, "reading runs to send their messages again failed"),
        }
        debug!(
            partition = self.id,
            runs = runs.len(),
            messages = outgoing.derived.len(),
            "sending derived messages again"
        );
        // Sent even when empty: the relay releases the hold.
        let _ = self.shared.outbox_tx.send(outgoing);
    }
}
