//! The broker's error type and its single mapping to gRPC statuses.
//!
//! Domain code returns [`BrokerError`]; the gRPC edge turns it into a
//! [`tonic::Status`] with `From`, choosing the code by tonic's litmus test:
//! bad input is INVALID_ARGUMENT, a request that cannot succeed in the
//! current state is FAILED_PRECONDITION, and a NATS outage is UNAVAILABLE
//! (safe to retry with the same idempotency key).

use tonic::{Code, Status};

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
    #[error("{0}")]
    Malformed(String),
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
    #[error("handoff depth {depth} exceeds the run's max_depth {max_depth}")]
    DepthExceeded {
        /// Depth the handoff would have.
        depth: u32,
        /// The run's cap.
        max_depth: u32,
    },
    /// The payload is larger than the inline limit.
    #[error("payload is {size} bytes; the inline limit is {limit} bytes (max_inline_payload)")]
    PayloadTooLarge {
        /// Encoded payload size.
        size: usize,
        /// The configured limit.
        limit: usize,
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
    /// A handoff refused at the door by a contract guard (`rule`); the
    /// A branch result that would make its barrier's release handoff
    /// larger than one NATS message.
    #[error("branch {key:?} of barrier {barrier:?} is {size} bytes; the release carries {used} bytes of branch results already and fits at most {budget} (the NATS max_payload, less the release's own fields): hand off a smaller result")]
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
    /// code depends on the guard.
    #[error("{message}")]
    Refused {
        /// The guard: `decode`, `unknown_fields`, `max_tokens`, ...
        rule: &'static str,
        /// Its gRPC code.
        code: Code,
        /// What was measured against what.
        message: String,
    },
    /// The barrier does not exist.
    #[error("{0}")]
    BarrierNotFound(String),
    /// The barrier exists with another spec.
    #[error("{0}")]
    BarrierExists(String),
    /// NATS or JetStream did not answer.
    #[error("NATS unavailable: {0}")]
    Unavailable(String),
    /// A bug or an unexpected answer from the store.
    #[error("internal error: {0}")]
    Internal(String),
}

impl BrokerError {
    /// The gRPC code this error maps to.
    pub fn code(&self) -> Code {
        use BrokerError::*;
        match self {
            InvalidName { .. } | Malformed(_) | BadDeliveryId(_) => Code::InvalidArgument,
            RunNotFound(_) | AgentNotFound(_) | ContractNotFound(_) | BarrierNotFound(_) => {
                Code::NotFound
            }
            RunExists(_) | ContractConflict(_) | BarrierExists(_) => Code::AlreadyExists,
            Refused { code, .. } => *code,
            Incompatible { .. }
            | VersionGap(_)
            | RunClosed { .. }
            | DepthExceeded { .. }
            | PayloadTooLarge { .. }
            | EnvelopeTooLarge { .. }
            | BranchTooLarge { .. }
            | DeliveryGone(_) => Code::FailedPrecondition,
            Unavailable(_) => Code::Unavailable,
            Internal(_) => Code::Internal,
        }
    }

    /// Wraps a NATS error as UNAVAILABLE, keeping its text.
    pub fn nats(context: &str, err: impl std::fmt::Display) -> Self {
        BrokerError::Unavailable(format!("{context}: {err}"))
    }
}

impl From<BrokerError> for Status {
    fn from(err: BrokerError) -> Self {
        Status::new(err.code(), err.to_string())
    }
}

/// Result alias of the broker.
pub type Result<T, E = BrokerError> = std::result::Result<T, E>;
