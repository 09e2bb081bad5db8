//! Claims on JetStream: a consumed delivery's in the consumed bucket
//! (kept for `retention`), a keyed handoff's beside its run's state
//! (`<run>.key.<handoff>`, purged with the run).

use super::*;
use crate::store::{ClaimKey, Claims};

impl JetStream {
    /// The bucket and key a claim is kept under.
    fn claim_at<'a>(&'a self, key: &ClaimKey) -> (&'a kv::Store, String) {
        match key {
            ClaimKey::Consumed(handoff) => (&self.consumed, handoff.clone()),
            ClaimKey::Keyed { run_id, handoff_id } => {
                (&self.state, format!("{run_id}.key.{handoff_id}"))
            }
        }
    }
}

#[async_trait::async_trait]
impl Claims for JetStream {
    /// Records the first handoff made from a consumed delivery (or under a
    /// key), or returns the one recorded before.
    async fn claim_consumed(&self, key: &ClaimKey, claim: &pb::ConsumeClaim) -> Result<Claim> {
        let (bucket, at) = self.claim_at(key);
        let created = bucket
            .create(at.as_str(), claim.encode_to_vec().into())
            .await;
        match created {
            Ok(revision) => Ok(Claim::Made(revision)),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                match self.claim(key).await? {
                    Some((held, revision)) => Ok(Claim::Held(held, revision)),
                    // Withdrawn or expired between the two calls: try again.
                    None => Box::pin(self.claim_consumed(key, claim)).await,
                }
            }
            Err(e) => Err(BrokerError::nats("recording the claim", e)),
        }
    }

    async fn claim(&self, key: &ClaimKey) -> Result<Option<(pb::ConsumeClaim, u64)>, BrokerError> {
        let (bucket, at) = self.claim_at(key);
        read(bucket, &at).await
    }

    async fn update_claim(
        &self,
        key: &ClaimKey,
        claim: &pb::ConsumeClaim,
        revision: u64,
    ) -> Result<Option<u64>, BrokerError> {
        let (bucket, at) = self.claim_at(key);
        match bucket
            .update(at.as_str(), claim.encode_to_vec().into(), revision)
            .await
        {
            Ok(next) => Ok(Some(next)),
            Err(e) if lost_compare_and_set(&e) => Ok(None),
            Err(e) => Err(BrokerError::nats("updating the claim", e)),
        }
    }

    /// Withdraws a claim this broker made for a handoff it did not store
    /// (only if nothing changed it since). A failure is logged: the claim
    /// then only refuses other targets for that delivery.
    async fn release_claim(&self, key: &ClaimKey, revision: u64) {
        let (bucket, at) = self.claim_at(key);
        if let Err(e) = bucket
            .delete_expect_revision(at.as_str(), Some(revision))
            .await
        {
            tracing::warn!(claim = %at, error = %e, "claim not withdrawn");
        }
    }
}
