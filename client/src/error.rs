//! SDK errors: one type with a matchable [`ErrorKind`], and, when the
//! broker attached them, the machine-readable details of its status: the
//! `google.rpc.ErrorInfo` reason and metadata and the
//! `google.rpc.BadRequest` field violations.

use std::{collections::HashMap, fmt, sync::LazyLock};

use tonic_types::StatusExt as _;

pub use handoff_proto::reasons::Disposition;

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
    /// A concurrent change came first (ABORTED): a state delta's base
    /// revision is stale for the keys in the error's metadata; read the
    /// state again, redo the delta, and retry.
    Conflict,
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

/// One malformed field of a request, from the `google.rpc.BadRequest`
/// the broker attaches to an INVALID_ARGUMENT status.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct FieldViolation {
    /// Dot-separated path of the field in the request (`spec.keys`).
    pub field: String,
    /// Why the field was refused.
    pub description: String,
}

/// An SDK error: a kind, the broker's message and the gRPC code if any,
/// and the structured details the broker attached to its status.
///
/// Match on [`Error::kind`] for the class of failure and on
/// [`Error::reason`] for the broker's precise cause; neither requires
/// parsing [`Error::message`], which is meant for people.
#[derive(Debug, Clone)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    code: Option<tonic::Code>,
    /// Boxed so that `Result<T, Error>` stays small on the happy path;
    /// `None` when the status carried no details we know.
    details: Option<Box<Details>>,
}

/// What the broker's status details held: the `ErrorInfo` reason and
/// metadata, and the `BadRequest` field violations.
#[derive(Debug, Clone, Default)]
struct Details {
    reason: Option<String>,
    metadata: HashMap<String, String>,
    field_violations: Vec<FieldViolation>,
}

/// The metadata of an error without any, so [`Error::metadata`] can
/// always hand out a reference.
static NO_METADATA: LazyLock<HashMap<String, String>> = LazyLock::new(HashMap::new);

impl Error {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error {
            kind,
            message: message.into(),
            code: None,
            details: None,
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

    /// The broker's stable reason for the failure: the `reason` of the
    /// `google.rpc.ErrorInfo` (domain `handoff.v1`) in the status details,
    /// an `UPPER_SNAKE_CASE` word such as `SCHEMA_DRIFT`, `DEPTH_CAP` or
    /// `ROLE_CONFUSION`. `None` when the status carried no `ErrorInfo`
    /// (older brokers, and errors raised by the SDK itself).
    ///
    /// Match on it instead of parsing [`Error::message`]:
    ///
    /// ```no_run
    /// # async fn demo(client: handoff_client::Client, handoff: handoff_client::Handoff) {
    /// match client.handoff(handoff).await {
    ///     Ok(receipt) => println!("stored as {}", receipt.handoff_id),
    ///     Err(err) => match err.reason() {
    ///         Some("SCHEMA_DRIFT") => eprintln!("re-register the contract: {err}"),
    ///         Some("DEPTH_CAP") => eprintln!("the run is too deep: {:?}", err.metadata()),
    ///         _ => eprintln!("handoff refused: {err}"),
    ///     },
    /// }
    /// # }
    /// ```
    pub fn reason(&self) -> Option<&str> {
        self.details.as_ref()?.reason.as_deref()
    }

    /// The `metadata` of the broker's `google.rpc.ErrorInfo`: the numbers
    /// and names behind [`Error::reason`], as strings. Empty when there is
    /// none.
    ///
    /// ```no_run
    /// # fn demo(err: handoff_client::Error) {
    /// match err.reason() {
    ///     Some("DEPTH_CAP") => {
    ///         eprintln!("the run reached its depth cap");
    ///         for (key, value) in err.metadata() {
    ///             eprintln!("  {key} = {value}");
    ///         }
    ///     }
    ///     _ => eprintln!("{err}"),
    /// }
    /// # }
    /// ```
    pub fn metadata(&self) -> &HashMap<String, String> {
        match &self.details {
            Some(details) => &details.metadata,
            None => &NO_METADATA,
        }
    }

    /// The fields the broker refused, from the `google.rpc.BadRequest` it
    /// attaches to a malformed request (INVALID_ARGUMENT). Empty when
    /// there is none.
    ///
    /// ```no_run
    /// # fn demo(err: handoff_client::Error) {
    /// for violation in err.field_violations() {
    ///     eprintln!("{}: {}", violation.field, violation.description);
    /// }
    /// # }
    /// ```
    pub fn field_violations(&self) -> &[FieldViolation] {
        match &self.details {
            Some(details) => &details.field_violations,
            None => &[],
        }
    }

