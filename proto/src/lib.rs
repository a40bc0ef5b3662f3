//! Capstan's protocol words: the CloudEvent envelope, the event type names, the extension attribute
//! names and the payloads that engine and workers exchange. See docs/protocol.md.
//!
//! This crate is plain data (serde only) so every other crate, the pure engine included, can share it.

mod cloudevent;
mod event_data;
#[cfg(feature = "grpc")]
pub mod grpc;
mod payload;

pub use cloudevent::{CloudEvent, DecodeError, SPEC_VERSION, valid_extension_name};
pub use event_data::EventData;
pub use payload::*;

/// CloudEvent `type` values of the worker protocol.
pub mod types {
    /// Engine -> workers: a task attempt is on offer (auction / fanout) or ready to claim (queue).
    pub const TASK_OFFERED: &str = "dev.capstan.task.offered.v1";
    /// Worker -> engine: a bid for an offered attempt.
    pub const TASK_BID: &str = "dev.capstan.task.bid.v1";
    /// Worker -> engine: a claim of a queued attempt (queue dispatch).
    pub const TASK_CLAIM: &str = "dev.capstan.task.claim.v1";
    /// Engine -> one worker: the attempt is yours; carries the fencing token.
    pub const TASK_AWARDED: &str = "dev.capstan.task.awarded.v1";
    /// Engine -> one worker: your bid or claim lost, or your token is stale.
    pub const TASK_REJECTED: &str = "dev.capstan.task.rejected.v1";
    /// Engine -> workers: stop working on this attempt (run cancelled, attempt timed out).
    pub const TASK_CANCELLED: &str = "dev.capstan.task.cancelled.v1";
    /// Worker -> engine: the awarded worker began the attempt.
    pub const TASK_STARTED: &str = "dev.capstan.task.started.v1";
    /// Worker -> engine: still alive and working.
    pub const TASK_HEARTBEAT: &str = "dev.capstan.task.heartbeat.v1";
    /// Worker -> engine: the attempt ended with a result (or an error).
    pub const TASK_FINISHED: &str = "dev.capstan.task.finished.v1";
    /// Client -> engine: start a sequence in a stage.
    pub const SEQUENCE_TRIGGERED: &str = "dev.capstan.sequence.triggered.v1";
    /// Engine -> anyone: a run ended (the promotion signal).
    pub const SEQUENCE_FINISHED: &str = "dev.capstan.sequence.finished.v1";

    /// Keptn's prefix: `sh.keptn.event.<stage>.<sequence>.triggered` starts a sequence and
    /// `sh.keptn.event.<task>.triggered|started|finished` is Keptn's task protocol.
    pub const KEPTN_PREFIX: &str = "sh.keptn.event.";
}

/// CloudEvent extension attribute names (lower-case alphanumerics, at most 20 characters, as the
/// CloudEvents spec requires).
pub mod ext {
    /// The project (tenant) an event belongs to.
    pub const PROJECT: &str = "capstanproject";
    /// The context id shared by the runs of one promotion chain.
    pub const CONTEXT: &str = "capstancontext";
    /// The run id.
    pub const RUN: &str = "capstanrun";
    /// The task name within the run's sequence.
    pub const TASK: &str = "capstantask";
    /// The attempt number of the task, from 1.
    pub const ATTEMPT: &str = "capstanattempt";
    /// The fencing token of an awarded attempt.
    pub const TOKEN: &str = "capstantoken";
    /// The worker id that sent or is addressed by the event.
    pub const WORKER: &str = "capstanworker";
    /// Keptn's context id, carried when talking to Keptn tools.
    pub const KEPTN_CONTEXT: &str = "shkeptncontext";
    /// Keptn's link from `.started` / `.finished` back to the `.triggered` event.
    pub const KEPTN_TRIGGERED_ID: &str = "triggeredid";

    const KNOWN: [&str; 9] = [PROJECT, CONTEXT, RUN, TASK, ATTEMPT, TOKEN, WORKER, KEPTN_CONTEXT, KEPTN_TRIGGERED_ID];

    /// An extension name as a map key: one of the names above is lent, not copied, since every
    /// message of the protocol carries several of them.
    pub fn name(name: &str) -> std::borrow::Cow<'static, str> {
        match KNOWN.iter().find(|k| **k == name) {
            Some(known) => std::borrow::Cow::Borrowed(known),
            None => std::borrow::Cow::Owned(name.to_string()),
        }
    }
}

/// Broker topic names used by the engine and the worker SDK.
pub mod topics {
    /// Everything workers send to the engine (bids, claims, started, heartbeats, finished).
    pub const ENGINE_INPUTS: &str = "capstan.inputs";
    /// Sequence finished notifications for watchers.
    pub const RUN_EVENTS: &str = "capstan.runs";

    /// Offers of a task type (auction and fanout), read by every worker that handles that type.
    pub fn tasks(task_type: &str) -> String {
        format!("capstan.tasks.{}", sanitize(task_type))
    }

    /// Queued attempts of a task type (queue dispatch): a competing group per task type.
    pub fn queue(task_type: &str) -> String {
        format!("capstan.queue.{}", sanitize(task_type))
    }

    /// Whether `topic` is a queue of [`queue`]: its members share the messages by their free
    /// slots, so they must travel one by one, never packed.
    pub fn is_queue(topic: &str) -> bool {
        topic.starts_with("capstan.queue.")
    }

    /// Messages addressed to one worker (awards, rejections, cancellations).
    pub fn worker(worker_id: &str) -> String {
        format!("capstan.workers.{}", sanitize(worker_id))
    }

    /// Topic names must be valid NATS subjects, Kafka topics and AMQP routing keys at once.
    fn sanitize(s: &str) -> String {
        s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
    }
}
