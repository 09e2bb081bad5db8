//! The storage the use cases write through: one trait per area (inboxes,
//! events, runs, the registry, claims, barriers, run state, leases,
//! secrets, payloads, timers), together [`Store`], and its JetStream
//! implementation ([`jetstream`]), split by the same areas.
//!
//! The traits speak of the broker's things (handoffs in inboxes, events,
//! runs, agents, contracts, claims, barriers and their branch results,
//! timers), never of subjects or consumers, so the use cases in
//! [`crate::app`] can be tested against an in-memory implementation
//! (`memory`, test builds only). Every write that may be repeated carries a
//! deterministic id, so a retried step is recognised instead of stored
//! twice; every read-modify-write goes through a revision
//! (compare-and-set), so two broker replicas never both decide.

mod barriers;
mod claims;
mod events;
mod inboxes;
mod instances;
pub mod jetstream;
mod leases;
#[cfg(test)]
pub mod memory;
mod payloads;
mod registry;
mod runs;
mod secrets;
mod state;
mod timers;

pub use barriers::Barriers;
pub use claims::{ClaimKey, Claims};
pub use events::Events;
pub use inboxes::Inboxes;
pub use instances::Instances;
pub use leases::Leases;
pub use payloads::{PayloadReader, Payloads};
pub use registry::Registry;
pub use runs::Runs;
pub use secrets::Secrets;
pub use state::{Decided, RunStates};
pub use timers::Timers;

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::stream::BoxStream;
use handoff_proto::pb;

use crate::error::BrokerError;

pub use jetstream::JetStream;

/// Lowercase hex SHA-256 of `value`.
pub fn sha256_hex(value: &[u8]) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(value);
    let mut hex = String::with_capacity(64);
    for b in digest.iter() {
        hex.push_str(&format!("{b:02x}"));
    }
    hex
}

/// Result of the store.
pub type Result<T, E = BrokerError> = std::result::Result<T, E>;

/// Where a write landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    /// Its sequence in its stream.
    pub sequence: u64,
    /// Whether the store recognised it as a repeat of an earlier write
    /// with the same id (and stored nothing).
    pub duplicate: bool,
}

/// How a branch result was stored as its key's record.
#[derive(Debug, Clone, PartialEq)]
pub enum BranchPut {
    /// It is the key's record (`duplicate`: stored before, by the same
    /// handoff).
    Stored(Stored),
    /// The key's record is another handoff's result: this one.
    Taken(Box<pb::BranchResult>),
}

/// The first handoff made from a consumed delivery.
#[derive(Debug)]
pub enum Claim {
    /// This request made it, at this revision.
    Made(u64),
    /// Another request made it before; at this revision.
    Held(pb::ConsumeClaim, u64),
}

/// How a delivery is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// Done: never offered again.
    Ack,
    /// Offer it again, after the delay if any.
    Nack(Option<Duration>),
    /// Never offer it again (rejected, or not a handoff).
    Term,
    /// Restart its lease.
    Progress,
}

/// What waits in an agent's inbox.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Backlog {
    /// Handoffs not yet offered to any instance.
    pub pending: u64,
    /// Handoffs offered and not yet settled.
    pub in_flight: u64,
    /// When the oldest handoff not yet offered was created.
    pub oldest_pending: Option<prost_types::Timestamp>,
}

/// A handoff the inbox offers to an agent's instance.
#[derive(Debug, Clone)]
pub struct Offered {
    /// The handoff's sequence in the inbox.
    pub sequence: u64,
    /// How many times it has been offered, this time included.
    pub delivered: i64,
    /// The store's reference that settles this offer.
    pub reference: String,
    /// The encoded `HandoffEnvelope`.
    pub payload: Bytes,
}

/// A handoff read back from the inbox.
#[derive(Debug, Clone)]
pub struct InboxMessage {
    /// The agent whose inbox holds it.
    pub agent: String,
    /// The handoff.
    pub envelope: pb::HandoffEnvelope,
}

/// A payload kept by reference, as the store knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayloadInfo {
    /// Bytes of the payload's value.
    pub size: u64,
    /// Lowercase hex SHA-256 of the value.
    pub sha256: String,
    /// When it was stored (it expires `retention` later).
    pub stored_at: Option<SystemTime>,
}

/// Which durable timer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerKind {
    /// A run's deadline.
    RunDeadline,
    /// A barrier's timeout.
    BarrierTimeout,
    /// The check that a barrier's release was published.
    ReleaseCheck,
    /// The end of a handoff's `max_queue_wait`.
    QueueWait,
    /// `retention` after a run ended: its records are removed.
    RunPurge,
    /// The end of an input request's wait.
    InputTimeout,
}

/// Everything the broker keeps, and nothing else: the broker's memory
/// holds caches and live sessions only. One trait per area, each in its
/// own module.
pub trait Store:
    Inboxes
    + Events
    + Runs
    + Registry
    + Claims
    + Barriers
    + RunStates
    + Leases
    + Secrets
    + Payloads
    + Timers
    + Instances
    + Send
    + Sync
    + 'static
{
}

impl<T> Store for T where
    T: Inboxes
        + Events
        + Runs
        + Registry
        + Claims
        + Barriers
        + RunStates
        + Leases
        + Secrets
        + Payloads
        + Timers
        + Instances
        + Send
        + Sync
        + 'static
{
}
