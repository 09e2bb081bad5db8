//! The broker's domain error, its stable reasons and the class of each.
//!
//! Nothing here knows gRPC: a [`BrokerError`] names a [`Reason`] (a stable
//! string such as `SCHEMA_DRIFT` that clients match on), the [`Class`] of
//! failure it belongs to, the numbers it measured ([`BrokerError::metadata`])
//! and, for malformed input, the field at fault. The gRPC edge
//! (`rpc::status`) turns this into a status with `google.rpc.ErrorInfo` and
//! `google.rpc.BadRequest` details, in one place.

use std::fmt;

/// The class of a failure, chosen by tonic's litmus test: bad input is
/// `InvalidArgument`, a request that cannot succeed in the current state
/// is `FailedPrecondition`, and a NATS outage is `Unavailable` (safe to
/// retry with the same idempotency key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// The request is malformed whatever the state.
    InvalidArgument,
    /// Something the request names does not exist.
    NotFound,
    /// It exists already, or conflicts with what exists.
    AlreadyExists,
    /// The request cannot succeed in the current state.
    FailedPrecondition,
    /// The caller did not prove who it is.
    Unauthenticated,
    /// The caller may not do this.
    PermissionDenied,
    /// The request is larger than the broker accepts.
    OutOfRange,
    /// A concurrent write came first: read again and retry.
    Aborted,
    /// A limit of what the broker stores is reached: retry once room is
    /// made.
    ResourceExhausted,
    /// NATS is unreachable or the broker is draining.
    Unavailable,
    /// A bug or an unexpected answer from the store.
    Internal,
}

/// Defines [`Reason`] with its stable string, class and meaning in one
/// table, so the README's list and the code cannot drift apart.
macro_rules! reasons {
    ($($variant:ident => $text:literal, $class:ident, $doc:literal;)*) => {
        /// A stable, machine-readable reason for a refusal: the
        /// `google.rpc.ErrorInfo.reason` of the status a client receives.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Reason {
            $(#[doc = $doc] $variant,)*
        }

        impl Reason {
            /// Every reason, in the order of the table.
            pub const ALL: &'static [Reason] = &[$(Reason::$variant,)*];

            /// The stable string (`SCHEMA_DRIFT`, ...).
            pub fn as_str(self) -> &'static str {
                match self { $(Reason::$variant => $text,)* }
            }

            /// The class (and so the gRPC code) of this reason.
            pub fn class(self) -> Class {
                match self { $(Reason::$variant => Class::$class,)* }
            }

            /// What the reason means, for documentation.
            pub fn doc(self) -> &'static str {
                match self { $(Reason::$variant => $doc,)* }
            }
        }
    };
}

