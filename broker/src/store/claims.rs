//! Claims on consumed deliveries: what a complete-and-handoff stored from
//! each; and on the keys of keyed handoffs that consume nothing.

use super::*;

/// What a claim is on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimKey {
    /// A consumed delivery, by its handoff's id (or another act done once,
    /// named so): kept while the inbox may keep the handoff (`retention`).
    Consumed(String),
    /// A handoff with an idempotency key that consumes nothing, by its
    /// id: kept with its run, for the run's life.
    Keyed {
        /// Its run.
        run_id: String,
        /// The handoff's id (derived from the run, source and key).
        handoff_id: String,
    },
}

impl ClaimKey {
    /// The claim on the delivery of the consumed handoff `handoff_id`.
    pub fn consumed(handoff_id: &str) -> Self {
        Self::Consumed(handoff_id.to_string())
    }
}

/// Claims: what a complete-and-handoff stored from each consumed delivery,
/// what a keyed handoff stored (see [`ClaimKey`]).
#[async_trait::async_trait]
pub trait Claims: Send + Sync {
    /// Records the first handoff made from a consumed delivery (or under
    /// a key), or returns the one recorded before.
    async fn claim_consumed(&self, key: &ClaimKey, claim: &pb::ConsumeClaim) -> Result<Claim>;

    /// The claim, and its revision.
    async fn claim(&self, key: &ClaimKey) -> Result<Option<(pb::ConsumeClaim, u64)>>;

    /// Rewrites a claim if its revision is still `revision`; the new
    /// revision, or `None` when another writer came first.
    async fn update_claim(
        &self,
        key: &ClaimKey,
        claim: &pb::ConsumeClaim,
        revision: u64,
    ) -> Result<Option<u64>>;

    /// Withdraws a claim made at `revision` for a handoff that was not
    /// stored (only if nothing changed it since). Logged, not returned.
    async fn release_claim(&self, key: &ClaimKey, revision: u64);
}
