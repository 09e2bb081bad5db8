//! Run state: its revisions, each stored once, and the latest known.

use super::*;

/// Run state: its revisions, each stored once, and the latest known.
#[async_trait::async_trait]
pub trait RunStates: Send + Sync {
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
}
