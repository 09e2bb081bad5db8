//! Timers on Memory.

use super::*;
use crate::store::Timers;

#[async_trait::async_trait]
impl Timers for Memory {
    async fn schedule(&self, timer: &pb::Timer, kind: TimerKind) -> Result<()> {
        self.trip("schedule")?;
        self.state()?.timers.push((timer.clone(), kind));
        Ok(())
    }
}
