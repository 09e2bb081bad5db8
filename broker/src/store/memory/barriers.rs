//! Barriers on Memory.

use super::*;
use crate::store::Barriers;

#[async_trait::async_trait]
impl Barriers for Memory {
    async fn barrier(&self, run_id: &str, barrier_id: &str) -> Result<Option<(pb::Barrier, u64)>> {
        self.trip("barrier")?;
        Ok(self
            .state()?
            .barriers
            .get(&barrier_key(run_id, barrier_id))
            .cloned())
    }

    async fn create_barrier(&self, barrier: &pb::Barrier) -> Result<bool> {
        let spec = barrier.spec.clone().unwrap_or_default();
        let key = barrier_key(&spec.run_id, &spec.barrier_id);
        let mut s = self.state()?;
        if s.barriers.contains_key(&key) {
            return Ok(false);
        }
        let rev = s.next_revision();
        s.barriers.insert(key, (barrier.clone(), rev));
        Ok(true)
    }

    async fn create_barrier_keys(&self, spec: &pb::BarrierSpec) -> Result<()> {
        self.state()?
            .barrier_keys
            .entry(barrier_key(&spec.run_id, &spec.barrier_id))
            .or_insert_with(|| spec.clone());
        Ok(())
    }

    async fn barrier_keys(
        &self,
        run_id: &str,
        barrier_id: &str,
    ) -> Result<Option<pb::BarrierSpec>> {
        Ok(self
            .state()?
            .barrier_keys
            .get(&barrier_key(run_id, barrier_id))
            .cloned())
    }

    async fn update_barrier_at(&self, barrier: &pb::Barrier, revision: u64) -> Result<Option<u64>> {
        self.trip("update_barrier")?;
        let spec = barrier.spec.clone().unwrap_or_default();
        let key = barrier_key(&spec.run_id, &spec.barrier_id);
        let mut s = self.state()?;
        if s.barriers.get(&key).map(|(_, r)| *r) != Some(revision) {
            return Ok(None);
        }
        let rev = s.next_revision();
        s.barriers.insert(key, (barrier.clone(), rev));
        Ok(Some(rev))
    }

    async fn mark_early_branch(&self, run_id: &str, barrier_id: &str) -> Result<()> {
        self.state()?.early.insert(barrier_key(run_id, barrier_id));
        Ok(())
    }

    async fn has_early_branch(&self, run_id: &str, barrier_id: &str) -> Result<bool> {
        Ok(self
            .state()?
            .early
            .contains(&barrier_key(run_id, barrier_id)))
    }

    async fn put_branch_result(
        &self,
        run_id: &str,
        barrier_id: &str,
        result: &pb::BranchResult,
    ) -> Result<BranchPut> {
        self.trip("put_branch_result")?;
        let mut s = self.state()?;
        let key = barrier_key(run_id, barrier_id);
        if let Some(&sequence) = s.branch_ids.get(&result.handoff_id) {
            return Ok(BranchPut::Stored(Stored {
                sequence,
                duplicate: true,
            }));
        }
        if let Some((_, first)) = s
            .branches
            .iter()
            .find(|(k, r)| *k == key && r.key == result.key)
        {
            return Ok(BranchPut::Taken(Box::new(first.clone())));
        }
        let mut stored = result.clone();
        s.branch_seq += 1;
        stored.sequence = s.branch_seq;
        let sequence = stored.sequence;
        s.branches.push((key, stored));
        s.branch_ids.insert(result.handoff_id.clone(), sequence);
        Ok(BranchPut::Stored(Stored {
            sequence,
            duplicate: false,
        }))
    }

    async fn branch_result(
        &self,
        run_id: &str,
        barrier_id: &str,
        key: &str,
    ) -> Result<Option<pb::BranchResult>> {
        let barrier = barrier_key(run_id, barrier_id);
        Ok(self
            .state()?
            .branches
            .iter()
            .find(|(k, r)| *k == barrier && r.key == key)
            .map(|(_, r)| r.clone()))
    }

    async fn branch_results(
        &self,
        run_id: &str,
        barrier_id: &str,
    ) -> Result<Vec<pb::BranchResult>> {
        let key = barrier_key(run_id, barrier_id);
        Ok(self
            .state()?
            .branches
            .iter()
            .filter(|(k, _)| *k == key)
            .map(|(_, r)| r.clone())
            .collect())
    }
}
