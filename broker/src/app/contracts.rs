//! `RegisterContract`, `GetContract`, `ListContracts` and
//! `SetCompatibility`.
//!
//! Versions are consecutive from 1 and never change once stored. A new
//! version is checked against the latest under the contract's mode and
//! stored with compare-and-set on its own key, so two replicas racing to
//! register the same version store one of them and the other gets either
//! the same content back (no-op) or ALREADY_EXISTS.
//!
//! The mode is fixed at version 1: a later version that asks for another
//! one is refused (COMPATIBILITY_MODE_FIXED), so whoever registers the next
//! version cannot loosen its check. Only [`set_compatibility`] (admin)
//! changes it, recorded per message type in the store (so every replica
//! sees it) and as a `contract_mode_changed` event.

use std::{sync::Arc, time::Duration};

use handoff_proto::pb;

use crate::{
    app::{
        auth::{self, Caller},
        now, Broker,
    },
    error::{BrokerError, Reason},
    rules::{
        contracts::{self, compat, validate, Compiled},
        grants::Action,
    },
};

/// Largest descriptor set accepted, in bytes.
const MAX_DESCRIPTOR_SET: usize = 512 * 1024;

/// Registers a contract version (or answers the identical one).
pub async fn register(
    broker: &Broker,
    caller: &Caller,
    req: pb::RegisterContractRequest,
) -> Result<pb::RegisterContractResponse, BrokerError> {
    auth::require(broker, caller, Action::Admin, "").await?;
    contracts::validate_type_name("message_type", &req.message_type)?;
    if req.file_descriptor_set.is_empty() {
        return Err(BrokerError::malformed(
            "file_descriptor_set",
            "file_descriptor_set is required (an encoded google.protobuf.FileDescriptorSet)"
                .to_string(),
        ));
    }
    if req.file_descriptor_set.len() > MAX_DESCRIPTOR_SET {
        return Err(BrokerError::malformed(
            "file_descriptor_set",
            format!(
                "file_descriptor_set is {} bytes; the limit is {MAX_DESCRIPTOR_SET}",
                req.file_descriptor_set.len()
            ),
        ));
    }
    let message = contracts::message_of(&req.file_descriptor_set, &req.message_type)?;
    let rules = req.rules.clone().unwrap_or_default();
    check_rules(&message, &rules)?;
    let requested = requested_mode(req.compatibility);

    let versions = broker.contract_versions(&req.message_type).await?;
    let latest = versions.last().cloned();
    let latest_version = latest.as_ref().map_or(0, |c| c.contract.version);
    // Identical content is a no-op: the fingerprint of the request under
    // the mode asked for, or (unset) under the compared version's own.
    let fingerprint_as = |existing: &Compiled| {
        let mode = requested.unwrap_or_else(|| contracts::mode_of(existing.contract.compatibility));
        contracts::fingerprint(&message, mode, &rules)
    };
    let version = match req.version {
        0 => match &latest {
            Some(l) if l.contract.fingerprint == fingerprint_as(l) => {
                return Ok(answer(l, false));
            }
            _ => latest_version + 1,
        },
        v if v <= latest_version => {
            let existing = versions
                .iter()
                .find(|c| c.contract.version == v)
                .cloned()
                .ok_or_else(|| {
                    BrokerError::Internal(format!("version {v} of {} is missing", req.message_type))
                })?;
            return same_or_conflict(&existing, &fingerprint_as(&existing));
        }
        v if v == latest_version + 1 => v,
        v => {
            return Err(BrokerError::VersionGap(format!(
                "versions of {} are consecutive: the next is {}, not {v}",
                req.message_type,
                latest_version + 1
            )))
        }
    };
    // Version 1 sets the mode (unset: BACKWARD); a later one is checked
    // under the contract's, and may not ask for another.
    let mode = match versions.first() {
        None => requested.unwrap_or(pb::Compatibility::Backward),
        Some(first) => {
            let stored = effective_mode(broker, first).await?.0;
            match requested {
                Some(r) if r != stored => {
                    return Err(BrokerError::ModeFixed {
                        message_type: req.message_type.clone(),
                        version,
                        stored: contracts::mode_name(stored),
                        requested: contracts::mode_name(r),
                    })
                }
                _ => stored,
            }
        }
    };
    let fingerprint = contracts::fingerprint(&message, mode, &rules);
    if let Some(previous) = &latest {
        let problems = compat::check(mode, &previous.message, &previous.rules, &message, &rules);
        if !problems.is_empty() {
            return Err(BrokerError::Incompatible {
                message_type: req.message_type.clone(),
                version,
                previous: previous.contract.version,
                mode: contracts::mode_name(mode),
                problems,
            });
        }
    }
    let contract = pb::Contract {
        message_type: req.message_type.clone(),
        version,
        compatibility: mode as i32,
        rules: Some(rules.clone()),
        file_descriptor_set: req.file_descriptor_set,
        fingerprint: fingerprint.clone(),
        registered_at: Some(now()),
    };
    if broker.store().create_contract(&contract).await? {
        let compiled = Arc::new(Compiled {
            contract,
            message,
            rules,
        });
        broker.contracts().insert(compiled.clone());
        tracing::info!(message_type = %req.message_type, version, mode = contracts::mode_name(mode), "contract registered");
        return Ok(answer(&compiled, true));
    }
    // Another replica stored this version first.
    let existing = broker
        .store()
        .contract(&req.message_type, version)
        .await?
        .ok_or_else(|| BrokerError::Internal("contract version vanished".to_string()))?;
    let existing = Arc::new(Compiled::new(existing)?);
    broker.contracts().insert(existing.clone());
    same_or_conflict(&existing, &fingerprint)
}

