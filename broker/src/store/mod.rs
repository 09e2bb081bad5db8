//! The storage the use cases write through: a trait, and its JetStream
//! implementation ([`jetstream`]).
//!
//! The trait speaks of the broker's things (handoffs in inboxes, events,
//! runs, agents, contracts, claims, barriers and their branch results,
//! timers), never of subjects or consumers, so the use cases in
//! [`crate::app`] can be tested against an in-memory implementation
//! (`memory`, test builds only). Every write that may be repeated carries a
//! deterministic id, so a retried step is recognised instead of stored
//! twice; every read-modify-write goes through a revision
//! (compare-and-set), so two broker replicas never both decide.

pub mod jetstream;
#[cfg(test)]
pub mod memory;

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
}

/// Everything the broker keeps, and nothing else: the broker's memory
/// holds caches and live sessions only.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// The largest message the store takes, in bytes.
    fn max_payload(&self) -> usize;

    /// Whether a delivery token's store reference names the delivery of
    /// `token.agent`'s handoff at `token.stream_sequence` (and nothing
    /// else the broker stores).
    fn reference_matches(&self, token: &pb::DeliveryToken) -> bool;

    // ---- inboxes

    /// Stores a handoff in its target's inbox (`envelope.target_agent`),
    /// deduplicated by `envelope.id`.
    async fn put_handoff(&self, envelope: &pb::HandoffEnvelope) -> Result<Stored>;

    /// The handoff stored at `sequence` in the inbox, if still kept.
    async fn handoff_at(&self, sequence: u64) -> Result<Option<InboxMessage>>;

    /// Whether the agent's inbox has offered the handoff at `sequence` to
    /// an instance at least once.
    async fn was_delivered(&self, agent: &str, sequence: u64) -> Result<bool>;

    /// How many handoffs wait in the agent's inbox, not yet offered to
    /// any instance (the consumer's pending count).
    async fn inbox_pending(&self, agent: &str) -> Result<u64>;

    /// Removes a handoff no instance took from the inbox (it was routed
    /// elsewhere); one already gone is fine.
    async fn withdraw_handoff(&self, sequence: u64) -> Result<()>;

    /// Makes sure the agent's inbox offers its handoffs with this lease.
    async fn prepare_inbox(&self, agent: &str, lease: Duration, max_pending: i64) -> Result<()>;

    /// Offers up to `max` handoffs of the agent's inbox as they come,
    /// waiting at most `expires` for them.
    async fn pull(
        &self,
        agent: &str,
        max: usize,
        expires: Duration,
    ) -> Result<BoxStream<'static, Result<Offered>>>;

    /// Settles an offered delivery by its reference, confirmed.
    async fn settle(&self, reference: &str, how: Settlement) -> Result<()>;

    /// Tells every broker replica that the delivery in `slot` of `agent`'s
    /// inbox was settled, so the session holding it frees its slot at
    /// once. Best effort: a replica that misses it frees the slot when the
    /// lease passes.
    async fn announce_settled(&self, agent: &str, slot: &str);

    /// The slots announced settled by any replica, as they come.
    async fn settled_announcements(&self) -> Result<BoxStream<'static, String>>;

    /// Stores a dead letter (deduplicated by its handoff).
    async fn put_dead_letter(&self, letter: &pb::DeadLetter) -> Result<()>;

    /// Dead letters of one agent (or all), oldest first, at most `limit`.
    async fn dead_letters(&self, agent: Option<&str>, limit: usize) -> Result<Vec<pb::DeadLetter>>;

    // ---- events

    /// Stores an event, deduplicated by `msg_id`; returns its sequence.
    async fn publish_event(&self, event: &pb::Event, msg_id: &str) -> Result<u64>;

    /// Stores events, each deduplicated by its message id: sent together,
    /// then confirmed together; one result per event, in order.
    async fn publish_events(&self, events: &[(pb::Event, String)]) -> Vec<Result<u64>>;

    /// Every stored event of a run, oldest first, with its sequence.
    async fn run_events(&self, run_id: &str) -> Result<Vec<pb::Event>>;

    /// Events of a run (or all) and of a kind (or all) from
    /// `from_sequence` on (0: only new ones), as they are stored.
    async fn watch_events(
        &self,
        run_id: Option<&str>,
        kind: Option<pb::EventKind>,
        from_sequence: u64,
    ) -> Result<BoxStream<'static, Result<pb::Event>>>;

    // ---- runs

    /// A run and its revision.
    async fn run(&self, run_id: &str) -> Result<Option<(pb::Run, u64)>>;

    /// Creates a run; `false` if one with that id exists.
    async fn create_run(&self, run: &pb::Run) -> Result<bool>;

    /// Writes a run if its revision is still `revision`; `false` when
    /// another writer got there first.
    async fn update_run(&self, run: &pb::Run, revision: u64) -> Result<bool>;

    /// Removes what an ended run keeps by its id: its events stored
    /// before sequence `keep_events_from` (its `run_purged` event and
    /// anything after stay), its state revisions and head, its barriers
    /// and branch records, its timers not yet fired, and last its run record, so an interrupted
    /// purge is done again from the start. Records of the run that are
    /// not kept by its id (acked handoffs, lease records, claims,
    /// payloads, dead letters) expire on their own by then.
    async fn purge_run(&self, run_id: &str, keep_events_from: u64) -> Result<()>;

    // ---- agents

    /// An agent's spec.
    async fn agent(&self, name: &str) -> Result<Option<pb::AgentSpec>>;

    /// Stores an agent's spec; returns whether it existed before.
    async fn put_agent(&self, spec: &pb::AgentSpec) -> Result<bool>;

    /// Every registered agent, by name.
    async fn agents(&self) -> Result<Vec<pb::AgentSpec>>;

    // ---- contracts

    /// One version of a contract.
    async fn contract(&self, message_type: &str, version: u32) -> Result<Option<pb::Contract>>;

    /// Stores a contract version unless that version exists; returns
    /// whether it was stored.
    async fn create_contract(&self, contract: &pb::Contract) -> Result<bool>;

    /// Every stored contract version, as (message type, version).
    async fn contract_versions(&self) -> Result<Vec<(String, u32)>>;

    /// A contract's compatibility mode as `SetCompatibility` last set it,
    /// and its revision (`None`: never changed, version 1's mode holds).
    async fn contract_mode(&self, message_type: &str) -> Result<Option<(pb::ContractMode, u64)>>;

    /// Writes a contract's mode: creates it when `revision` is `None`
    /// (`false` if one exists), else compare-and-set; `false` when another
    /// writer came first.
    async fn put_contract_mode(
        &self,
        mode: &pb::ContractMode,
        revision: Option<u64>,
    ) -> Result<bool>;

    // ---- claims on consumed deliveries

    /// Records the first handoff made from a consumed delivery, or returns
    /// the one recorded before.
    async fn claim_consumed(
        &self,
        consumed_handoff: &str,
        claim: &pb::ConsumeClaim,
    ) -> Result<Claim>;

    /// The claim on a consumed delivery, and its revision.
    async fn claim(&self, consumed_handoff: &str) -> Result<Option<(pb::ConsumeClaim, u64)>>;

    /// Rewrites a claim if its revision is still `revision`; the new
    /// revision, or `None` when another writer came first.
    async fn update_claim(
        &self,
        consumed_handoff: &str,
        claim: &pb::ConsumeClaim,
        revision: u64,
    ) -> Result<Option<u64>>;

    /// Withdraws a claim made at `revision` for a handoff that was not
    /// stored (only if nothing changed it since). Logged, not returned.
    async fn release_claim(&self, consumed_handoff: &str, revision: u64);

    // ---- barriers

    /// A barrier and its revision.
    async fn barrier(&self, run_id: &str, barrier_id: &str) -> Result<Option<(pb::Barrier, u64)>>;

    /// Creates a barrier's header unless it exists; returns whether it was
    /// created. A header with `keys_apart` is created after its keys
    /// ([`Store::create_barrier_keys`]).
    async fn create_barrier(&self, barrier: &pb::Barrier) -> Result<bool>;

    /// Stores the whole spec of a barrier whose header leaves its keys out,
    /// unless a spec is stored for it already (the first one stays).
    async fn create_barrier_keys(&self, spec: &pb::BarrierSpec) -> Result<()>;

    /// The whole spec stored by [`Store::create_barrier_keys`].
    async fn barrier_keys(&self, run_id: &str, barrier_id: &str)
        -> Result<Option<pb::BarrierSpec>>;

    /// Compare-and-set of a barrier; `false` when another write came first.
    async fn update_barrier(&self, barrier: &pb::Barrier, revision: u64) -> Result<bool> {
        Ok(self.update_barrier_at(barrier, revision).await?.is_some())
    }

    /// Compare-and-set of a barrier; the new revision, or `None` when
    /// another write came first.
    async fn update_barrier_at(&self, barrier: &pb::Barrier, revision: u64) -> Result<Option<u64>>;

    /// Notes that a branch result reached a barrier not yet opened.
    async fn mark_early_branch(&self, run_id: &str, barrier_id: &str) -> Result<()>;

    /// Whether a branch result reached this barrier before it was opened.
    async fn has_early_branch(&self, run_id: &str, barrier_id: &str) -> Result<bool>;

    /// Stores a branch result as its key's record: the first result for a
    /// key is the one kept. The same handoff's result again is recognised
    /// (`duplicate`); another handoff's result for a key that has one is
    /// not stored, and the kept one is returned.
    async fn put_branch_result(
        &self,
        run_id: &str,
        barrier_id: &str,
        result: &pb::BranchResult,
    ) -> Result<BranchPut>;

    /// The record of one branch key (with its sequence), if it has one.
    async fn branch_result(
        &self,
        run_id: &str,
        barrier_id: &str,
        key: &str,
    ) -> Result<Option<pb::BranchResult>>;

    /// Every branch record of a barrier, each with its sequence and
    /// payload, in the order they were stored.
    async fn branch_results(&self, run_id: &str, barrier_id: &str)
        -> Result<Vec<pb::BranchResult>>;

    // ---- run state

    /// One revision of a run's state.
    async fn state_record(&self, run_id: &str, revision: u64) -> Result<Option<pb::StateRecord>>;

    /// Stores a revision of a run's state unless that revision exists;
    /// `false` when another writer made it first (revisions are
    /// compare-and-set: each is created once and never changed).
    async fn create_state_record(&self, record: &pb::StateRecord) -> Result<bool>;

    /// The latest revision recorded as the head of a run's state (0: none);
    /// it may lag behind revisions created since.
    async fn state_head(&self, run_id: &str) -> Result<u64>;

    /// Records `revision` as the head of a run's state.
    async fn set_state_head(&self, run_id: &str, revision: u64) -> Result<()>;

    // ---- leases

    /// The lease record of the inbox message at `sequence` of `agent`, and
    /// its revision.
    async fn lease(&self, agent: &str, sequence: u64) -> Result<Option<(pb::Lease, u64)>>;

    /// Writes a lease record: creates it when `revision` is `None`
    /// (`false` if one exists), else compare-and-set on `revision`.
    async fn put_lease(
        &self,
        agent: &str,
        sequence: u64,
        lease: &pb::Lease,
        revision: Option<u64>,
    ) -> Result<bool>;

    // ---- security

    /// The keys that sign delivery tokens, and their revision.
    async fn signing_keys(&self) -> Result<Option<(pb::SigningKeys, u64)>>;

    /// Writes the signing keys: creates them when `revision` is `None`,
    /// else compare-and-set; `false` when another writer came first.
    async fn put_signing_keys(&self, keys: &pb::SigningKeys, revision: Option<u64>)
        -> Result<bool>;

    /// A principal and its grants.
    async fn principal(&self, name: &str) -> Result<Option<pb::Principal>>;

    /// Stores a principal; returns whether it existed before.
    async fn put_principal(&self, principal: &pb::Principal) -> Result<bool>;

    /// Every principal, by name.
    async fn principals(&self) -> Result<Vec<pb::Principal>>;

    /// An API token (with its secret's digest) and its revision.
    async fn token(&self, id: &str) -> Result<Option<(pb::ApiToken, u64)>>;

    /// Writes an API token: creates it when `revision` is `None`, else
    /// compare-and-set; `false` when another writer came first.
    async fn put_token(&self, token: &pb::ApiToken, revision: Option<u64>) -> Result<bool>;

    /// Every API token, oldest first.
    async fn tokens(&self) -> Result<Vec<pb::ApiToken>>;

    // ---- payloads by reference

    /// Stores a payload's value under `name` (`<run_id>/<sha256>`, so the
    /// same name is the same content): an object of that name kept for
    /// less than half of `retention` is kept as it is, an older one is
    /// stored again so it outlives the handoff that names it now.
    async fn put_payload(&self, name: &str, value: Bytes) -> Result<PayloadInfo>;

    /// The size and digest of the payload stored under `name`, if kept.
    async fn payload_info(&self, name: &str) -> Result<Option<PayloadInfo>>;

    /// The value of the payload stored under `name`, if kept (checked
    /// against its digest as it is read).
    async fn get_payload(&self, name: &str) -> Result<Option<Bytes>>;

    // ---- timers

    /// Schedules a durable timer (idempotent per run, barrier and kind).
    async fn schedule(&self, timer: &pb::Timer, kind: TimerKind) -> Result<()>;
}
