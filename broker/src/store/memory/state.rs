//! RunStates on Memory.

use super::*;
use crate::store::{Decided, RunStates};

#[async_trait::async_trait]
impl RunStates for Memory {
    async fn state_record(&self, run_id: &str, revision: u64) -> Result<Option<pb::StateRecord>> {
        self.trip("state_record")?;
        Ok(self
            .state()?
            .run_states
            .get(&(run_id.to_string(), revision))
            .cloned())
    }

    async fn create_state_record(&self, record: &pb::StateRecord) -> Result<bool> {
        self.trip("create_state_record")?;
        let mut s = self.state()?;
        let key = (record.run_id.clone(), record.revision);
        if s.run_states.contains_key(&key) {
            return Ok(false);
        }
        s.run_states.insert(key, record.clone());
        Ok(true)
    }

    async fn state_head(&self, run_id: &str) -> Result<u64> {
        Ok(self.state()?.state_heads.get(run_id).copied().unwrap_or(0))
    }

    async fn set_state_head(&self, run_id: &str, revision: u64) -> Result<()> {
        self.state()?
            .state_heads
            .insert(run_id.to_string(), revision);
        Ok(())
    }

    async fn decide_end(
        &self,
        run_id: &str,
        resumed: u32,
        end: &pb::Run,
        with: Option<&pb::StateRecord>,
    ) -> Result<Decided> {
        self.trip("decide_end")?;
        let mut s = self.state()?;
        let at = (run_id.to_string(), resumed);
        if let Some(before) = s.run_ends.get(&at) {
            return Ok(Decided::Before(Box::new(before.clone())));
        }
        if let Some(record) = with {
            let key = (record.run_id.clone(), record.revision);
            if s.run_states.contains_key(&key) {
                return Ok(Decided::RevisionTaken);
            }
            s.run_states.insert(key, record.clone());
        }
        s.run_ends.insert(at, end.clone());
        Ok(Decided::Now)
    }
}
