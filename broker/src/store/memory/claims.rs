//! Claims on Memory.

use super::*;
use crate::store::Claims;

#[async_trait::async_trait]
impl Claims for Memory {
    async fn claim_consumed(
        &self,
        consumed_handoff: &str,
        claim: &pb::ConsumeClaim,
    ) -> Result<Claim> {
        self.trip("claim_consumed")?;
        let mut s = self.state()?;
        if let Some((held, revision)) = s.claims.get(consumed_handoff) {
            return Ok(Claim::Held(held.clone(), *revision));
        }
        let rev = s.next_revision();
        s.claims
            .insert(consumed_handoff.to_string(), (claim.clone(), rev));
        Ok(Claim::Made(rev))
    }

    async fn claim(&self, consumed_handoff: &str) -> Result<Option<(pb::ConsumeClaim, u64)>> {
        Ok(self.state()?.claims.get(consumed_handoff).cloned())
    }

    async fn update_claim(
        &self,
        consumed_handoff: &str,
        claim: &pb::ConsumeClaim,
        revision: u64,
    ) -> Result<Option<u64>> {
        let mut s = self.state()?;
        if s.claims.get(consumed_handoff).map(|(_, r)| *r) != Some(revision) {
            return Ok(None);
        }
        let rev = s.next_revision();
        s.claims
            .insert(consumed_handoff.to_string(), (claim.clone(), rev));
        Ok(Some(rev))
    }

    async fn release_claim(&self, consumed_handoff: &str, revision: u64) {
        if self.trip("release_claim").is_err() {
            return;
        }
        if let Ok(mut s) = self.state() {
            if s.claims.get(consumed_handoff).map(|(_, r)| *r) == Some(revision) {
                s.claims.remove(consumed_handoff);
            }
        }
    }
}
