//! Claims on consumed deliveries: what a complete-and-handoff stored from each.

use super::*;

/// Claims on consumed deliveries: what a complete-and-handoff stored from each.
#[async_trait::async_trait]
pub trait Claims: Send + Sync {
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
}