reasons! {
    InvalidName => "INVALID_NAME", InvalidArgument,
        "a name (agent, run, owner, instance, barrier, branch key, message type) that is not a valid token";
    MalformedRequest => "MALFORMED_REQUEST", InvalidArgument,
        "a missing or malformed field; the field is in the BadRequest details";
    BadDeliveryId => "BAD_DELIVERY_ID", InvalidArgument,
        "a delivery id that is not one the broker issued, or that belongs to another agent";
    InvalidBarrierSpec => "INVALID_BARRIER_SPEC", InvalidArgument,
        "a barrier spec with bad keys or counts, a quorum outside 1..n, a timeout that is not positive";
    TooManyBranches => "TOO_MANY_BRANCHES", InvalidArgument,
        "a barrier with more branches than the broker's cap (10,000)";
    UnknownBranchKey => "UNKNOWN_BRANCH_KEY", InvalidArgument,
        "a fan-out branch whose key is not one of the barrier's, or repeats";
    InvalidContract => "INVALID_CONTRACT", InvalidArgument,
        "a descriptor set that does not decode or lacks the message, or rules that do not apply to it";
    PayloadUndecodable => "PAYLOAD_UNDECODABLE", InvalidArgument,
        "a payload that does not decode as the target's contract";
    RunNotFound => "RUN_NOT_FOUND", NotFound,
        "the run does not exist";
    AgentNotFound => "AGENT_NOT_FOUND", NotFound,
        "the agent (target, subscriber, fallback or barrier target) is not registered";
    ContractNotFound => "CONTRACT_NOT_FOUND", NotFound,
        "the contract, or the version asked for, is not registered";
    InputNotFound => "INPUT_NOT_FOUND", NotFound,
        "the run has no input request with that id";
    DeadLetterNotFound => "DEAD_LETTER_NOT_FOUND", NotFound,
        "no dead letter is kept at that sequence";
    HandoffNotFound => "HANDOFF_NOT_FOUND", NotFound,
        "no handoff with that id was accepted in the run (or the run was purged)";
    BarrierNotFound => "BARRIER_NOT_FOUND", NotFound,
        "the barrier does not exist";
    PayloadNotFound => "PAYLOAD_NOT_FOUND", NotFound,
        "a payload reference names no stored object (never stored, or expired with retention)";
    RunExists => "RUN_EXISTS", AlreadyExists,
        "the run id is already used by another owner";
    ContractConflict => "CONTRACT_CONFLICT", AlreadyExists,
        "the contract version is registered with other content";
    BarrierConflict => "BARRIER_CONFLICT", AlreadyExists,
        "the barrier is already open with another spec";
    RoleConfusion => "ROLE_CONFUSION", AlreadyExists,
        "the consumed delivery already went to another target without declared fan-out";
    RunClosed => "RUN_CLOSED", FailedPrecondition,
        "the run is completed, failed, timed out or cancelled";
    DepthCap => "DEPTH_CAP", FailedPrecondition,
        "the handoff would go deeper than the run's max_depth";
    PayloadTooLarge => "PAYLOAD_TOO_LARGE", FailedPrecondition,
        "the payload is over max_payload_size (or the pinned context over max_inline_payload)";
    EnvelopeTooLarge => "ENVELOPE_TOO_LARGE", FailedPrecondition,
        "the whole handoff envelope is over NATS's max_payload";
    ContractMismatch => "CONTRACT_MISMATCH", FailedPrecondition,
        "the payload is of another type than the target accepts, or no registered version is in its range";
    SchemaDrift => "SCHEMA_DRIFT", FailedPrecondition,
        "the payload carries fields the contract does not know";
    MissingRequiredFields => "MISSING_REQUIRED_FIELDS", FailedPrecondition,
        "required fields of the contract are missing";
    OverTokenBudget => "OVER_TOKEN_BUDGET", FailedPrecondition,
        "the payload is over the contract's max_tokens";
    OverByteBudget => "OVER_BYTE_BUDGET", FailedPrecondition,
        "the payload is over the contract's max_bytes";
    LowConfidence => "LOW_CONFIDENCE", FailedPrecondition,
        "confidence is under the contract's min_confidence, or not stated";
    StaleToolResult => "STALE_TOOL_RESULT", FailedPrecondition,
        "a tool result is older than max_tool_result_age, or has no observed_at";
    IncompatibleContract => "INCOMPATIBLE_CONTRACT", FailedPrecondition,
        "a new contract version breaks its compatibility mode";
    CompatibilityModeFixed => "COMPATIBILITY_MODE_FIXED", FailedPrecondition,
        "a contract version asks for another compatibility mode than the contract's (set by version 1 or SetCompatibility)";
    VersionGap => "VERSION_GAP", FailedPrecondition,
        "a contract version that is neither an existing one nor the next";
    BranchTooLarge => "BRANCH_TOO_LARGE", FailedPrecondition,
        "a branch result that would take the barrier's release past max_payload_size";
    PayloadDigestMismatch => "PAYLOAD_DIGEST_MISMATCH", FailedPrecondition,
        "a payload reference whose size or SHA-256 is not the stored object's";
    DeliveryGone => "DELIVERY_GONE", FailedPrecondition,
        "the consumed delivery's handoff is no longer stored";
    LeaseSuperseded => "LEASE_SUPERSEDED", FailedPrecondition,
        "the delivery's lease passed, or it was delivered again: this attempt may no longer settle it";
    PinnedKey => "PINNED_KEY", FailedPrecondition,
        "a state delta that changes or removes a key the run pinned at StartRun";
    StateTooLarge => "STATE_TOO_LARGE", FailedPrecondition,
        "a state value or the whole run state over its limit (max_state_value_bytes, max_state_bytes); nothing truncated";
    StateTypeMismatch => "STATE_TYPE_MISMATCH", FailedPrecondition,
        "an append to a key that holds no list, or a merge into one that holds no struct";
    DroppedField => "DROPPED_FIELD", FailedPrecondition,
        "a payload field the target's contract says to carry (ContractRules.carry) held a value in the consumed payload and is empty in this one";
    StateConflict => "STATE_CONFLICT", Aborted,
        "a state delta from a base_revision older than the last change of a key it replaces or removes; read the state again and retry";
    StateRevisionNotFound => "STATE_REVISION_NOT_FOUND", NotFound,
        "GetState for a revision the run's state never had, or a run without state";
    AlreadySettled => "ALREADY_SETTLED", FailedPrecondition,
        "the delivery was already settled another way (acked, nacked or rejected)";
    MissingCredentials => "MISSING_CREDENTIALS", Unauthenticated,
        "the call carries no bearer token and no client certificate";
    BadCredentials => "BAD_CREDENTIALS", Unauthenticated,
        "the bearer token is unknown, malformed or wrong, or the certificate names no principal";
    TokenRevoked => "TOKEN_REVOKED", Unauthenticated,
        "the bearer token was revoked";
    NotGranted => "NOT_GRANTED", PermissionDenied,
        "the principal has no grant for this action on this name (or a deny grant matches)";
    BootstrapInUse => "BOOTSTRAP_IN_USE", FailedPrecondition,
        "the bootstrap token cannot disable itself: disable it with an admin API token";
    BadSignature => "BAD_SIGNATURE", PermissionDenied,
        "a delivery id whose signature does not verify (forged or altered)";
    UndeclaredEmit => "UNDECLARED_EMIT", PermissionDenied,
        "the source agent sends a contract it does not declare in emits";
    RequestTooLarge => "REQUEST_TOO_LARGE", OutOfRange,
        "the request is larger than gRPC accepts (max_payload_size plus 4 MiB)";
    StoreFull => "STORE_FULL", ResourceExhausted,
        "a stream or bucket of the broker is at its byte limit (stream_max_bytes): nothing was stored; retry once consumers catch up, or raise the limit";
    NatsUnavailable => "NATS_UNAVAILABLE", Unavailable,
        "NATS is unreachable; retrying with the same idempotency key is safe";
    Draining => "DRAINING", Unavailable,
        "the broker is draining; reconnect to another replica";
    Internal => "INTERNAL", Internal,
        "a bug or an unexpected answer from the store";
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything a broker operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// A name that cannot be a NATS subject token.
    #[error("{field} {value:?} {reason}")]
    InvalidName {
        /// Which field.
        field: &'static str,
        /// The (possibly shortened) value.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A request that is malformed in another way.
    #[error("{message}")]
    Malformed {
        /// Why, as a stable reason (an INVALID_ARGUMENT one).
        reason: Reason,
        /// The field at fault (a path such as `branches[2].branch_key`),
        /// empty when the request as a whole is at fault.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// The run does not exist.
    #[error("run {0:?} not found")]
    RunNotFound(String),
    /// The agent is not registered.
    #[error("agent {0:?} is not registered")]
    AgentNotFound(String),
    /// The run exists already.
    #[error("run {0:?} already exists")]
    RunExists(String),
    /// The run has ended.
    #[error("run {run:?} is {status}; it accepts no more handoffs")]
    RunClosed {
        /// The run.
        run: String,
        /// Its terminal status.
        status: &'static str,
    },
    /// The handoff would go deeper than the run allows.
    #[error(
        "handoff depth {depth} exceeds the run's max_depth {max_depth} (each handoff from a delivery is one hop deeper; start the run with a larger max_depth to allow more)"
    )]
    DepthExceeded {
        /// Depth the handoff would have.
        depth: u32,
        /// The run's cap.
        max_depth: u32,
    },
    /// The payload is larger than the broker accepts.
    #[error(
        "payload is {size} bytes; the limit is {limit} bytes ({setting}); nothing is truncated"
    )]
    PayloadTooLarge {
        /// Encoded payload size.
        size: usize,
        /// The configured limit.
        limit: usize,
        /// The configuration key of the limit.
        setting: &'static str,
    },
    /// A payload reference names no stored object.
    #[error("payload {name:?} is not stored (never stored, or expired with retention)")]
    PayloadNotFound {
        /// The object's name.
        name: String,
    },
    /// A payload reference whose size or digest is not the stored
    /// object's.
    #[error("payload {name:?} is {stored_size} bytes with SHA-256 {stored_sha256}; the reference says {size} bytes with SHA-256 {sha256}")]
    PayloadDigestMismatch {
        /// The object's name.
        name: String,
        /// The size the reference states.
        size: u64,
        /// The digest the reference states.
        sha256: String,
        /// The stored object's size.
        stored_size: u64,
        /// The stored object's digest.
        stored_sha256: String,
    },
    /// The whole envelope (payload, warnings, tool results...) is larger
    /// than NATS accepts.
    #[error(
        "the handoff envelope is {size} bytes; NATS accepts at most {max_payload} (max_payload)"
    )]
    EnvelopeTooLarge {
        /// Encoded envelope size.
        size: usize,
        /// The server's max_payload.
        max_payload: usize,
    },
    /// The consumed delivery cannot be completed.
    #[error("{0}")]
    DeliveryGone(String),
    /// The delivery token does not name a delivery.
    #[error("delivery id is not valid: {0}")]
    BadDeliveryId(String),
    /// The contract, or the version asked for, is not registered.
    #[error("{0}")]
    ContractNotFound(String),
    /// A new contract version breaks its compatibility mode; every
    /// incompatibility is listed.
    #[error(
        "version {version} of {message_type} breaks {mode} compatibility with version {previous}: {}",
        problems.join("; ")
    )]
    Incompatible {
        /// The contract.
        message_type: String,
        /// The version refused.
        version: u32,
        /// The latest registered version.
        previous: u32,
        /// The mode it breaks.
        mode: &'static str,
        /// Each incompatibility.
        problems: Vec<String>,
    },
    /// The contract version exists with other content.
    #[error("{0}")]
    ContractConflict(String),
    /// A version that is neither existing nor the next.
    #[error("{0}")]
    VersionGap(String),
    /// A new version asks for another compatibility mode than the
    /// contract's, which only `SetCompatibility` changes.
    #[error("{message_type} is checked under {stored} compatibility (its mode since version 1 or the last SetCompatibility); version {version} asks for {requested}: leave compatibility unset, or change the mode with SetCompatibility first")]
    ModeFixed {
        /// The contract.
        message_type: String,
        /// The version refused.
        version: u32,
        /// The contract's mode.
        stored: &'static str,
        /// The mode asked for.
        requested: &'static str,
    },
    /// A barrier spec with more branches than a barrier may join.
    #[error("the barrier has {count} branches; a barrier joins at most {limit}")]
    TooManyBranches {
        /// Branches asked for.
        count: usize,
        /// The cap.
        limit: usize,
    },
    /// A branch result that would take its barrier's release past the
    /// largest payload.
    #[error("branch {key:?} of barrier {barrier:?} is {size} bytes; the release carries {used} bytes of branch results already and fits at most {budget} (max_payload_size, less the release's own fields): hand off a smaller result")]
    BranchTooLarge {
        /// The barrier.
        barrier: String,
        /// The branch key.
        key: String,
        /// What the branch adds to the release.
        size: u64,
        /// What recorded branches add already.
        used: u64,
        /// What all branches together may add.
        budget: u64,
    },
    /// A handoff refused at the door by a guard: the reason says which,
    /// the metadata what was measured against what.
    #[error("{message}")]
    Refused {
        /// Which guard refused it.
        reason: Reason,
        /// What was measured against what.
        message: String,
        /// The same, as key/value pairs (field paths, counts, budgets).
        metadata: Vec<(&'static str, String)>,
    },
    /// The run has no input request with that id.
    #[error("no input request {0:?} in the run")]
    InputNotFound(String),
    /// No dead letter at that sequence.
    #[error("no dead letter at sequence {0}")]
    DeadLetterNotFound(u64),
    /// No handoff with that id is in its run's timeline.
    #[error("handoff {0:?} not found")]
    HandoffNotFound(String),
    /// The barrier does not exist.
    #[error("{0}")]
    BarrierNotFound(String),
    /// The barrier exists with another spec.
    #[error("{0}")]
    BarrierExists(String),
    /// NATS or JetStream did not answer.
    #[error("NATS unavailable: {0}")]
    Unavailable(String),
    /// JetStream refused a write: the stream is at its byte limit.
    #[error("{0}")]
    StoreFull(String),
    /// The broker is draining.
    #[error("{0}")]
    Draining(String),
    /// A bug or an unexpected answer from the store.
    #[error("internal error: {0}")]
    Internal(String),
}

