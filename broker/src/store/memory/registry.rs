//! Registry on Memory.

use super::*;
use crate::store::Registry;

#[async_trait::async_trait]
impl Registry for Memory {
    async fn agent(&self, name: &str) -> Result<Option<pb::AgentSpec>> {
        self.trip("agent")?;
        Ok(self.state()?.agents.get(name).cloned())
    }

    async fn put_agent(&self, spec: &pb::AgentSpec) -> Result<bool> {
        self.trip("put_agent")?;
        Ok(self
            .state()?
            .agents
            .insert(spec.name.clone(), spec.clone())
            .is_some())
    }

    async fn agents(&self) -> Result<Vec<pb::AgentSpec>> {
        Ok(self.state()?.agents.values().cloned().collect())
    }

    async fn contract(&self, message_type: &str, version: u32) -> Result<Option<pb::Contract>> {
        Ok(self
            .state()?
            .contracts
            .get(&(message_type.to_string(), version))
            .cloned())
    }

    async fn create_contract(&self, contract: &pb::Contract) -> Result<bool> {
        let mut s = self.state()?;
        let key = (contract.message_type.clone(), contract.version);
        if s.contracts.contains_key(&key) {
            return Ok(false);
        }
        s.contracts.insert(key, contract.clone());
        Ok(true)
    }

    async fn contract_versions(&self) -> Result<Vec<(String, u32)>> {
        Ok(self.state()?.contracts.keys().cloned().collect())
    }

    async fn contract_mode(&self, message_type: &str) -> Result<Option<(pb::ContractMode, u64)>> {
        self.trip("contract_mode")?;
        Ok(self.state()?.contract_modes.get(message_type).cloned())
    }

    async fn put_contract_mode(
        &self,
        mode: &pb::ContractMode,
        revision: Option<u64>,
    ) -> Result<bool> {
        self.trip("put_contract_mode")?;
        let mut s = self.state()?;
        if s.contract_modes.get(&mode.message_type).map(|(_, r)| *r) != revision {
            return Ok(false);
        }
        let rev = s.next_revision();
        s.contract_modes
            .insert(mode.message_type.clone(), (mode.clone(), rev));
        Ok(true)
    }
}
