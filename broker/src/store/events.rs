//! Events: stored, read back by run, watched as they are stored.

use super::*;

/// Events: stored, read back by run, watched as they are stored.
#[async_trait::async_trait]
pub trait Events: Send + Sync {
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
}
