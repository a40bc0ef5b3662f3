//! Auction offers a worker cannot bid on yet. A worker bids while a slot is free and its open
//! bids are under `bids_per_slot` x slots. Over capacity (every slot of every worker running),
//! an offer used to find no bidder at all; the engine offered it again only after its bid window
//! and a retry backoff (0.75-1.25 s for the first re-offer, doubling after that), while slots
//! freed meanwhile sat idle.
//!
//! Such an offer is now kept (the offer only: its delivery is acked, a broadcast has no other
//! member to hand it to) and bid on as soon as a slot frees, oldest first, for
//! `queue_retry_delay` at most. An auction with the `first` policy awards a bid whenever it
//! comes while the attempt is on offer; the others award a bid that comes after their window
//! closed without one at once. A kept offer that another worker won meanwhile costs a bid and its
//! rejection. A re-offer of an attempt already kept changes nothing.
//!
//! Up to [`KEPT_OFFERS`] offers (or `max_concurrency x bids_per_slot`, if more) are kept. Every
//! worker sees the same offers in the same order, so a bound as small as the bids kept the same
//! few offers at every worker and left all later ones to the engine's re-offer: with 8 workers
//! of 4 slots and 64 runs in flight over NATS, a p99 of 1.1 s against 140-170 ms with 1,024;
//! with 2,048 runs in flight embedded, a slowest run of 15 s with 1,024 kept and 4 s with 4,096.

use std::collections::VecDeque;

use capstan_proto::{AttemptRef, TaskOffer};
use foldhash::HashSet;
use tokio::time::Instant;

use super::{Answer, LoopState, Source};

/// How many auction offers a worker keeps at least: a few MiB with small inputs (16 MiB with
/// inputs of 4 KiB).
pub(super) const KEPT_OFFERS: usize = 4096;

/// An auction offer that came when the worker could not bid.
struct Deferred {
    offer: TaskOffer,
    since: Instant,
}

/// The kept offers, oldest first, and their attempts (a re-offer is found without a scan).
#[derive(Default)]
pub(super) struct Kept {
    offers: VecDeque<Deferred>,
    attempts: HashSet<AttemptRef>,
}

impl Kept {
    fn pop_front(&mut self) -> Option<Deferred> {
        let kept = self.offers.pop_front()?;
        self.attempts.remove(&kept.offer.attempt);
        Some(kept)
    }
}

impl LoopState<'_> {
    /// Whether a bid may be sent now: a slot is free and bids (with awards waiting for a slot)
    /// are under the limit.
    pub(super) fn may_bid(&self) -> bool {
        self.free_slots() > 0 && self.bids_open + self.waiting.len() < self.bid_limit()
    }

    /// Keeps an auction offer to bid on once a slot frees.
    pub(super) fn defer(&mut self, offer: TaskOffer) {
        if self.deferred.attempts.contains(&offer.attempt) {
            return; // a re-offer of one kept already
        }
        if self.deferred.offers.len() >= self.bid_limit().max(KEPT_OFFERS) {
            tracing::debug!(task = %offer.attempt.task, run = %offer.attempt.run_id, "not keeping an auction offer: enough are kept");
            return;
        }
        tracing::debug!(task = %offer.attempt.task, run = %offer.attempt.run_id, "no slot to bid with; offer kept");
        self.deferred.attempts.insert(offer.attempt.clone());
        self.deferred.offers.push_back(Deferred { offer, since: Instant::now() });
    }

    /// After every event of the loop: bid on kept offers while a slot is free, with at most
    /// `bids_per_slot` open bids per free slot (so one freed slot does not draw bids on every
    /// kept offer); offers kept past `queue_retry_delay` are dropped, the engine offers them
    /// again.
    pub(super) async fn bid_deferred(&mut self) {
        let keep = self.worker.config.queue_retry_delay;
        let now = Instant::now();
        while let Some(front) = self.deferred.offers.front()
            && front.since + keep <= now
        {
            self.deferred.pop_front();
        }
        let per_slot = self.worker.config.bids_per_slot as usize;
        while self.may_bid()
            && self.bids_open < self.free_slots() as usize * per_slot
            && let Some(kept) = self.deferred.pop_front()
        {
            match self.on_offer(Source::Offers, kept.offer) {
                Answer::Send(attempt, message) => self.send(Source::Offers, None, attempt, message).await,
                Answer::Settle(_) | Answer::Start(_) => {}
            }
        }
    }
}
