//! Runs: created, changed by compare-and-set, purged.

use super::*;

/// Runs: created, changed by compare-and-set, purged.
#[async_trait::async_trait]
pub trait Runs: Send + Sync {
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
}