impl BrokerError {
    /// A malformed request: `field` is the path of the field at fault.
    pub fn malformed(field: impl Into<String>, message: impl Into<String>) -> Self {
        BrokerError::Malformed {
            reason: Reason::MalformedRequest,
            field: field.into(),
            message: message.into(),
        }
    }

    /// Malformed input with a more precise INVALID_ARGUMENT reason.
    pub fn invalid(reason: Reason, field: impl Into<String>, message: impl Into<String>) -> Self {
        BrokerError::Malformed {
            reason,
            field: field.into(),
            message: message.into(),
        }
    }

    /// The stable reason of this error.
    pub fn reason(&self) -> Reason {
        use BrokerError::*;
        match self {
            InvalidName { .. } => Reason::InvalidName,
            Malformed { reason, .. } | Refused { reason, .. } => *reason,
            BadDeliveryId(_) => Reason::BadDeliveryId,
            RunNotFound(_) => Reason::RunNotFound,
            AgentNotFound(_) => Reason::AgentNotFound,
            ContractNotFound(_) => Reason::ContractNotFound,
            BarrierNotFound(_) => Reason::BarrierNotFound,
            HandoffNotFound(_) => Reason::HandoffNotFound,
            DeadLetterNotFound(_) => Reason::DeadLetterNotFound,
            InputNotFound(_) => Reason::InputNotFound,
            RunExists(_) => Reason::RunExists,
            ContractConflict(_) => Reason::ContractConflict,
            BarrierExists(_) => Reason::BarrierConflict,
            Incompatible { .. } => Reason::IncompatibleContract,
            VersionGap(_) => Reason::VersionGap,
            ModeFixed { .. } => Reason::CompatibilityModeFixed,
            RunClosed { .. } => Reason::RunClosed,
            DepthExceeded { .. } => Reason::DepthCap,
            PayloadTooLarge { .. } => Reason::PayloadTooLarge,
            PayloadNotFound { .. } => Reason::PayloadNotFound,
            PayloadDigestMismatch { .. } => Reason::PayloadDigestMismatch,
            EnvelopeTooLarge { .. } => Reason::EnvelopeTooLarge,
            BranchTooLarge { .. } => Reason::BranchTooLarge,
            TooManyBranches { .. } => Reason::TooManyBranches,
            DeliveryGone(_) => Reason::DeliveryGone,
            Unavailable(_) => Reason::NatsUnavailable,
            StoreFull(_) => Reason::StoreFull,
            Draining(_) => Reason::Draining,
            Internal(_) => Reason::Internal,
        }
    }

