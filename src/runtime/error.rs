//! The runtime's error type: what an API caller or the CLI is told when an input is refused.

use capstan_engine::run;

use super::codec::CodecError;

/// Why the runtime refused or failed an operation.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Store(#[from] capstan_store::Error),
    #[error(transparent)]
    Broker(#[from] capstan_brokers::Error),
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The engine refused the input; nothing was recorded.
    #[error("refused: {0}")]
    Refused(#[from] run::Error),
    #[error("definition is invalid:\n{0}")]
    InvalidDefinition(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("run {run_id} belongs to another project")]
    WrongProject { run_id: String },
    #[error("input {0} was already applied")]
    Duplicate(String),
    #[error("not a usable sequence trigger: {0}")]
    InvalidTrigger(String),
    #[error("the runtime is shutting down")]
    ShuttingDown,
}
