//! Worker messages and sequence triggers from the broker into the partitions. The delivery
//! travels with the input and is acknowledged only after the input's batch is committed.
//!
//! A message nobody can use (an undecodable worker message, a trigger that names no usable
//! sequence) must neither block the stream nor vanish: it goes to the broker's dead letters with
//! the error as the reason. A trigger that failed for a passing reason (the store unreachable)
//! comes again instead.

use std::time::Duration;

use capstan_brokers::{Broker, Delivery, Subscription, SubscriptionMode};
use capstan_proto::topics;
use tokio::sync::watch;
use tracing::{error, warn};

use super::codec;
use super::error::RuntimeError;
use super::{Envelope, Reply, Router, Shared, triggers};
use std::sync::Arc;

/// The competing group all engine replicas share: each worker message reaches one of them.
pub const ENGINE_GROUP: &str = "capstan-engine";

/// After how long a delivery comes again when it could not be handled now.
const RETRY_DELAY: Duration = Duration::from_secs(1);

/// Subscribes to the engine's input topic (before any work is offered, so no answer is missed).
pub async fn subscribe(broker: &dyn Broker) -> Result<Box<dyn Subscription>, RuntimeError> {
    Ok(broker.subscribe(topics::ENGINE_INPUTS, SubscriptionMode::Competing { group: ENGINE_GROUP.into() }).await?)
}

/// Decodes and routes deliveries until shutdown.
pub async fn run(
    mut subscription: Box<dyn Subscription>,
    shared: Arc<Shared>,
    router: Router,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let delivery = tokio::select! {
            biased;
            _ = shutdown.changed() => return,
            d = subscription.next() => d,
        };
        let delivery = match delivery {
            Ok(d) => d,
            Err(capstan_brokers::Error::Closed) => return,
            Err(e) => {
                error!(error = %e, "engine input subscription failed; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                continue;
            }
        };
        if triggers::is_trigger(&delivery.message.event.ty) {
            // A CloudEvents producer that is not Capstan (a pipeline, Keptn tooling) starts a
            // sequence through the broker; the event id makes a redelivered trigger harmless.
            let start = match triggers::trigger_of(&delivery.message.event, "") {
                Ok(req) => {
                    let project = req.project.clone();
                    shared.start_input(req).await.map(|(run, input)| (run, project, input))
                }
                Err(e) => Err(super::RuntimeError::InvalidTrigger(e.to_string())),
            };
            match start {
                Ok((run_id, project, input)) => {
                    let env = Envelope {
                        run_id,
                        input_id: None,
                        project: Some(project),
                        input,
                        consumed_timer: None,
                        reply: Reply::Delivery(Box::new(delivery)),
                    };
                    if router.route(env).await.is_err() {
                        return;
                    }
                }
                Err(e) if passing(&e) => {
                    warn!(error = %e, id = %delivery.message.event.id, "sequence trigger not started; it comes again");
                    retry(&delivery).await;
                }
                Err(e) => {
                    warn!(error = %e, id = %delivery.message.event.id, "unusable sequence trigger dead-lettered");
                    dead_letter(&delivery, &e.to_string()).await;
                }
            }
            continue;
        }
        let decoded = match codec::decode_input(&delivery.message.event) {
            Ok(d) => d,
            Err(e) => {
                warn!(error = %e, id = %delivery.message.event.id, "undecodable engine input dead-lettered");
                dead_letter(&delivery, &e.to_string()).await;
                continue;
            }
        };
        let env = Envelope {
            run_id: decoded.run_id,
            input_id: Some(delivery.message.event.id.clone()),
            project: Some(decoded.project),
            input: decoded.input,
            consumed_timer: None,
            reply: Reply::Delivery(Box::new(delivery)),
        };
        if router.route(env).await.is_err() {
            return;
        }
    }
}

/// Whether starting a trigger failed for a reason that passes, so that it should come again.
fn passing(e: &RuntimeError) -> bool {
    matches!(
        e,
        RuntimeError::Store(capstan_store::Error::Unavailable(_))
            | RuntimeError::Broker(_)
            | RuntimeError::ShuttingDown
    )
}

/// Moves a delivery nobody can use to the broker's dead letters; if the broker cannot take it
/// now, it comes again later (and is dead-lettered then) rather than vanish.
async fn dead_letter(delivery: &Delivery, reason: &str) {
    if let Err(e) = delivery.dead_letter(reason).await {
        warn!(error = %e, id = %delivery.message.event.id, "dead-lettering failed; the message comes again");
        retry(delivery).await;
    }
}

async fn retry(delivery: &Delivery) {
    if let Err(e) = delivery.nack(RETRY_DELAY).await {
        warn!(error = %e, id = %delivery.message.event.id, "nack failed; the broker redelivers after its deadline");
    }
}
