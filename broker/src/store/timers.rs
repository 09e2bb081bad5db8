//! Durable timers.

use super::*;

/// Durable timers.
#[async_trait::async_trait]
pub trait Timers: Send + Sync {
    /// Schedules a durable timer (idempotent per run, barrier and kind).
    async fn schedule(&self, timer: &pb::Timer, kind: TimerKind) -> Result<()>;
}
