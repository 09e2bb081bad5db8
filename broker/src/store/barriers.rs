//! Barriers and their branch results.

use super::*;

/// Barriers and their branch results.
#[async_trait::async_trait]
pub trait Barriers: Send + Sync {
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
}
