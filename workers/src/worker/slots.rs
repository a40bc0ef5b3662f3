//! What takes a worker's slots: running attempts, awards waiting for one and claims. Auction
//! bids do not (most lose, and learn so only from a rejection a round trip away); they are
//! bounded by [`WorkerConfig::bids_per_slot`](super::WorkerConfig::bids_per_slot) instead.

use capstan_proto::AttemptRef;
use tokio::time::Instant;

use super::{LoopState, Settle};
use crate::handler::RunPlace;

/// An attempt the worker bid for or claimed, until its award or `until`. A claim holds a slot;
/// a bid counts against `bids_per_slot`.
pub(super) struct Reservation {
    pub until: Instant,
    pub place: RunPlace,
    pub bid: bool,
}

impl LoopState<'_> {
    /// Slots not taken by a running attempt, a waiting award or a claim.
    pub(super) fn free_slots(&self) -> u32 {
        let claims = self.reserved.len() - self.bids_open;
        let busy = self.running.len() + self.waiting.len() + claims;
        (self.worker.config.max_concurrency as usize).saturating_sub(busy) as u32
    }

    /// How many bids (or awards waiting for a slot) the worker may have open.
    pub(super) fn bid_limit(&self) -> usize {
        let config = &self.worker.config;
        config.max_concurrency as usize * config.bids_per_slot as usize
    }

    pub(super) fn reserve(&mut self, a: AttemptRef, reservation: Reservation) {
        self.bids_open += usize::from(reservation.bid);
        if let Some(old) = self.reserved.insert(a, reservation) {
            self.bids_open -= usize::from(old.bid);
        }
    }

    pub(super) fn unreserve(&mut self, a: &AttemptRef) -> Option<Reservation> {
        let r = self.reserved.remove(a)?;
        self.bids_open -= usize::from(r.bid);
        Some(r)
    }

    pub(super) fn is_waiting(&self, a: &AttemptRef) -> bool {
        self.waiting.iter().any(|(award, _)| award.attempt == *a)
    }

    /// A rejection or cancellation: give up the reservation or stop the attempt.
    pub(super) fn release(&mut self, a: &AttemptRef, reason: &str) -> Settle {
        if self.unreserve(a).is_some() {
            tracing::debug!(task = %a.task, run = %a.run_id, reason, "reservation released");
        }
        if self.is_waiting(a) {
            tracing::info!(task = %a.task, run = %a.run_id, reason, "dropping an award that waited for a slot");
            self.waiting.retain(|(award, _)| award.attempt != *a);
        }
        if let Some(r) = self.running.get(a) {
            tracing::info!(task = %a.task, run = %a.run_id, reason, "cancelling attempt");
            r.cancel.cancel();
        }
        Settle::Ack
    }
}