    /// The class of this error (what the gRPC code will be).
    pub fn class(&self) -> Class {
        self.reason().class()
    }

    /// The field at fault, for malformed input.
    pub fn field(&self) -> Option<&str> {
        match self {
            BrokerError::InvalidName { field, .. } => Some(field),
            BrokerError::Malformed { field, .. } if !field.is_empty() => Some(field),
            _ => None,
        }
    }

    /// What the error measured or names, as key/value pairs for
    /// `ErrorInfo.metadata` (numbers as decimal strings).
    pub fn metadata(&self) -> Vec<(&'static str, String)> {
        use BrokerError::*;
        match self {
            InvalidName { field, value, .. } => {
                vec![("field", field.to_string()), ("value", value.clone())]
            }
            Malformed { field, .. } if !field.is_empty() => vec![("field", field.clone())],
            RunNotFound(run) | RunExists(run) => vec![("run_id", run.clone())],
            AgentNotFound(agent) => vec![("agent", agent.clone())],
            HandoffNotFound(id) => vec![("handoff_id", id.clone())],
            DeadLetterNotFound(seq) => vec![("sequence", seq.to_string())],
            InputNotFound(id) => vec![("request_id", id.clone())],
            RunClosed { run, status } => {
                vec![("run_id", run.clone()), ("status", status.to_string())]
            }
            DepthExceeded { depth, max_depth } => vec![
                ("depth", depth.to_string()),
                ("max_depth", max_depth.to_string()),
            ],
            PayloadTooLarge {
                size,
                limit,
                setting,
            } => vec![
                ("size", size.to_string()),
                ("limit", limit.to_string()),
                ("setting", setting.to_string()),
            ],
            PayloadNotFound { name } => vec![("name", name.clone())],
            PayloadDigestMismatch {
                name,
                size,
                sha256,
                stored_size,
                stored_sha256,
            } => vec![
                ("name", name.clone()),
                ("size", size.to_string()),
                ("sha256", sha256.clone()),
                ("stored_size", stored_size.to_string()),
                ("stored_sha256", stored_sha256.clone()),
            ],
            EnvelopeTooLarge { size, max_payload } => vec![
                ("size", size.to_string()),
                ("limit", max_payload.to_string()),
            ],
            Incompatible {
                message_type,
                version,
                previous,
                mode,
                problems,
            } => vec![
                ("message_type", message_type.clone()),
                ("version", version.to_string()),
                ("previous", previous.to_string()),
                ("mode", mode.to_string()),
                ("problems", problems.join("; ")),
            ],
            ModeFixed {
                message_type,
                version,
                stored,
                requested,
            } => vec![
                ("message_type", message_type.clone()),
                ("version", version.to_string()),
                ("stored_mode", stored.to_string()),
                ("requested_mode", requested.to_string()),
            ],
            TooManyBranches { count, limit } => {
                vec![("count", count.to_string()), ("limit", limit.to_string())]
            }
            BranchTooLarge {
                barrier,
                key,
                size,
                used,
                budget,
            } => vec![
                ("barrier_id", barrier.clone()),
                ("branch_key", key.clone()),
                ("size", size.to_string()),
                ("used", used.to_string()),
                ("limit", budget.to_string()),
            ],
            Refused { metadata, .. } => metadata.clone(),
            _ => Vec::new(),
        }
    }

