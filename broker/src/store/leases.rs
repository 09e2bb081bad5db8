//! Lease records: who holds a delivery, until when, and how it was settled.

use super::*;

/// Lease records: who holds a delivery, until when, and how it was settled.
#[async_trait::async_trait]
pub trait Leases: Send + Sync {
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
}
