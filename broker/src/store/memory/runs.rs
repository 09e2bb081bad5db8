//! Runs on Memory.

use super::*;
use crate::store::Runs;

#[async_trait::async_trait]
impl Runs for Memory {
    async fn run(&self, run_id: &str) -> Result<Option<(pb::Run, u64)>> {
        self.trip("run")?;
        Ok(self.state()?.runs.get(run_id).cloned())
    }

    async fn create_run(&self, run: &pb::Run) -> Result<bool> {
        self.trip("create_run")?;
        let mut s = self.state()?;
        if s.runs.contains_key(&run.id) {
            return Ok(false);
        }
        let rev = s.next_revision();
        s.runs.insert(run.id.clone(), (run.clone(), rev));
        Ok(true)
    }

    async fn update_run(&self, run: &pb::Run, revision: u64) -> Result<bool> {
        self.trip("update_run")?;
        let mut s = self.state()?;
        if s.runs.get(&run.id).map(|(_, r)| *r) != Some(revision) {
            return Ok(false);
        }
        let rev = s.next_revision();
        s.runs.insert(run.id.clone(), (run.clone(), rev));
        Ok(true)
    }

    async fn purge_run(&self, run_id: &str, keep_events_from: u64) -> Result<()> {
        self.trip("purge_run")?;
        let mut s = self.state()?;
        s.events
            .retain(|e| e.run_id != run_id || e.sequence >= keep_events_from);
        s.run_states.retain(|(run, _), _| run != run_id);
        s.state_heads.remove(run_id);
        s.run_ends.retain(|(run, _), _| run != run_id);
        let prefix = format!("{run_id}.");
        s.barriers.retain(|key, _| !key.starts_with(&prefix));
        s.barrier_keys.retain(|key, _| !key.starts_with(&prefix));
        s.early.retain(|key| !key.starts_with(&prefix));
        s.branches.retain(|(key, _)| !key.starts_with(&prefix));
        s.claims.retain(|key, _| !key.starts_with(&prefix));
        s.timers
            .retain(|(t, kind)| t.run_id != run_id || matches!(kind, TimerKind::RunPurge));
        s.runs.remove(run_id);
        Ok(())
    }
}
