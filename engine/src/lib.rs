//! Capstan's pure core: it decides what happens next in a workflow and nothing else.
//!
//! - [`definition`]: the Shipyard model (Capstan's format and Keptn's `spec.keptn.sh/0.2.x`),
//!   parsing and validation with every problem located.
//! - [`run`]: the run state machine, `decide(state, input) -> events + effects` and
//!   `evolve(state, event) -> state`, with bid/claim dispatch, fencing, retries and timeouts.
//! - [`slo`]: Keptn `slo.yaml` quality gates: parsing and scoring.
//!
//! No I/O, no clock, no randomness: `now`, new ids and random draws are arguments.

pub mod definition;
pub mod duration;
pub mod remediation;
pub mod run;
pub mod slo;

pub use definition::model::*;
pub use definition::{Diagnostic, Diagnostics, Place, parse};
pub use duration::{Millis, Timestamp, parse_duration};
