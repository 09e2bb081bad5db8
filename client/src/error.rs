//! SDK errors: one type with a matchable [`ErrorKind`].

use std::fmt;

/// What went wrong, for callers to match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Malformed request or bad name (gRPC INVALID_ARGUMENT).
    InvalidArgument,
    /// Unknown run, agent or delivery (NOT_FOUND).
    NotFound,
    /// The thing exists already, or conflicts with what exists (ALREADY_EXISTS).
    AlreadyExists,
    /// The request cannot succeed in the current state: depth cap, closed
    /// run, over a budget (FAILED_PRECONDITION).
    FailedPrecondition,
    /// Not allowed (PERMISSION_DENIED / UNAUTHENTICATED).
    PermissionDenied,
    /// The broker or NATS is unavailable; retrying with the same
    /// idempotency key is safe (UNAVAILABLE).
    Unavailable,
    /// No answer in time.
    Timeout,
    /// The broker could not be reached at all.
    Connect,
    /// A payload did not decode as the requested type.
    Decode,
    /// The subscription or stream is closed.
    Closed,
    /// Anything else (INTERNAL, UNKNOWN, ...).
    Other,
}

/// An SDK error: a kind, the broker's message and the gRPC code if any.
#[derive(Debug, Clone)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    code: Option<tonic::Code>,
}

impl Error {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error {
            kind,
            message: message.into(),
            code: None,
        }
    }

    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The broker's message (it names the field and the numbers).
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The gRPC status code, when the error came from the broker.
    pub fn code(&self) -> Option<tonic::Code> {
        self.code
    }

    pub(crate) fn from_code(code: i32, message: String) -> Error {
        Error::from(tonic::Status::new(tonic::Code::from(code), message))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.code {
            Some(code) => write!(f, "{:?}: {}", code, self.message),
            None => write!(f, "{:?}: {}", self.kind, self.message),
        }
    }
}

impl std::error::Error for Error {}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Error {
        use tonic::Code;
        let kind = match status.code() {
            Code::InvalidArgument | Code::OutOfRange => ErrorKind::InvalidArgument,
            Code::NotFound => ErrorKind::NotFound,
            Code::AlreadyExists => ErrorKind::AlreadyExists,
            Code::FailedPrecondition | Code::ResourceExhausted => ErrorKind::FailedPrecondition,
            Code::PermissionDenied | Code::Unauthenticated => ErrorKind::PermissionDenied,
            Code::Unavailable | Code::Aborted => ErrorKind::Unavailable,
            Code::DeadlineExceeded => ErrorKind::Timeout,
            Code::Cancelled => ErrorKind::Closed,
            _ => ErrorKind::Other,
        };
        Error {
            kind,
            message: status.message().to_string(),
            code: Some(status.code()),
        }
    }
}

impl From<tonic::transport::Error> for Error {
    fn from(e: tonic::transport::Error) -> Error {
        Error::new(ErrorKind::Connect, e.to_string())
    }
}

impl From<prost::DecodeError> for Error {
    fn from(e: prost::DecodeError) -> Error {
        Error::new(ErrorKind::Decode, e.to_string())
    }
}

/// Result alias of the SDK.
pub type Result<T, E = Error> = std::result::Result<T, E>;
