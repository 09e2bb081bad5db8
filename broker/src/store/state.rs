//! Run state: its revisions, each stored once, and the latest known; and
//! how each run ends, decided once beside them.

use super::*;

/// How a run's end came to be decided (see [`RunStates::decide_end`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Decided {
    /// This call decided it (and stored the revision it came with).
    Now,
    /// It was decided before, this way (nothing was written).
    Before(Box<pb::Run>),
    /// The revision it came with was made first by another writer: the
    /// end is not decided, nothing was written.
    RevisionTaken,
}

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

    /// Decides how a run ends, once for its `resumed`-th life: records
    /// `end` (a run holding only how it ended) unless an end was decided
    /// before, and, with `with`, the state revision that comes with it
    /// (a final handoff's delta), created like [`Self::create_state_record`]
    /// and atomically with the end: both are stored, or neither.
    async fn decide_end(
        &self,
        run_id: &str,
        resumed: u32,
        end: &pb::Run,
        with: Option<&pb::StateRecord>,
    ) -> Result<Decided>;
}
