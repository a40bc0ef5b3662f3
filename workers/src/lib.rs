//! The worker SDK: advertise task types and labels, bid or claim, heartbeat, finish; and the
//! built-in workers (shell command, echo / no-op, and the delivery workers: evaluation, SLI
//! providers, webhook, get-action).
//!
//! A [`Worker`] speaks the protocol of `capstan_proto` over any [`capstan_brokers::Broker`]:
//! - it subscribes Broadcast to `topics::tasks(type)` (auction and fanout offers) and
//!   `Competing { group: "capstan-workers-<type>" }` to `topics::queue(type)` (queue offers) for
//!   each of its task types, and `Competing { group: <worker id> }` to `topics::worker(id)` for
//!   what the engine addresses to it (awards, rejections, cancellations). A competing group
//!   rather than a broadcast subscription keeps those messages while the worker restarts, and
//!   hands each to one process should two share an id by mistake;
//! - it bids (auction) or claims (queue, fanout) with a slot reserved, and on an award sends
//!   `started`, heartbeats every third of the heartbeat interval, runs the [`Handler`] and sends
//!   `finished` with the fencing token; everything goes to `topics::ENGINE_INPUTS` keyed by run id.
//!
//! With `WorkerConfig::journal` set, a worker writes each award durably before its handler starts
//! and, restarted under the same id, never starts one of those awards again (see `journal`).
//!
//! The worker trusts nothing it sends to arrive: the engine owns every timeout and re-offers what
//! went missing. See [`worker`] for the exact reactions to each message.

mod attempt;
mod echo;
mod evaluation;
mod gather;
mod get_action;
mod handler;
mod journal;
mod prometheus;
mod scope;
mod shell;
pub mod sli;
mod static_sli;
pub mod template;
#[cfg(test)]
mod test_server;
mod webhook;
pub mod worker;

pub use echo::{EchoConfig, EchoWorker};
pub use evaluation::{EvaluationConfig, EvaluationWorker, SliProvider};
pub use get_action::{GetActionConfig, GetActionWorker, Problem, bid_for_actions, chosen_action};
pub use handler::{BidTerms, CancelSignal, Handler, Outcome, RunPlace, TaskContext};
pub use prometheus::{PrometheusConfig, PrometheusSliWorker};
pub use scope::{Scope, ScopedFiles};
pub use shell::{ShellConfig, ShellWorker};
pub use static_sli::StaticSliWorker;
pub use webhook::{Guard, GuardError, WebhookConfig, WebhookWorker};
pub use worker::{Worker, WorkerConfig};

/// What went wrong in a worker.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The broker failed or closed: restart the worker when it is back.
    #[error("broker: {0}")]
    Broker(#[from] capstan_brokers::Error),
    /// The configuration is unusable; every problem is listed.
    #[error("invalid worker configuration: {}", .0.join("; "))]
    Config(Vec<String>),
    /// The award journal cannot be read or written.
    #[error("award journal {}: {source}", path.display())]
    Journal { path: std::path::PathBuf, source: std::io::Error },
    /// A payload could not be encoded (a bug, not an input problem).
    #[error("could not encode a payload: {0}")]
    Encode(#[from] serde_json::Error),
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests;