    /// What to do about this error: the broker's table of reasons
    /// (`proto/handoff/v1/reasons.txt`) for a refusal; for an error
    /// without a known reason, by its kind (unavailable, timed out, not
    /// reached, closed, or an unexplained failure such as a reset stream:
    /// retryable; a conflict: conflict; anything else: terminal).
    pub fn disposition(&self) -> Disposition {
        if let Some(d) = self.reason().and_then(handoff_proto::reasons::disposition) {
            return d;
        }
        match self.kind {
            ErrorKind::Unavailable
            | ErrorKind::Timeout
            | ErrorKind::Connect
            | ErrorKind::Closed => Disposition::Retryable,
            ErrorKind::Conflict => Disposition::Conflict,
            _ => Disposition::Terminal,
        }
    }

    /// The reason and its metadata as one line, keys in order
    /// (`STATE_TOO_LARGE key=messages limit=65536 size=81046`); the
    /// message when there is no reason. What a worker rejects a delivery
    /// with on a terminal refusal.
    pub fn summary(&self) -> String {
        let Some(reason) = self.reason() else {
            return self.message.clone();
        };
        let mut keys: Vec<(&String, &String)> = self.metadata().iter().collect();
        keys.sort();
        let mut line = reason.to_string();
        for (k, v) in keys {
            line.push_str(&format!(" {k}={v}"));
        }
        line
    }

    /// The error of a refused settlement on a subscription: its code,
    /// message and reason (`BAD_DELIVERY_ID`, ...; empty for none).
    pub(crate) fn from_settled(code: i32, message: String, reason: String) -> Error {
        let mut err = Error::from(tonic::Status::new(tonic::Code::from(code), message));
        if !reason.is_empty() {
            err.details.get_or_insert_with(Box::default).reason = Some(reason);
        }
        err
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.code {
            Some(code) => write!(f, "{code:?}")?,
            None => write!(f, "{:?}", self.kind)?,
        }
        if let Some(reason) = self.reason() {
            write!(f, " [{reason}]")?;
        }
        write!(f, ": {}", self.message)
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
            Code::Unavailable => ErrorKind::Unavailable,
            Code::Aborted => ErrorKind::Conflict,
            Code::DeadlineExceeded => ErrorKind::Timeout,
            Code::Cancelled => ErrorKind::Closed,
            _ => ErrorKind::Other,
        };
        Error {
            kind,
            message: status.message().to_string(),
            code: Some(status.code()),
            details: Details::of(&status).map(Box::new),
        }
    }
}

