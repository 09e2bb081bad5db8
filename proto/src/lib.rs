//! The `handoff.v1` protobuf API, generated once from `handoff/v1/*.proto`.
//!
//! The broker and the SDK both depend on this crate so that codegen runs in
//! one place. [`pb`] holds the messages and the `HandoffBroker` client and
//! server; [`FILE_DESCRIPTOR_SET`] feeds gRPC server reflection.

/// Messages, enums and gRPC stubs of package `handoff.v1`.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod pb {
    tonic::include_proto!("handoff.v1");
}

/// The server side of `handoff.v1.HandoffBroker` (its messages are in
/// [`pb`]), decoding requests with [`codec::ServerCodec`].
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod server {
    include!(concat!(env!("OUT_DIR"), "/server/handoff.v1.rs"));
}

pub mod codec;
pub mod digest;

/// The encoded `FileDescriptorSet` of the API, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("handoff_descriptor");

/// The contracts of the demo pipeline (package `handoff.demo.v1`): planner
/// -> workers -> aggregator. Used by the examples and the tests.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod demo {
    tonic::include_proto!("handoff.demo.v1");
}

/// The encoded `FileDescriptorSet` of [`demo`], to register its messages
/// as contracts.
pub const DEMO_FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("demo_descriptor");

impl pb::RunStatus {
    /// The word for this status (`running`, `completed`, `timed_out`, ...).
    pub fn token(self) -> &'static str {
        use pb::RunStatus as S;
        match self {
            S::Running => "running",
            S::Completed => "completed",
            S::Failed => "failed",
            S::TimedOut => "timed_out",
            S::Cancelled => "cancelled",
            S::WaitingInput => "waiting_input",
            S::Unspecified => "unknown",
        }
    }
}

impl pb::EventKind {
    /// The NATS subject token of this kind (`handoff_accepted`, ...).
    pub fn token(self) -> &'static str {
        use pb::EventKind as K;
        match self {
            K::Unspecified => "unspecified",
            K::RunStarted => "run_started",
            K::RunCompleted => "run_completed",
            K::RunFailed => "run_failed",
            K::RunTimedOut => "run_timed_out",
            K::HandoffAccepted => "handoff_accepted",
            K::Delivered => "delivered",
            K::Acked => "acked",
            K::Nacked => "nacked",
            K::Redelivered => "redelivered",
            K::Rejected => "rejected",
            K::DeadLettered => "dead_lettered",
            K::RoutedToFallback => "routed_to_fallback",
            K::Discarded => "discarded",
            K::ContractRejected => "contract_rejected",
            K::BarrierOpened => "barrier_opened",
            K::BranchArrived => "branch_arrived",
            K::BarrierReleased => "barrier_released",
            K::BarrierTimedOut => "barrier_timed_out",
            K::BranchLate => "branch_late",
            K::AccessDenied => "access_denied",
            K::ContractModeChanged => "contract_mode_changed",
            K::IntentScored => "intent_scored",
            K::IntentDrift => "intent_drift",
            K::RunPurged => "run_purged",
            K::RunCancelled => "run_cancelled",
            K::HandoffRedriven => "handoff_redriven",
            K::RunResumed => "run_resumed",
            K::RunForked => "run_forked",
            K::InputRequested => "input_requested",
            K::InputProvided => "input_provided",
            K::InputTimedOut => "input_timed_out",
        }
    }

    /// Parses a subject token or a kind name (`run_failed`, `RUN_FAILED`).
    pub fn from_token(s: &str) -> Option<Self> {
        let lower = s.to_ascii_lowercase();
        let lower = lower.strip_prefix("event_kind_").unwrap_or(&lower);
        ALL_EVENT_KINDS.iter().copied().find(|k| k.token() == lower)
    }
}

