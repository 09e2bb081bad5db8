//! Leases on JetStream.

use super::*;
use crate::store::Leases;

#[async_trait::async_trait]
impl Leases for JetStream {
    async fn lease(&self, agent: &str, sequence: u64) -> Result<Option<(pb::Lease, u64)>> {
        read(&self.leases, &format!("{agent}.{sequence}")).await
    }

    async fn put_lease(
        &self,
        agent: &str,
        sequence: u64,
        lease: &pb::Lease,
        revision: Option<u64>,
    ) -> Result<bool> {
        // The record lives until its lease's deadline and LEASE_RECORD_GRACE
        // after it (see the constant), then expires by itself.
        let left = lease
            .deadline
            .and_then(|t| std::time::SystemTime::try_from(t).ok())
            .and_then(|t| t.duration_since(std::time::SystemTime::now()).ok())
            .unwrap_or_default();
        let ttl = Duration::from_secs((left + LEASE_RECORD_GRACE).as_secs_f64().ceil() as u64);
        let message = jetstream::message::PublishMessage::build()
            .payload(lease.encode_to_vec().into())
            .expected_last_subject_sequence(revision.unwrap_or(0))
            .ttl(ttl);
        let sent = self
            .js
            .send_publish(format!("$KV.{LEASES_BUCKET}.{agent}.{sequence}"), message)
            .await
            .map_err(|e| BrokerError::nats("recording a lease", e))?;
        match sent.await {
            Ok(_) => Ok(true),
            Err(e) if lost_compare_and_set(&e) => Ok(false),
            Err(e) => Err(BrokerError::nats("recording a lease", e)),
        }
    }
}
