//! Flow control of queue offers: a worker takes from its queues only as many offers as it has
//! free slots. Each queue subscription has a [`Credit`] the loop keeps at the free slots, so a
//! worker whose slots all run leaves the queue to the members that have room (with NATS and the
//! in-memory broker, whose subscriptions fetch only against credit), instead of taking offers
//! and handing them back a `queue_retry_delay` later. Kafka ignores the credit (one member per
//! partition): there every offer comes, and those past the slots are held or handed back.
//!
//! Each subscription gets the credit of all free slots, so a worker with several task types can
//! take more offers than it has slots when every queue has some. An offer that finds no free slot
//! is held (up to `max_concurrency` of them) and handled as soon as a slot frees; one held for
//! `queue_retry_delay` goes back to the broker at once, for a member with room.

use std::time::Duration;

use capstan_brokers::{Credit, Delivery};
use tokio::time::Instant;

use super::{LoopState, Settle, Source};

/// The credit of one queue subscription.
pub(super) struct Intake {
    pub credit: Credit,
    /// Granted units not yet come back as a delivery to the loop: unused credit plus what the
    /// broker fetched and the pump has not passed on.
    pub outstanding: usize,
}

impl Intake {
    pub(super) fn new() -> Self {
        Intake { credit: Credit::new(0), outstanding: 0 }
    }
}

/// A queue offer that came while every slot was taken.
pub(super) struct Held {
    pub source: Source,
    pub delivery: Delivery,
    pub since: Instant,
}

impl LoopState<'_> {
    /// A delivery of queue subscription `index` reached the loop: it used one unit.
    pub(super) fn arrived(&mut self, index: usize) {
        if let Some(intake) = self.intake.get_mut(index) {
            intake.outstanding = intake.outstanding.saturating_sub(1);
        }
    }

    /// Holds a queue offer that finds no free slot; `Err` gives it back when the worker already
    /// holds as many as it has slots.
    pub(super) fn hold(&mut self, source: Source, delivery: Delivery) -> Result<(), Delivery> {
        if self.held.len() >= self.worker.config.max_concurrency as usize {
            return Err(delivery);
        }
        self.held.push_back(Held { source, delivery, since: Instant::now() });
        Ok(())
    }

    /// When the oldest held offer is due back to the broker.
    pub(super) fn held_until(&self) -> Option<Instant> {
        self.held.front().map(|h| h.since + self.worker.config.queue_retry_delay)
    }

    /// After every event of the loop: held offers take the free slots, those held too long go
    /// back, and each queue's credit follows the slots still free.
    pub(super) async fn refill(&mut self) {
        while self.free_slots() > 0
            && let Some(held) = self.held.pop_front()
        {
            self.handle(held.source, held.delivery).await;
        }
        self.bid_deferred().await;
        let now = Instant::now();
        while let Some(due) = self.held_until()
            && due <= now
            && let Some(held) = self.held.pop_front()
        {
            self.settle(&held.delivery, Settle::RetryAfter(Duration::ZERO)).await;
        }
        let room = (self.free_slots() as usize).saturating_sub(self.held.len());
        for intake in &mut self.intake {
            // Credit nobody took is outstanding too; a broker that ignores credit (Kafka) takes
            // none, and this keeps the grants there from piling up.
            intake.outstanding = intake.outstanding.max(intake.credit.available());
            if intake.outstanding < room {
                intake.credit.grant(room - intake.outstanding);
                intake.outstanding = room;
            } else if intake.outstanding > room {
                intake.outstanding -= intake.credit.reclaim(intake.outstanding - room);
            }
        }
    }

    /// At shutdown: held offers go back to the broker at once.
    pub(super) async fn release_held(&mut self) {
        while let Some(held) = self.held.pop_front() {
            self.settle(&held.delivery, Settle::RetryAfter(Duration::ZERO)).await;
        }
    }
}