/// The mode a request asks for; `None` when unset (or not a known mode).
fn requested_mode(value: i32) -> Option<pb::Compatibility> {
    match pb::Compatibility::try_from(value) {
        Ok(pb::Compatibility::Unspecified) | Err(_) => None,
        Ok(m) => Some(m),
    }
}

/// A contract's mode now: the one `SetCompatibility` recorded, else
/// version 1's; with the record's revision, if any.
async fn effective_mode(
    broker: &Broker,
    first: &Compiled,
) -> Result<(pb::Compatibility, Option<u64>), BrokerError> {
    match broker
        .store()
        .contract_mode(&first.contract.message_type)
        .await?
    {
        Some((m, revision)) => Ok((contracts::mode_of(m.compatibility), Some(revision))),
        None => Ok((contracts::mode_of(first.contract.compatibility), None)),
    }
}

/// Longest reason accepted by [`set_compatibility`], in bytes.
const MAX_REASON: usize = 1024;

/// Changes the compatibility mode a contract's next versions are checked
/// under (admin), and records the change as a `contract_mode_changed`
/// event on run token `_`. Setting the mode the contract has already is a
/// no-op (`changed = false`, no event).
pub async fn set_compatibility(
    broker: &Broker,
    caller: &Caller,
    req: pb::SetCompatibilityRequest,
) -> Result<pb::SetCompatibilityResponse, BrokerError> {
    auth::require(broker, caller, Action::Admin, "").await?;
    contracts::validate_type_name("message_type", &req.message_type)?;
    let mode = requested_mode(req.compatibility).ok_or_else(|| {
        BrokerError::malformed(
            "compatibility",
            "compatibility is required (NONE, BACKWARD, FORWARD or FULL)",
        )
    })?;
    let why = req.reason.trim();
    if why.is_empty() {
        return Err(BrokerError::malformed(
            "reason",
            "reason is required: it is recorded with the change",
        ));
    }
    if why.len() > MAX_REASON {
        return Err(BrokerError::malformed(
            "reason",
            format!("reason is {} bytes; the limit is {MAX_REASON}", why.len()),
        ));
    }
    let versions = broker.contract_versions(&req.message_type).await?;
    let (Some(first), Some(latest)) = (versions.first(), versions.last()) else {
        return Err(BrokerError::ContractNotFound(format!(
            "contract {} is not registered",
            req.message_type
        )));
    };
    let answer = |previous: pb::Compatibility, changed: bool| {
        let mut contract = latest.contract.clone();
        contract.file_descriptor_set.clear();
        contract.compatibility = mode as i32;
        pb::SetCompatibilityResponse {
            contract: Some(contract),
            previous: previous as i32,
            changed,
        }
    };
    // Compare-and-set on the record: a racing change on another replica
    // makes this one read again and decide on what it wrote.
    loop {
        let (previous, revision) = effective_mode(broker, first).await?;
        if previous == mode {
            return Ok(answer(previous, false));
        }
        let record = pb::ContractMode {
            message_type: req.message_type.clone(),
            compatibility: mode as i32,
            changed_by: caller.principal.clone(),
            reason: why.to_string(),
            changed_at: Some(now()),
        };
        if !broker.store().put_contract_mode(&record, revision).await? {
            continue;
        }
        let change = format!(
            "{} -> {}",
            contracts::mode_name(previous),
            contracts::mode_name(mode)
        );
        tracing::info!(message_type = %req.message_type, change = %change, principal = %caller.principal, reason = why, "contract compatibility mode changed");
        let event = pb::Event {
            kind: pb::EventKind::ContractModeChanged as i32,
            run_id: "_".to_string(),
            agent: caller.principal.clone(),
            contract_type: req.message_type.clone(),
            contract_version: latest.contract.version,
            reason: format!("{change}: {why}"),
            ..Default::default()
        };
        // One event per recorded change: its id names the record it
        // replaced, so a repeated publish is deduplicated.
        let msg_id = format!(
            "contract_mode.{}.{}",
            req.message_type,
            revision.unwrap_or(0)
        );
        broker.emit(event, &msg_id).await?;
        return Ok(answer(previous, true));
    }
}