impl Details {
    /// The details of `status` that the SDK exposes, or `None` when it
    /// carries none (no `grpc-status-details-bin`, or details that do not
    /// decode: the code and message still stand on their own).
    fn of(status: &tonic::Status) -> Option<Details> {
        if status.details().is_empty() {
            return None;
        }
        let info = status.get_details_error_info();
        let field_violations: Vec<FieldViolation> = status
            .get_details_bad_request()
            .map(|bad| {
                bad.field_violations
                    .into_iter()
                    .map(|v| FieldViolation {
                        field: v.field,
                        description: v.description,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let (reason, metadata) = match info {
            Some(info) => (
                (!info.reason.is_empty()).then_some(info.reason),
                info.metadata,
            ),
            None => (None, HashMap::new()),
        };
        if reason.is_none() && metadata.is_empty() && field_violations.is_empty() {
            return None;
        }
        Some(Details {
            reason,
            metadata,
            field_violations,
        })
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use tonic::Code;
    use tonic_types::{ErrorDetails, StatusExt as _};

    use super::*;

    fn depth_cap() -> tonic::Status {
        tonic::Status::with_error_details(
            Code::FailedPrecondition,
            "run r1 is at depth 5, its cap",
            ErrorDetails::with_error_info(
                "DEPTH_CAP",
                "handoff.v1",
                HashMap::from([
                    ("depth".to_string(), "5".to_string()),
                    ("max_depth".to_string(), "5".to_string()),
                ]),
            ),
        )
    }

    #[test]
    fn error_info_gives_reason_and_metadata() {
        let err = Error::from(depth_cap());
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
        assert_eq!(err.code(), Some(Code::FailedPrecondition));
        assert_eq!(err.reason(), Some("DEPTH_CAP"));
        assert_eq!(
            err.metadata().get("max_depth").map(String::as_str),
            Some("5")
        );
        assert_eq!(err.metadata().len(), 2);
        assert!(err.field_violations().is_empty());
        assert_eq!(err.message(), "run r1 is at depth 5, its cap");
        assert_eq!(
            err.to_string(),
            "FailedPrecondition [DEPTH_CAP]: run r1 is at depth 5, its cap"
        );
    }

    #[test]
    fn bad_request_gives_field_violations() {
        let mut details = ErrorDetails::with_bad_request_violation("run_id", "contains '.'");
        details.add_bad_request_violation("target", "empty");
        let status = tonic::Status::with_error_details(Code::InvalidArgument, "bad names", details);
        let err = Error::from(status);
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert_eq!(err.reason(), None);
        assert!(err.metadata().is_empty());
        let fields: Vec<(&str, &str)> = err
            .field_violations()
            .iter()
            .map(|v| (v.field.as_str(), v.description.as_str()))
            .collect();
        assert_eq!(fields, [("run_id", "contains '.'"), ("target", "empty")]);
        assert_eq!(err.to_string(), "InvalidArgument: bad names");
    }

    #[test]
    fn error_info_and_bad_request_together() {
        let mut details = ErrorDetails::with_error_info(
            "INVALID_NAME",
            "handoff.v1",
            HashMap::from([("field".to_string(), "agent".to_string())]),
        );
        details.add_bad_request_violation("agent", "must match [A-Za-z0-9_-]{1,128}");
        let status = tonic::Status::with_error_details(Code::InvalidArgument, "bad agent", details);
        let err = Error::from(status);
        assert_eq!(err.reason(), Some("INVALID_NAME"));
        assert_eq!(
            err.metadata().get("field").map(String::as_str),
            Some("agent")
        );
        assert_eq!(err.field_violations().len(), 1);
        assert_eq!(err.field_violations()[0].field, "agent");
        assert_eq!(err.to_string(), "InvalidArgument [INVALID_NAME]: bad agent");
    }

    #[test]
    fn status_without_details_has_none() {
        let err = Error::from(tonic::Status::not_found("no run r1"));
        assert_eq!(err.kind(), ErrorKind::NotFound);
        assert_eq!(err.reason(), None);
        assert!(err.metadata().is_empty());
        assert!(err.field_violations().is_empty());
        assert_eq!(err.to_string(), "NotFound: no run r1");
    }

    #[test]
    fn settle_answers_carry_their_reason() {
        let err = Error::from_settled(
            Code::InvalidArgument as i32,
            "not a token".to_string(),
            "BAD_DELIVERY_ID".to_string(),
        );
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert_eq!(err.reason(), Some("BAD_DELIVERY_ID"));
        assert_eq!(
            err.to_string(),
            "InvalidArgument [BAD_DELIVERY_ID]: not a token"
        );
        let old = Error::from_settled(
            Code::FailedPrecondition as i32,
            "lease expired".to_string(),
            String::new(),
        );
        assert_eq!(old.reason(), None);
        assert_eq!(old.to_string(), "FailedPrecondition: lease expired");
    }

    #[test]
    fn undecodable_or_empty_details_are_ignored() {
        let garbage = tonic::Status::with_details(
            Code::FailedPrecondition,
            "odd proxy",
            bytes::Bytes::from_static(&[0xff, 0xff, 0xff]),
        );
        let err = Error::from(garbage);
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
        assert_eq!(err.reason(), None);
        assert!(err.metadata().is_empty());
        assert!(err.field_violations().is_empty());

        let empty_reason = tonic::Status::with_error_details(
            Code::Internal,
            "boom",
            ErrorDetails::with_error_info("", "handoff.v1", HashMap::new()),
        );
        let err = Error::from(empty_reason);
        assert_eq!(err.reason(), None);
        assert_eq!(err.to_string(), "Internal: boom");
    }

    #[test]
    fn sdk_errors_have_no_details() {
        let err = Error::new(ErrorKind::Decode, "not a Subtask");
        assert_eq!(err.reason(), None);
        assert!(err.metadata().is_empty());
        assert!(err.field_violations().is_empty());
        assert_eq!(err.to_string(), "Decode: not a Subtask");
    }
}
