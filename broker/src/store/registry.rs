//! The registry: agents' specs, contract versions and compatibility modes.

use super::*;

/// The registry: agents' specs, contract versions and compatibility modes.
#[async_trait::async_trait]
pub trait Registry: Send + Sync {
    /// An agent's spec.
    async fn agent(&self, name: &str) -> Result<Option<pb::AgentSpec>>;

    /// Stores an agent's spec; returns whether it existed before.
    async fn put_agent(&self, spec: &pb::AgentSpec) -> Result<bool>;

    /// Every registered agent, by name.
    async fn agents(&self) -> Result<Vec<pb::AgentSpec>>;

    /// One version of a contract.
    async fn contract(&self, message_type: &str, version: u32) -> Result<Option<pb::Contract>>;

    /// Stores a contract version unless that version exists; returns
    /// whether it was stored.
    async fn create_contract(&self, contract: &pb::Contract) -> Result<bool>;

    /// Every stored contract version, as (message type, version).
    async fn contract_versions(&self) -> Result<Vec<(String, u32)>>;

    /// A contract's compatibility mode as `SetCompatibility` last set it,
    /// and its revision (`None`: never changed, version 1's mode holds).
    async fn contract_mode(&self, message_type: &str) -> Result<Option<(pb::ContractMode, u64)>>;

    /// Writes a contract's mode: creates it when `revision` is `None`
    /// (`false` if one exists), else compare-and-set; `false` when another
    /// writer came first.
    async fn put_contract_mode(
        &self,
        mode: &pb::ContractMode,
        revision: Option<u64>,
    ) -> Result<bool>;
}
