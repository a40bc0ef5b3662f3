//! The run state machine: one execution of a sequence in a stage.
//!
//! `RunState::decide(&state, &input, &ctx) -> Decision` turns an input (a command, a worker's
//! message, a fired timer) into new events and effects; `RunState::evolve(&mut state, &event)`
//! applies one event. `decide` never changes the state: the runtime appends the events, then folds
//! them in with `evolve`, so a state is always exactly the fold of its stored events.
//!
//! CONTRACT (the runtime depends on it; see also docs/protocol.md):
//! - `decide` is pure and deterministic: the same state, input and `Ctx` give the same decision.
//! - An input that does not apply to the run at all (unknown task, a command on a run that never
//!   started, a second `Start`) is an `Err(Error)`: nothing is recorded, the caller reports it.
//! - A report with a stale fencing token is answered `Ok`: an `Event::InputRejected` is recorded
//!   and a `Rejection` is sent to the worker. Losing or late bids and claims get a `Rejection`
//!   effect and no event (they change nothing).
//! - Every timer the state machine relies on is requested with `Effect::SetTimer`, and cancelled
//!   with `Effect::CancelTimer` once moot. A fired timer that is moot yields an empty decision.
//! - Heartbeats record no event: they only push the heartbeat timer (`SetTimer` with a later time).
//! - Timers of a kind `RunState::derives` are set again by `RunState::derived_timers` from the
//!   state alone (`derived.rs`), so the runtime may keep them in memory until they have lived a
//!   while and derive them again after a crash.
//! - A worker's message about a task of a run that is over gets a `Rejection` and no event.
//! - Commands (`Cancel`, `Pause`, `Resume`, `Approve`) on a run that is over are
//!   `Err(Error::RunOver)`; `Pause` on a paused run and `Resume` on a running one change nothing.
//!
//! Layout: [`state`](RunState) folds events; `machine.rs` holds the task transition table and
//! routes inputs; `flow.rs` starts ready tasks and ends the run; `attempt.rs` ends attempts
//! (retries, backoff, timeouts); `commands.rs` handles run-wide commands; `history.rs` renders a
//! run's events as text.

mod attempt;
mod commands;
mod derived;
mod flow;
mod history;
mod machine;
mod runbook;
mod state;
mod step;
mod types;

#[cfg(test)]
mod tests;

pub use attempt::backoff;
pub use flow::{APPROVAL_TYPE, CLAIM_FREE_REOFFER_MS, QUEUE_REOFFER_MS};
pub use history::render_history;
pub use machine::meets_requirements;
pub use state::{RunState, TaskPhase, TaskView};
pub use types::*;
