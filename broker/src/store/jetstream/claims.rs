//! Claims on JetStream.

use super::*;
use crate::store::Claims;

#[async_trait::async_trait]
impl Claims for JetStream {
    /// Records the first handoff made from a consumed delivery, or returns
    /// the one recorded before.
    async fn claim_consumed(
        &self,
        consumed_handoff: &str,
        claim: &pb::ConsumeClaim,
    ) -> Result<Claim> {
        let created = self
            .consumed
            .create(consumed_handoff, claim.encode_to_vec().into())
            .await;
        match created {
            Ok(revision) => Ok(Claim::Made(revision)),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                match self.claim(consumed_handoff).await? {
                    Some((held, revision)) => Ok(Claim::Held(held, revision)),
                    // Withdrawn or expired between the two calls: try again.
                    None => Box::pin(self.claim_consumed(consumed_handoff, claim)).await,
                }
            }
            Err(e) => Err(BrokerError::nats("recording the consumed delivery", e)),
        }
    }

    /// Withdraws a claim this broker made for a handoff it did not store
    /// (only if nothing changed it since). A failure is logged: the claim
    /// then only refuses other targets for that delivery.
    async fn claim(
        &self,
        consumed_handoff: &str,
    ) -> Result<Option<(pb::ConsumeClaim, u64)>, BrokerError> {
        read(&self.consumed, consumed_handoff).await
    }

    async fn update_claim(
        &self,
        consumed_handoff: &str,
        claim: &pb::ConsumeClaim,
        revision: u64,
    ) -> Result<Option<u64>, BrokerError> {
        match self
            .consumed
            .update(consumed_handoff, claim.encode_to_vec().into(), revision)
            .await
        {
            Ok(next) => Ok(Some(next)),
            Err(e) if lost_compare_and_set(&e) => Ok(None),
            Err(e) => Err(BrokerError::nats("updating the claim", e)),
        }
    }

    async fn release_claim(&self, consumed_handoff: &str, revision: u64) {
        if let Err(e) = self
            .consumed
            .delete_expect_revision(consumed_handoff, Some(revision))
            .await
        {
            tracing::warn!(consumed_handoff, error = %e, "claim on a consumed delivery not withdrawn");
        }
    }
}
