//! The partition's checkpoint, and derived messages (awards, notifications: `codec::is_derived`)
//! after a commit that failed.
//!
//! The checkpoint is where a restart starts deriving lost timers and messages from
//! (`recovery.rs`): it stays before every kept timer (`deferred.rs`) and before the events of
//! every commit whose derived messages the relay has not yet published.
//!
//! A failed commit may have been written all the same (its reply was lost); the inputs, applied
//! again, then decide nothing, and the messages it carried would reach no one before a restart,
//! nor would the timers it kept in memory (undone with the failed batch) ever fire: a run
//! waiting on such a retry or timeout waited for good (found by the fault suite, whose database
//! cuts lose commit replies). So the runs of a failed commit that carried derived messages or
//! kept timers have both derived again from their stored states: the timers written to the
//! store, the messages sent, under a hold that keeps the checkpoint before the failed commit
//! until they are.

use foldhash::{HashSet, HashSetExt};
use std::sync::atomic::Ordering;

use capstan_engine::Timestamp;
use capstan_store::Batch;
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

    /// Notes that a commit failed whose batch carried derived messages or kept timers of
    /// `runs` (see `resend`). Call it after undoing the batch's kept timers.
    pub(super) fn commit_failed(&mut self, outgoing: &Outgoing, kept_timers: bool, runs: &[String]) {
        if outgoing.derived.is_empty() && !kept_timers {
            return;
        }
        let (_, pending) =
            self.resend.get_or_insert_with(|| (self.deferred.hold(self.deferred.checkpoint()), HashSet::new()));
        pending.extend(outgoing.derived.iter().map(|m| m.key.clone()));
        if kept_timers {
            pending.extend(runs.iter().cloned());
        }
    }

    /// Derives again the timers and messages of `runs` from their stored states: writes the
    /// timers, then sends the messages under `hold`. While the store cannot be read or written
    /// the runs stay pending (and the hold with them) for the next batch to try again.
    pub(super) async fn resend_derived(&mut self, hold: u64, runs: HashSet<String>) {
        let ids: Vec<String> = runs.iter().cloned().collect();
        let mut outgoing = Outgoing { held: Some((self.id, hold)), ..Outgoing::default() };
        let now_ms = self.shared.clock.now_ms();
        let mut timers = Batch::default();
        match self.shared.store.read_streams(&ids).await {
            Ok(stored) => {
                let time = codec::rfc3339(now_ms);
                for stream in stored.chunk_by(|a, b| a.run_id == b.run_id) {
                    let run_id = &stream[0].run_id;
                    // A run that cannot be folded is refused at its next input too.
                    let Ok((state, _)) = fold(&self.shared, run_id, stream).await else { continue };
                    outgoing.derived.extend(codec::derived_messages(&state, &time));
                    for (kind, at) in state.derived_timers(Timestamp(now_ms.max(0) as u64)) {
                        timers.set_timers.push(codec::engine_timer_row(run_id, &kind, at));
                    }
                }
            }
            Err(e) => {
                warn!(partition = self.id, error = %e, "reading runs to derive their timers and messages failed");
                self.resend = Some((hold, runs));
                return;
            }
        }
        let earliest = timers.set_timers.iter().map(|t| t.fire_at_ms).min();
        if let Some(earliest) = earliest {
            // A timer already in the store is written again at the same time; one the run no
            // longer relies on is moot when it fires.
            if let Err(e) = self.shared.store.commit(timers).await {
                warn!(partition = self.id, error = %e, "writing the derived timers failed");
                self.resend = Some((hold, runs));
                return;
            }
            self.shared.timer_wake(earliest);
        }
        debug!(
            partition = self.id,
            runs = ids.len(),
            messages = outgoing.derived.len(),
            timers = earliest.is_some(),
            "derived the timers and messages of a failed commit again"
        );
        // Sent even when empty: the relay releases the hold.
        let _ = self.shared.outbox_tx.send(outgoing);
    }
}
