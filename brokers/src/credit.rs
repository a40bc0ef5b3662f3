//! Flow control between a subscriber and its broker. A [`Credit`] is how many more deliveries
//! the subscriber will take: the subscriber grants it (a worker: one unit per free slot), each
//! delivery uses one unit, and a broker that fetches ahead of [`Subscription::next`] fetches only
//! against it. A member of a competing group without credit so leaves the group's messages to
//! the members that have some, instead of taking them and handing them back.
//!
//! [`Gated`] is the fallback for a broker without its own support: it waits for a unit before
//! each `next`. That bounds what the subscriber handles, but not what the broker's client holds
//! ahead of it (RabbitMQ's prefetch, Kafka's fetched batches).

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::Semaphore;

use crate::{Delivery, Result, Subscription};

/// Shared, cloneable units of "one more delivery, please". Starts at zero.
#[derive(Debug, Clone)]
pub struct Credit(Arc<Semaphore>);

impl Default for Credit {
    fn default() -> Self {
        Credit::new(0)
    }
}

impl Credit {
    /// Credit for `units` deliveries.
    pub fn new(units: usize) -> Self {
        Credit(Arc::new(Semaphore::new(units)))
    }

    /// Adds `units`.
    pub fn grant(&self, units: usize) {
        if units > 0 {
            self.0.add_permits(units);
        }
    }

    /// Takes back up to `units` of the credit nobody uses yet; returns how many it took.
    pub fn reclaim(&self, units: usize) -> usize {
        let units = units.min(self.0.available_permits());
        let Ok(n) = u32::try_from(units) else {
            return 0;
        };
        match self.0.try_acquire_many(n) {
            Ok(permits) if n > 0 => {
                permits.forget();
                units
            }
            _ => 0,
        }
    }

    /// The units granted and not yet taken.
    pub fn available(&self) -> usize {
        self.0.available_permits()
    }

    /// Waits until there is credit, then takes up to `max` units (at least one); returns how
    /// many it took. Cancelling the wait takes nothing.
    pub async fn take(&self, max: usize) -> usize {
        let Ok(first) = self.0.acquire().await else {
            return 0; // never closed
        };
        first.forget();
        let more = max.saturating_sub(1).min(self.0.available_permits());
        match u32::try_from(more).ok().and_then(|n| self.0.try_acquire_many(n).ok()) {
            Some(permits) => {
                permits.forget();
                1 + more
            }
            None => 1,
        }
    }
}

/// A subscription that waits for one unit of credit before each delivery it hands out.
pub struct Gated {
    inner: Box<dyn Subscription>,
    credit: Credit,
    /// A unit taken by a `next` that was cancelled before its delivery came: the next call
    /// uses it instead of taking another.
    holding: bool,
}

impl Gated {
    /// Gates `inner` by `credit`.
    pub fn new(inner: Box<dyn Subscription>, credit: Credit) -> Self {
        Gated { inner, credit, holding: false }
    }
}

#[async_trait]
impl Subscription for Gated {
    async fn next(&mut self) -> Result<Delivery> {
        if !self.holding {
            self.credit.take(1).await;
            self.holding = true;
        }
        let delivery = self.inner.next().await?;
        self.holding = false;
        Ok(delivery)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn take_waits_for_credit_and_takes_at_most_what_is_asked() {
        let credit = Credit::new(0);
        let waiting = tokio::time::timeout(Duration::from_millis(10), credit.take(4)).await;
        assert!(waiting.is_err(), "no credit: take waits");
        credit.grant(3);
        assert_eq!(credit.take(2).await, 2);
        assert_eq!(credit.take(8).await, 1, "takes what is left, at least one");
        assert_eq!(credit.available(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn reclaim_takes_back_only_unused_credit() {
        let credit = Credit::new(5);
        assert_eq!(credit.take(2).await, 2);
        assert_eq!(credit.reclaim(10), 3, "only the three not taken");
        assert_eq!(credit.reclaim(1), 0);
        credit.grant(1);
        assert_eq!(credit.reclaim(1), 1);
        assert_eq!(credit.available(), 0);
    }
}
