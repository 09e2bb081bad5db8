//! `RegisterAgent` and `ListAgents`.

use std::time::Duration;

use handoff_proto::pb;

use crate::{
    app::{
        auth::{self, Caller},
        Broker,
    },
    error::BrokerError,
    rules::{contracts, grants::Action, names},
};

/// Longest lease accepted.
const MAX_LEASE: Duration = Duration::from_secs(24 * 3600);
/// Most attempts accepted.
const MAX_ATTEMPTS: u32 = 1000;

/// Validates the spec, fills defaults, makes sure the agent's consumer
/// exists with this lease, then stores the spec.
pub async fn register(
    broker: &Broker,
    caller: &Caller,
    req: pb::RegisterAgentRequest,
) -> Result<pb::RegisterAgentResponse, BrokerError> {
    auth::require(broker, caller, Action::Admin, "").await?;
    let mut spec = req
        .agent
        .ok_or_else(|| BrokerError::malformed("agent", "agent is required"))?;
    names::validate("agent.name", &spec.name)?;
    names::validate_optional("agent.fallback_agent", &spec.fallback_agent)?;
    if spec.fallback_agent == spec.name {
        return Err(BrokerError::malformed(
            "agent.fallback_agent",
            format!("agent {:?} cannot be its own fallback", spec.name),
        ));
    }
    if !spec.fallback_agent.is_empty() {
        broker
            .agent(&spec.fallback_agent)
            .await
            .map_err(|e| match e {
                BrokerError::AgentNotFound(n) => {
                    BrokerError::AgentNotFound(format!("{n} (fallback of {})", spec.name))
                }
                other => other,
            })?;
    }
    check_contracts(broker, &mut spec).await?;
    let lease = match &spec.lease {
        None => broker.config().default_lease,
        Some(d) => {
            let lease = Duration::try_from(*d)
                .map_err(|_| BrokerError::malformed("agent.lease", "agent.lease is negative"))?;
            if lease < Duration::from_millis(100) || lease > MAX_LEASE {
                return Err(BrokerError::malformed(
                    "agent.lease",
                    format!("agent.lease {lease:?} is outside [100ms, 24h]"),
                ));
            }
            lease
        }
    };
    if let Some(d) = spec.max_queue_wait {
        match Duration::try_from(d) {
            Ok(w) if w >= Duration::from_millis(100) && w <= MAX_LEASE * 7 => {}
            _ => {
                return Err(BrokerError::malformed(
                    "agent.max_queue_wait",
                    "agent.max_queue_wait is outside [100ms, 7d]",
                ))
            }
        }
    }
    if spec.max_attempts == 0 {
        spec.max_attempts = broker.config().default_max_attempts;
    }
    if spec.max_attempts > MAX_ATTEMPTS {
        return Err(BrokerError::malformed(
            "agent.max_attempts",
            format!(
                "agent.max_attempts {} is over {MAX_ATTEMPTS}",
                spec.max_attempts
            ),
        ));
    }
    spec.lease = prost_types::Duration::try_from(lease).ok();
    let max_ack_pending = i64::from(broker.config().max_in_flight)
        .saturating_mul(100)
        .max(10_000);
    broker
        .store()
        .prepare_inbox(&spec.name, lease, max_ack_pending)
        .await?;
    let updated = broker.store().put_agent(&spec).await?;
    broker.cache_agent(spec.clone());
    tracing::info!(agent = %spec.name, ?lease, max_attempts = spec.max_attempts, updated, "agent registered");
    Ok(pb::RegisterAgentResponse {
        agent: Some(spec),
        updated,
    })
}

