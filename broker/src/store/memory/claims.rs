//! Claims on Memory.

use super::*;
use crate::store::{ClaimKey, Claims};

/// The key a claim is kept under (a keyed handoff's under its run, so it
/// goes with the run).
pub(super) fn at(key: &ClaimKey) -> String {
    match key {
        ClaimKey::Consumed(handoff) => handoff.clone(),
        ClaimKey::Keyed { run_id, handoff_id } => format!("{run_id}.key.{handoff_id}"),
    }
}

#[async_trait::async_trait]
impl Claims for Memory {
    async fn claim_consumed(&self, key: &ClaimKey, claim: &pb::ConsumeClaim) -> Result<Claim> {
        self.trip("claim_consumed")?;
        let mut s = self.state()?;
        let key = at(key);
        if let Some((held, revision)) = s.claims.get(&key) {
            return Ok(Claim::Held(held.clone(), *revision));
        }
        let rev = s.next_revision();
        s.claims.insert(key, (claim.clone(), rev));
        Ok(Claim::Made(rev))
    }

    async fn claim(&self, key: &ClaimKey) -> Result<Option<(pb::ConsumeClaim, u64)>> {
        Ok(self.state()?.claims.get(&at(key)).cloned())
    }

    async fn update_claim(
        &self,
        key: &ClaimKey,
        claim: &pb::ConsumeClaim,
        revision: u64,
    ) -> Result<Option<u64>> {
        self.trip("update_claim")?;
        let mut s = self.state()?;
        let key = at(key);
        if s.claims.get(&key).map(|(_, r)| *r) != Some(revision) {
            return Ok(None);
        }
        let rev = s.next_revision();
        s.claims.insert(key, (claim.clone(), rev));
        Ok(Some(rev))
    }

    async fn release_claim(&self, key: &ClaimKey, revision: u64) {
        if self.trip("release_claim").is_err() {
            return;
        }
        let key = at(key);
        if let Ok(mut s) = self.state() {
            if s.claims.get(&key).map(|(_, r)| *r) == Some(revision) {
                s.claims.remove(&key);
            }
        }
    }
}