    /// A refusal for who the caller is (or is not): `reason` is one of the
    /// UNAUTHENTICATED or PERMISSION_DENIED reasons.
    pub fn denied(
        reason: Reason,
        message: impl Into<String>,
        metadata: Vec<(&'static str, String)>,
    ) -> Self {
        BrokerError::Refused {
            reason,
            message: message.into(),
            metadata,
        }
    }

    /// Wraps a NATS error as UNAVAILABLE, keeping its text; a write
    /// JetStream refused for a stream's limits is STORE_FULL.
    pub fn nats(context: &str, err: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        let err = err.into();
        if at_stream_limit(&*err) {
            return BrokerError::StoreFull(format!(
                "{context}: {err}: a stream of the broker is at its byte limit (stream_max_bytes); nothing was stored"
            ));
        }
        BrokerError::Unavailable(format!("{context}: {err}"))
    }
}

/// JetStream's error code for a write its store refused
/// (`JSStreamStoreFailedF`).
const STREAM_STORE_FAILED: u64 = 10077;

/// Whether `err` (or an error it wraps) is JetStream refusing a write for a
/// stream's limits: error code 10077 with the store's limit error ("maximum
/// bytes exceeded", "maximum messages exceeded", ...; the stream discards
/// nothing, `DiscardNew`).
fn at_stream_limit(err: &(dyn std::error::Error + 'static)) -> bool {
    jetstream_error(err).is_some_and(|js| {
        js.error_code().0 == STREAM_STORE_FAILED && js.to_string().starts_with("maximum ")
    })
}

/// JetStream's own answer inside `err`, looked for through the errors it
/// wraps (async-nats wraps it in the error of each call).
pub(crate) fn jetstream_error<'a>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a async_nats::jetstream::Error> {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(js) = e.downcast_ref::<async_nats::jetstream::Error>() {
            return Some(js);
        }
        next = e.source();
    }
    None
}

