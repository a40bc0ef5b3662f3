//! How a handled delivery is settled: acked, handed back (after a delay) or dead-lettered.

use std::time::Duration;

use capstan_brokers::Delivery;

use super::{LoopState, Source};

/// What becomes of a handled delivery.
pub(super) enum Settle {
    Ack,
    /// Back to the broker after `queue_retry_delay`.
    Retry,
    /// Back to the broker after this delay.
    RetryAfter(Duration),
    /// To the broker's dead letters, with the reason.
    DeadLetter(String),
}

pub(super) fn bad_payload(event: &capstan_proto::CloudEvent, e: &serde_json::Error) -> Settle {
    // Redelivering a malformed message would only fail again; kept aside, it can be looked into.
    tracing::warn!(id = %event.id, ty = %event.ty, error = %e, "dead-lettering a message with a bad payload");
    Settle::DeadLetter(format!("bad {} payload: {e}", event.ty))
}

/// An offer this worker does not answer: a queue offer goes back for another member, a
/// broadcast one needs nothing.
pub(super) fn declined(source: Source) -> Settle {
    if matches!(source, Source::Queue(_)) { Settle::Retry } else { Settle::Ack }
}

impl LoopState<'_> {
    pub(super) async fn settle(&mut self, delivery: &Delivery, settle: Settle) {
        let retry_delay = self.worker.config.queue_retry_delay;
        let settled = match settle {
            Settle::Ack => delivery.ack().await,
            Settle::Retry => delivery.nack(retry_delay).await,
            Settle::RetryAfter(delay) => delivery.nack(delay).await,
            Settle::DeadLetter(reason) => match delivery.dead_letter(&reason).await {
                Ok(()) => Ok(()),
                Err(e) => {
                    tracing::warn!(error = %e, id = %delivery.message.event.id, "dead-lettering failed; it comes again");
                    delivery.nack(retry_delay).await
                }
            },
        };
        if let Err(e) = settled {
            tracing::warn!(error = %e, "could not settle a delivery");
        }
    }
}
