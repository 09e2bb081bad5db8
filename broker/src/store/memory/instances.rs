//! Instances on Memory.

use super::*;
use crate::store::Instances;

#[async_trait::async_trait]
impl Instances for Memory {
    async fn put_instance(&self, instance: &pb::Instance, expiry: Duration) -> Result<()> {
        self.trip("put_instance")?;
        let key = format!("{}.{}", instance.agent, instance.session);
        let until = std::time::Instant::now() + expiry;
        self.state()?
            .instances
            .insert(key, (instance.clone(), until));
        Ok(())
    }

    async fn remove_instance(&self, agent: &str, session: &str) -> Result<()> {
        self.trip("remove_instance")?;
        self.state()?
            .instances
            .remove(&format!("{agent}.{session}"));
        Ok(())
    }

    async fn instances(&self, agent: &str) -> Result<Vec<pb::Instance>> {
        self.trip("instances")?;
        let now = std::time::Instant::now();
        Ok(self
            .state()?
            .instances
            .values()
            .filter(|(i, until)| *until > now && (agent.is_empty() || i.agent == agent))
            .map(|(i, _)| i.clone())
            .collect())
    }
}
