//! The API's errors and their mapping to gRPC status codes and HTTP status codes: the only place
//! where either mapping lives. A user's mistake always gets a specific code and a sentence that
//! says what to change; `Internal` is kept for faults of the server itself.

use capstan_engine::run;

use crate::runtime::RuntimeError;

/// Why an API call was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A field of the request is wrong; `field` names it.
    #[error("{field}: {message}")]
    InvalidArgument { field: String, message: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// The request is well-formed but does not fit the current state (e.g. approving a task that
    /// is not waiting).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A concurrent writer won; retrying the call may succeed.
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    /// The request is larger than the configured limit.
    #[error("{0}")]
    TooLarge(String),
    /// The content type of the request is not one the endpoint reads.
    #[error("{0}")]
    UnsupportedMedia(String),
    /// A backend is down or the server is stopping: retry later.
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// An invalid field.
    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        ApiError::InvalidArgument { field: field.to_string(), message: message.into() }
    }

    /// A required field that is empty.
    pub fn missing(field: &str) -> Self {
        ApiError::invalid(field, "is required")
    }

    /// The HTTP status for this error.
    pub fn http_status(&self) -> u16 {
        match self {
            ApiError::InvalidArgument { .. } => 400,
            ApiError::Unauthenticated(_) => 401,
            ApiError::PermissionDenied(_) => 403,
            ApiError::NotFound(_) => 404,
            ApiError::AlreadyExists(_) | ApiError::Aborted(_) | ApiError::FailedPrecondition(_) => 409,
            ApiError::TooLarge(_) => 413,
            ApiError::UnsupportedMedia(_) => 415,
            ApiError::Unavailable(_) => 503,
            ApiError::Internal(_) => 500,
        }
    }

    /// The gRPC code for this error.
    pub fn grpc_code(&self) -> tonic::Code {
        match self {
            ApiError::InvalidArgument { .. } | ApiError::UnsupportedMedia(_) => tonic::Code::InvalidArgument,
            ApiError::NotFound(_) => tonic::Code::NotFound,
            ApiError::AlreadyExists(_) => tonic::Code::AlreadyExists,
            ApiError::FailedPrecondition(_) => tonic::Code::FailedPrecondition,
            ApiError::Aborted(_) => tonic::Code::Aborted,
            ApiError::Unauthenticated(_) => tonic::Code::Unauthenticated,
            ApiError::PermissionDenied(_) => tonic::Code::PermissionDenied,
            ApiError::TooLarge(_) => tonic::Code::ResourceExhausted,
            ApiError::Unavailable(_) => tonic::Code::Unavailable,
            ApiError::Internal(_) => tonic::Code::Internal,
        }
    }
}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        tonic::Status::new(e.grpc_code(), e.to_string())
    }
}

impl From<RuntimeError> for ApiError {
    fn from(e: RuntimeError) -> Self {
        match e {
            RuntimeError::Store(s) => s.into(),
            RuntimeError::Refused(r) => r.into(),
            RuntimeError::InvalidDefinition(text) => ApiError::invalid("source", text),
            RuntimeError::InvalidTrigger(text) => ApiError::invalid("event", text),
            RuntimeError::NotFound(what) => ApiError::NotFound(format!("{what} not found")),
            RuntimeError::WrongProject { run_id } => {
                ApiError::PermissionDenied(format!("run {run_id} belongs to another project"))
            }
            RuntimeError::Duplicate(id) => ApiError::AlreadyExists(format!("input {id} was already applied")),
            RuntimeError::ShuttingDown => ApiError::Unavailable("the server is shutting down".into()),
            RuntimeError::Broker(b) => ApiError::Unavailable(format!("broker: {b}")),
            RuntimeError::Codec(c) => ApiError::Internal(c.to_string()),
        }
    }
}

impl From<capstan_store::Error> for ApiError {
    fn from(e: capstan_store::Error) -> Self {
        use capstan_store::Error as S;
        match e {
            S::Conflict { .. } => ApiError::Aborted(format!("a concurrent change won, retry: {e}")),
            S::DuplicateInput(_) => ApiError::AlreadyExists(e.to_string()),
            S::Invalid(m) => ApiError::invalid("request", m),
            S::Unavailable(_) => ApiError::Unavailable(e.to_string()),
        }
    }
}

impl From<run::Error> for ApiError {
    fn from(e: run::Error) -> Self {
        let text = e.to_string();
        match e {
            run::Error::NotStarted => ApiError::NotFound(text),
            run::Error::AlreadyStarted(_) => ApiError::AlreadyExists(text),
            run::Error::UnknownSequence { .. } => ApiError::NotFound(text),
            run::Error::UnknownTask(_) => ApiError::invalid("task", text),
            run::Error::NotAwaitingApproval { .. } | run::Error::RunOver | run::Error::Queued => {
                ApiError::FailedPrecondition(text)
            }
            run::Error::WrongProject { .. } => ApiError::PermissionDenied(text),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_mistakes_never_map_to_unknown_or_internal() {
        let cases: Vec<(RuntimeError, tonic::Code, u16)> = vec![
            (RuntimeError::NotFound("run x".into()), tonic::Code::NotFound, 404),
            (RuntimeError::InvalidDefinition("bad".into()), tonic::Code::InvalidArgument, 400),
            (
                RuntimeError::Refused(run::Error::NotAwaitingApproval { task: "t".into() }),
                tonic::Code::FailedPrecondition,
                409,
            ),
            (RuntimeError::Refused(run::Error::AlreadyStarted("r".into())), tonic::Code::AlreadyExists, 409),
            (
                RuntimeError::Store(capstan_store::Error::Conflict { run_id: "r".into(), expected: 1, actual: 2 }),
                tonic::Code::Aborted,
                409,
            ),
            (RuntimeError::WrongProject { run_id: "r".into() }, tonic::Code::PermissionDenied, 403),
        ];
        for (err, code, http) in cases {
            let api = ApiError::from(err);
            assert_eq!((api.grpc_code(), api.http_status()), (code, http), "{api}");
        }
        assert_eq!(ApiError::missing("stage").to_string(), "stage: is required");
    }
}