/// Checks that the accepted contract has a registered version in the
/// range and that every emitted contract is registered; sorts and dedupes
/// `emits`.
async fn check_contracts(broker: &Broker, spec: &mut pb::AgentSpec) -> Result<(), BrokerError> {
    if let Some(accepts) = &spec.accepts {
        contracts::validate_type_name("agent.accepts.message_type", &accepts.message_type)?;
        let (min, max) = (accepts.min_version, accepts.max_version);
        if max != 0 && min > max {
            return Err(BrokerError::malformed(
                "agent.accepts",
                format!("agent.accepts: min_version {min} is above max_version {max}"),
            ));
        }
        let versions = broker.contract_versions(&accepts.message_type).await?;
        if versions.is_empty() {
            return Err(BrokerError::ContractNotFound(format!(
                "agent {:?} accepts contract {}, which is not registered",
                spec.name, accepts.message_type
            )));
        }
        if contracts::pick(&versions, min, max).is_none() {
            return Err(BrokerError::ContractNotFound(format!(
                "agent {:?} accepts versions {} of {}; the registered versions are 1 to {}",
                spec.name,
                contracts::range_name(min, max),
                accepts.message_type,
                versions.last().map_or(0, |c| c.contract.version)
            )));
        }
    }
    spec.reads.sort();
    spec.reads.dedup();
    for key in &spec.reads {
        crate::rules::state::validate_key("agent.reads", key)?;
    }
    spec.emits.sort();
    spec.emits.dedup();
    for t in &spec.emits {
        contracts::validate_type_name("agent.emits", t)?;
        if broker.contract_versions(t).await?.is_empty() {
            return Err(BrokerError::ContractNotFound(format!(
                "agent {:?} emits contract {t}, which is not registered",
                spec.name
            )));
        }
    }
    Ok(())
}

/// Every registered agent, with what it is doing now: its live
/// instances on every replica and its inbox's backlog (read for every
/// agent at once).
pub async fn list(broker: &Broker, caller: &Caller) -> Result<pb::ListAgentsResponse, BrokerError> {
    auth::require(broker, caller, Action::Read, "").await?;
    let store = broker.store();
    let (agents, instances) = tokio::join!(store.agents(), store.instances(""));
    let (agents, instances) = (agents?, instances?);
    let backlogs =
        futures::future::try_join_all(agents.iter().map(|a| store.backlog(&a.name))).await?;
    let now = std::time::SystemTime::now();
    let status = agents
        .iter()
        .zip(backlogs)
        .map(|(agent, backlog)| {
            let live = instances.iter().filter(|i| i.agent == agent.name).count();
            let age = backlog
                .oldest_pending
                .and_then(|t| std::time::SystemTime::try_from(t).ok())
                .map(|t| now.duration_since(t).unwrap_or_default());
            let oldest_pending_age = age.and_then(|age| prost_types::Duration::try_from(age).ok());
            let max_wait = agent
                .max_queue_wait
                .and_then(|d| std::time::Duration::try_from(d).ok());
            pb::AgentStatus {
                name: agent.name.clone(),
                instances: u32::try_from(live).unwrap_or(u32::MAX),
                pending: backlog.pending,
                in_flight: backlog.in_flight,
                oldest_pending_age,
                unattended: unattended(live, backlog.pending, age, max_wait),
            }
        })
        .collect();
    Ok(pb::ListAgentsResponse { agents, status })
}

/// The lease of a stored spec.
pub fn lease_of(spec: &pb::AgentSpec, default: Duration) -> Duration {
    spec.lease
        .and_then(|d| Duration::try_from(d).ok())
        .unwrap_or(default)
}

/// Whether an agent's work is unattended: work waits, no instance is
/// live, and the oldest waiting handoff has waited longer than the
/// agent's `max_queue_wait` (at once when it has none).
fn unattended(
    live: usize,
    pending: u64,
    oldest: Option<std::time::Duration>,
    max_queue_wait: Option<std::time::Duration>,
) -> bool {
    live == 0 && pending > 0 && max_queue_wait.is_none_or(|max| oldest.is_some_and(|age| age > max))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::unattended;

    #[test]
    fn work_is_unattended_once_it_waited_longer_than_max_queue_wait() {
        let s = Duration::from_secs;
        assert!(!unattended(1, 5, Some(s(60)), None), "an instance is live");
        assert!(!unattended(0, 0, None, None), "nothing waits");
        assert!(unattended(0, 1, Some(s(0)), None), "no max_queue_wait");
        assert!(!unattended(0, 1, Some(s(5)), Some(s(10))));
        assert!(unattended(0, 1, Some(s(11)), Some(s(10))));
        assert!(!unattended(0, 1, None, Some(s(10))), "no age known");
    }
}