/// Checks the rules against the message: every required path resolves,
/// confidence is a probability, the age is positive.
fn check_rules(
    message: &prost_reflect::MessageDescriptor,
    rules: &pb::ContractRules,
) -> Result<(), BrokerError> {
    if let Err(problems) = validate::check_required_paths(message, &rules.required_fields) {
        return Err(BrokerError::invalid(
            Reason::InvalidContract,
            "rules.required_fields",
            format!("rules.required_fields: {}", problems.join("; ")),
        ));
    }
    if let Err(problems) = crate::rules::contracts::dropped::check_carry(message, &rules.carry) {
        return Err(BrokerError::invalid(
            Reason::InvalidContract,
            "rules.carry",
            format!("rules.carry: {}", problems.join("; ")),
        ));
    }
    if let Some(c) = rules.min_confidence {
        if !(0.0..=1.0).contains(&c) {
            return Err(BrokerError::invalid(
                Reason::InvalidContract,
                "rules.min_confidence",
                format!("rules.min_confidence {c} is outside [0, 1]"),
            ));
        }
    }
    if let Some(age) = rules.max_tool_result_age {
        match Duration::try_from(age) {
            Ok(d) if !d.is_zero() => {}
            _ => {
                return Err(BrokerError::invalid(
                    Reason::InvalidContract,
                    "rules.max_tool_result_age",
                    "rules.max_tool_result_age must be positive".to_string(),
                ))
            }
        }
    }
    Ok(())
}

fn same_or_conflict(
    existing: &Compiled,
    fingerprint: &str,
) -> Result<pb::RegisterContractResponse, BrokerError> {
    if existing.contract.fingerprint == fingerprint {
        Ok(answer(existing, false))
    } else {
        Err(BrokerError::ContractConflict(format!(
            "version {} of {} is already registered with other content (fingerprint {}); register the change as version {} or later",
            existing.contract.version,
            existing.contract.message_type,
            &existing.contract.fingerprint[..existing.contract.fingerprint.len().min(12)],
            existing.contract.version + 1
        )))
    }
}

fn answer(c: &Compiled, created: bool) -> pb::RegisterContractResponse {
    pb::RegisterContractResponse {
        contract: Some(c.contract.clone()),
        created,
    }
}

/// One version (0: the latest) of a contract.
pub async fn get(
    broker: &Broker,
    caller: &Caller,
    req: pb::GetContractRequest,
) -> Result<pb::GetContractResponse, BrokerError> {
    auth::require(broker, caller, Action::Read, "").await?;
    contracts::validate_type_name("message_type", &req.message_type)?;
    let versions = broker.contract_versions(&req.message_type).await?;
    let found = if req.version == 0 {
        versions.last().cloned()
    } else {
        match versions.iter().find(|c| c.contract.version == req.version) {
            Some(c) => Some(c.clone()),
            // Registered on another replica since this one last looked.
            None => broker
                .store()
                .contract(&req.message_type, req.version)
                .await?
                .map(|c| Compiled::new(c).map(Arc::new))
                .transpose()?,
        }
    };
    match found {
        Some(c) => Ok(pb::GetContractResponse {
            contract: Some(c.contract.clone()),
        }),
        None if versions.is_empty() => Err(BrokerError::ContractNotFound(format!(
            "contract {} is not registered",
            req.message_type
        ))),
        None => Err(BrokerError::ContractNotFound(format!(
            "version {} of contract {} is not registered (latest: {})",
            req.version,
            req.message_type,
            versions.last().map_or(0, |c| c.contract.version)
        ))),
    }
}

/// Every version of every contract (or of one), descriptors left out.
pub async fn list(
    broker: &Broker,
    caller: &Caller,
    req: pb::ListContractsRequest,
) -> Result<pb::ListContractsResponse, BrokerError> {
    auth::require(broker, caller, Action::Read, "").await?;
    let mut out = Vec::new();
    let mut keys: Vec<(String, u32)> = broker
        .store()
        .contract_versions()
        .await?
        .into_iter()
        .filter(|(t, _)| req.message_type.is_empty() || *t == req.message_type)
        .collect();
    keys.sort();
    for (t, v) in keys {
        if let Some(mut c) = broker.store().contract(&t, v).await? {
            c.file_descriptor_set.clear();
            out.push(c);
        }
    }
    Ok(pb::ListContractsResponse { contracts: out })
}
