//! Instances on JetStream.

use super::*;
use crate::store::Instances;

#[async_trait::async_trait]
impl Instances for JetStream {
    /// A put with a per-message TTL: the record expires `expiry` after its
    /// last refresh, so a replica that dies leaves none behind.
    async fn put_instance(&self, instance: &pb::Instance, expiry: Duration) -> Result<()> {
        let ttl = Duration::from_secs(expiry.as_secs_f64().ceil().max(1.0) as u64);
        let message = jetstream::message::PublishMessage::build()
            .payload(instance.encode_to_vec().into())
            .ttl(ttl);
        let subject = format!(
            "$KV.{INSTANCES_BUCKET}.{}.{}",
            instance.agent, instance.session
        );
        self.js
            .send_publish(subject, message)
            .await
            .map_err(|e| BrokerError::nats("recording a live session", e))?
            .await
            .map_err(|e| BrokerError::nats("recording a live session", e))?;
        Ok(())
    }

    async fn remove_instance(&self, agent: &str, session: &str) -> Result<()> {
        self.instances
            .purge(format!("{agent}.{session}"))
            .await
            .map_err(|e| BrokerError::nats("removing a live session", e))
    }

    async fn instances(&self, agent: &str) -> Result<Vec<pb::Instance>> {
        let all: Vec<pb::Instance> = Self::all(&self.instances).await?;
        Ok(all
            .into_iter()
            .filter(|i| agent.is_empty() || i.agent == agent)
            .collect())
    }
}
