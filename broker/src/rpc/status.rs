//! The one mapping from the domain error to a gRPC status: the code from
//! the error's class, the message from its text, and in the details a
//! `google.rpc.ErrorInfo` (domain `handoff.v1`, the stable reason, the
//! numbers as metadata) and, for malformed input, a `google.rpc.BadRequest`
//! naming the field.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::error::{BrokerError, Class, Reason};

/// The `ErrorInfo.domain` of every error the broker answers.
pub const DOMAIN: &str = "handoff.v1";

/// The gRPC code of a class of errors.
pub fn code_of(class: Class) -> Code {
    match class {
        Class::InvalidArgument => Code::InvalidArgument,
        Class::NotFound => Code::NotFound,
        Class::AlreadyExists => Code::AlreadyExists,
        Class::FailedPrecondition => Code::FailedPrecondition,
        Class::Unauthenticated => Code::Unauthenticated,
        Class::PermissionDenied => Code::PermissionDenied,
        Class::OutOfRange => Code::OutOfRange,
        Class::Aborted => Code::Aborted,
        Class::ResourceExhausted => Code::ResourceExhausted,
        Class::Unavailable => Code::Unavailable,
        Class::Internal => Code::Internal,
    }
}

/// The details of a status for `reason` with `metadata`, and a field
/// violation when a field is named.
pub fn details(
    reason: Reason,
    metadata: Vec<(&'static str, String)>,
    field: Option<(&str, &str)>,
) -> ErrorDetails {
    let metadata: HashMap<String, String> = metadata
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let mut details = ErrorDetails::new();
    details.set_error_info(reason.as_str(), DOMAIN, metadata);
    if let Some((field, description)) = field {
        details.add_bad_request_violation(field, description);
    }
    details
}

/// The status a client receives for `err`.
pub fn to_status(err: BrokerError) -> Status {
    let message = err.to_string();
    let details = details(
        err.reason(),
        err.metadata(),
        err.field().map(|f| (f, message.as_str())),
    );
    Status::with_error_details(code_of(err.class()), message.clone(), details)
}

/// Adds the details to a status the transport answered on its own: a
/// request over the size gRPC accepts is OUT_OF_RANGE before any handler
/// runs, and gets `REQUEST_TOO_LARGE` here, so that every refusal names
/// its reason. (The broker's handlers never answer OUT_OF_RANGE.)
pub fn explain_transport_status(
    mut res: tonic::codegen::http::Response<tonic::body::Body>,
) -> tonic::codegen::http::Response<tonic::body::Body> {
    let headers = res.headers_mut();
    let out_of_range = headers
        .get("grpc-status")
        .is_some_and(|v| v.as_bytes() == b"11");
    if out_of_range && !headers.contains_key("grpc-status-details-bin") {
        let message = Status::from_header_map(headers)
            .map(|s| s.message().to_string())
            .unwrap_or_default();
        let details = details(Reason::RequestTooLarge, Vec::new(), None);
        let status = Status::with_error_details(Code::OutOfRange, message, details);
        if let Err(e) = status.add_header(headers) {
            tracing::debug!(error = %e, "status details not added");
        }
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_carry_reason_metadata_and_field() {
        let status = to_status(BrokerError::DepthExceeded {
            depth: 6,
            max_depth: 5,
        });
        assert_eq!(status.code(), Code::FailedPrecondition);
        let info = status.get_details_error_info().expect("error info");
        assert_eq!(info.reason, "DEPTH_CAP");
        assert_eq!(info.domain, DOMAIN);
        assert_eq!(
            info.metadata.get("max_depth").map(String::as_str),
            Some("5")
        );
        assert!(status.get_details_bad_request().is_none());

        let status = to_status(BrokerError::malformed(
            "confidence",
            "confidence 2 is outside [0, 1]",
        ));
        assert_eq!(status.code(), Code::InvalidArgument);
        let bad = status.get_details_bad_request().expect("bad request");
        assert_eq!(bad.field_violations.len(), 1);
        assert_eq!(bad.field_violations[0].field, "confidence");
    }
}