/// Result alias of the broker.
pub type Result<T, E = BrokerError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_unique_upper_snake_case() {
        let mut seen = std::collections::HashSet::new();
        for r in Reason::ALL {
            let s = r.as_str();
            assert!(seen.insert(s), "{s} twice");
            assert!(s.chars().all(|c| c.is_ascii_uppercase() || c == '_'), "{s}");
            assert!(!r.doc().is_empty());
        }
    }

    #[test]
    fn errors_name_their_reason_class_and_numbers() {
        let e = BrokerError::DepthExceeded {
            depth: 6,
            max_depth: 5,
        };
        assert_eq!(e.reason(), Reason::DepthCap);
        assert_eq!(e.class(), Class::FailedPrecondition);
        assert_eq!(
            e.metadata(),
            vec![("depth", "6".to_string()), ("max_depth", "5".to_string())]
        );
        let e = BrokerError::malformed("payload", "payload is required");
        assert_eq!(e.reason(), Reason::MalformedRequest);
        assert_eq!(e.class(), Class::InvalidArgument);
        assert_eq!(e.field(), Some("payload"));
        assert_eq!(e.to_string(), "payload is required");
    }
}

#[cfg(test)]
mod readme {
    use super::Reason;

    /// The README's error table lists every reason with its code.
    #[test]
    fn the_error_table_lists_every_reason() {
        let readme = include_str!("../../README.md");
        let table = readme
            .split("### Errors")
            .nth(1)
            .and_then(|s| s.split("\n\n|").nth(1))
            .unwrap_or_default();
        for r in Reason::ALL {
            let code = match r.class() {
                super::Class::InvalidArgument => "INVALID_ARGUMENT",
                super::Class::NotFound => "NOT_FOUND",
                super::Class::AlreadyExists => "ALREADY_EXISTS",
                super::Class::FailedPrecondition => "FAILED_PRECONDITION",
                super::Class::Unauthenticated => "UNAUTHENTICATED",
                super::Class::PermissionDenied => "PERMISSION_DENIED",
                super::Class::OutOfRange => "OUT_OF_RANGE",
                super::Class::Aborted => "ABORTED",
                super::Class::ResourceExhausted => "RESOURCE_EXHAUSTED",
                super::Class::Unavailable => "UNAVAILABLE",
                super::Class::Internal => "INTERNAL",
            };
            let row = format!("| `{code}` | `{}` |", r.as_str());
            let line = table
                .lines()
                .find(|l| l.starts_with(&row))
                .unwrap_or_else(|| panic!("README error table lacks {row}"));
            let disposition = handoff_proto::reasons::disposition(r.as_str())
                .unwrap_or_else(|| panic!("reasons.txt lacks {}", r.as_str()));
            assert!(
                line.ends_with(&format!("| {} |", disposition.as_str())),
                "README row of {} does not end with its disposition: {line}",
                r.as_str()
            );
        }
    }

    /// The shared table lists every reason, and nothing else.
    #[test]
    fn the_reasons_table_is_the_brokers() {
        let mine: Vec<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        let table: Vec<&str> = handoff_proto::reasons::all().map(|(r, _)| r).collect();
        assert_eq!(table, mine);
    }
}
