//! Live subscribe sessions: records their replicas refresh while they
//! live, remove when they end, and that expire on their own when a replica
//! dies.

use super::*;

/// Live subscribe sessions, by agent.
#[async_trait::async_trait]
pub trait Instances: Send + Sync {
    /// Writes (or refreshes) the record of a live session, keyed by its
    /// agent and session id; it expires `expiry` after this write unless
    /// written again.
    async fn put_instance(&self, instance: &pb::Instance, expiry: Duration) -> Result<()>;

    /// Removes the record of a session that ended.
    async fn remove_instance(&self, agent: &str, session: &str) -> Result<()>;

    /// The records of live sessions: of `agent`, or of every agent when it
    /// is empty.
    async fn instances(&self, agent: &str) -> Result<Vec<pb::Instance>>;
}
