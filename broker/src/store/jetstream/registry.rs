//! Registry on JetStream.

use super::*;
use crate::store::Registry;

#[async_trait::async_trait]
impl Registry for JetStream {
    async fn agent(&self, name: &str) -> Result<Option<pb::AgentSpec>> {
        let value = self
            .agents
            .get(name)
            .await
            .map_err(|e| BrokerError::nats("reading the agent", e))?;
        value
            .map(|v| {
                pb::AgentSpec::decode(v).map_err(|e| {
                    BrokerError::Internal(format!("stored agent {name} does not decode: {e}"))
                })
            })
            .transpose()
    }

    /// Stores an agent spec; returns whether it existed before.
    async fn put_agent(&self, spec: &pb::AgentSpec) -> Result<bool> {
        let existed = self.agent(&spec.name).await?.is_some();
        self.agents
            .put(&spec.name, spec.encode_to_vec().into())
            .await
            .map_err(|e| BrokerError::nats("storing the agent", e))?;
        Ok(existed)
    }

    /// Every registered agent, by name.
    async fn agents(&self) -> Result<Vec<pb::AgentSpec>> {
        let keys: Vec<String> = match self.agents.keys().await {
            Ok(k) => k
                .try_collect()
                .await
                .map_err(|e| BrokerError::nats("listing agents", e))?,
            Err(e) => return Err(BrokerError::nats("listing agents", e)),
        };
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            if let Some(a) = self.agent(&k).await? {
                out.push(a);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Reads one contract version.
    async fn contract(&self, message_type: &str, version: u32) -> Result<Option<pb::Contract>> {
        let key = contract_key(message_type, version);
        let value = self
            .contracts
            .get(&key)
            .await
            .map_err(|e| BrokerError::nats("reading the contract", e))?;
        value
            .map(|v| {
                pb::Contract::decode(v).map_err(|e| {
                    BrokerError::Internal(format!("stored contract {key} does not decode: {e}"))
                })
            })
            .transpose()
    }

    /// Stores a new contract version unless that version exists; returns
    /// whether it was created (compare-and-set on the version's key).
    async fn create_contract(&self, contract: &pb::Contract) -> Result<bool> {
        let key = contract_key(&contract.message_type, contract.version);
        match self
            .contracts
            .create(&key, contract.encode_to_vec().into())
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(BrokerError::nats("storing the contract", e)),
        }
    }

    async fn contract_versions(&self) -> Result<Vec<(String, u32)>, BrokerError> {
        let keys: Vec<String> = match self.contracts.keys().await {
            Ok(k) => k
                .try_collect()
                .await
                .map_err(|e| BrokerError::nats("listing contracts", e))?,
            Err(e) => return Err(BrokerError::nats("listing contracts", e)),
        };
        Ok(keys
            .iter()
            .filter_map(|k| parse_contract_key(k))
            .map(|(t, v)| (t.to_string(), v))
            .collect())
    }

    async fn contract_mode(&self, message_type: &str) -> Result<Option<(pb::ContractMode, u64)>> {
        read(&self.contract_modes, message_type).await
    }

    async fn put_contract_mode(
        &self,
        mode: &pb::ContractMode,
        revision: Option<u64>,
    ) -> Result<bool> {
        self.write(
            &self.contract_modes,
            &mode.message_type,
            mode.encode_to_vec().into(),
            revision,
        )
        .await
    }
}