/// Every event kind the broker emits.
pub const ALL_EVENT_KINDS: &[pb::EventKind] = &[
    pb::EventKind::RunStarted,
    pb::EventKind::RunCompleted,
    pb::EventKind::RunFailed,
    pb::EventKind::RunTimedOut,
    pb::EventKind::HandoffAccepted,
    pb::EventKind::Delivered,
    pb::EventKind::Acked,
    pb::EventKind::Nacked,
    pb::EventKind::Redelivered,
    pb::EventKind::Rejected,
    pb::EventKind::DeadLettered,
    pb::EventKind::RoutedToFallback,
    pb::EventKind::Discarded,
    pb::EventKind::ContractRejected,
    pb::EventKind::BarrierOpened,
    pb::EventKind::BranchArrived,
    pb::EventKind::BarrierReleased,
    pb::EventKind::BarrierTimedOut,
    pb::EventKind::BranchLate,
    pb::EventKind::AccessDenied,
    pb::EventKind::ContractModeChanged,
    pb::EventKind::IntentScored,
    pb::EventKind::IntentDrift,
    pb::EventKind::RunPurged,
    pb::EventKind::RunCancelled,
    pb::EventKind::HandoffRedriven,
    pb::EventKind::RunResumed,
    pb::EventKind::RunForked,
    pb::EventKind::InputRequested,
    pb::EventKind::InputProvided,
    pb::EventKind::InputTimedOut,
];

impl pb::RunStatus {
    /// True once the run has ended (completed, failed, timed out or
    /// cancelled).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            pb::RunStatus::Completed
                | pb::RunStatus::Failed
                | pb::RunStatus::TimedOut
                | pb::RunStatus::Cancelled
        )
    }
}

/// What a caller does about a refusal, by its `ErrorInfo.reason`: the
/// table in `handoff/v1/reasons.txt`, shared with the Python SDK and the
/// README.
pub mod reasons {
    /// The table as shipped: `REASON disposition` lines, `#` comments.
    pub const TABLE: &str = include_str!("../handoff/v1/reasons.txt");

    /// What to do about a refusal.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum Disposition {
        /// The same request may succeed later: retry it (with the same
        /// idempotency key), backing off with jitter.
        Retryable,
        /// A concurrent change came first: read again, redo, retry now.
        Conflict,
        /// It will never succeed as it is: do not retry.
        Terminal,
        /// The delivery is no longer the caller's (settled another way,
        /// delivered again, or gone): stop working on it and settle
        /// nothing.
        Superseded,
    }

    impl Disposition {
        /// Its word in the table.
        pub fn as_str(self) -> &'static str {
            match self {
                Disposition::Retryable => "retryable",
                Disposition::Conflict => "conflict",
                Disposition::Terminal => "terminal",
                Disposition::Superseded => "superseded",
            }
        }
    }

    /// Every `(reason, disposition)` of the table, in its order.
    pub fn all() -> impl Iterator<Item = (&'static str, Disposition)> {
        TABLE
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .filter_map(|l| {
                let (reason, word) = l.split_once(char::is_whitespace)?;
                let disposition = match word.trim() {
                    "retryable" => Disposition::Retryable,
                    "conflict" => Disposition::Conflict,
                    "terminal" => Disposition::Terminal,
                    "superseded" => Disposition::Superseded,
                    _ => return None,
                };
                Some((reason, disposition))
            })
    }

    /// The disposition of `reason`; `None` for a reason the table does not
    /// list (from a newer broker: treat it by its gRPC code).
    pub fn disposition(reason: &str) -> Option<Disposition> {
        all().find(|(r, _)| *r == reason).map(|(_, d)| d)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn every_line_of_the_table_parses() {
            let lines = TABLE
                .lines()
                .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
                .count();
            assert_eq!(all().count(), lines);
            assert_eq!(disposition("STATE_CONFLICT"), Some(Disposition::Conflict));
            assert_eq!(
                disposition("NATS_UNAVAILABLE"),
                Some(Disposition::Retryable)
            );
            assert_eq!(disposition("STATE_TOO_LARGE"), Some(Disposition::Terminal));
            assert_eq!(
                disposition("LEASE_SUPERSEDED"),
                Some(Disposition::Superseded)
            );
            assert_eq!(disposition("NO_SUCH_REASON"), None);
        }
    }
}
