//! Agents' inboxes: handoffs stored for an agent, offered to its instances, settled; dead letters.

use super::*;

/// Agents' inboxes: handoffs stored for an agent, offered to its instances, settled; dead letters.
#[async_trait::async_trait]
pub trait Inboxes: Send + Sync {
    /// The largest message the store takes, in bytes.
    fn max_payload(&self) -> usize;

    /// Whether a delivery token's store reference names the delivery of
    /// `token.agent`'s handoff at `token.stream_sequence` (and nothing
    /// else the broker stores).
    fn reference_matches(&self, token: &pb::DeliveryToken) -> bool;

    /// Stores a handoff in its target's inbox (`envelope.target_agent`),
    /// deduplicated by `envelope.id`.
    async fn put_handoff(&self, envelope: &pb::HandoffEnvelope) -> Result<Stored>;

    /// Stores a handoff in its target's inbox again (a redrive), as a
    /// write deduplicated by `write_id` instead of the handoff's id.
    async fn put_handoff_again(
        &self,
        envelope: &pb::HandoffEnvelope,
        write_id: &str,
    ) -> Result<Stored>;

    /// The handoff stored at `sequence` in the inbox, if still kept.
    async fn handoff_at(&self, sequence: u64) -> Result<Option<InboxMessage>>;

    /// Whether the agent's inbox has offered the handoff at `sequence` to
    /// an instance at least once.
    async fn was_delivered(&self, agent: &str, sequence: u64) -> Result<bool>;

    /// How many handoffs wait in the agent's inbox, not yet offered to
    /// any instance (the consumer's pending count).
    async fn inbox_pending(&self, agent: &str) -> Result<u64>;

    /// What waits in the agent's inbox: not yet offered, offered and not
    /// settled, and when the oldest of those not yet offered was created.
    async fn backlog(&self, agent: &str) -> Result<Backlog>;

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

    /// Stores a dead letter, deduplicated by `write_id` (one per inbox
    /// message dead-lettered: a redriven handoff may be dead-lettered
    /// again).
    async fn put_dead_letter(&self, letter: &pb::DeadLetter, write_id: &str) -> Result<()>;

    /// The dead letter at `sequence`, if still kept.
    async fn dead_letter(&self, sequence: u64) -> Result<Option<pb::DeadLetter>>;

    /// Dead letters of one agent (or all), oldest first, at most `limit`.
    async fn dead_letters(&self, agent: Option<&str>, limit: usize) -> Result<Vec<pb::DeadLetter>>;
}
