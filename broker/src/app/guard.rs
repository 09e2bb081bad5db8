//! The guards a handoff passes before anything is stored: the source
//! must declare the contract it emits, the payload must be the target's
//! contract, decode, carry no unknown field, have every required field and
//! keep within the budgets; and a consumed delivery must not already have
//! gone to another target unless every handoff from it declares fan-out.
//! A refusal is counted, published as a `contract_rejected` event, and
//! leaves nothing stored.

use std::time::SystemTime;

use handoff_proto::pb;

use crate::{
    app::Broker,
    error::{BrokerError, Reason},
    rules::contracts::{self, validate},
};

/// Payloads at least this large are checked on the blocking pool.
const BLOCKING_CHECK_BYTES: usize = 16 * 1024;

/// What the guards measured, for the envelope.
#[derive(Debug, Default)]
pub struct Checked {
    /// The contract checked against (empty: the target takes any payload).
    pub contract_type: String,
    /// Its version.
    pub version: u32,
    /// The payload's token count.
    pub tokens: u64,
}

/// A handoff refused by a guard.
pub struct Refusal {
    /// The guard's token for events and metrics (`max_tokens`, ...).
    rule: &'static str,
    reason: Reason,
    message: String,
    metadata: Vec<(&'static str, String)>,
    contract_type: String,
    version: u32,
    /// The tool whose result `max_tool_result_age` refused.
    stale_tool: Option<String>,
}

impl Refusal {
    fn new(rule: &'static str, reason: Reason, message: String) -> Refusal {
        Refusal {
            rule,
            reason,
            message,
            metadata: Vec::new(),
            contract_type: String::new(),
            version: 0,
            stale_tool: None,
        }
    }
}

/// Why the guards stopped a handoff: a refusal (counted and published) or
/// a failure to check (NATS down, unknown target).
pub enum Guarded {
    /// Refused by a guard.
    Refused(Refusal),
    /// Could not check.
    Failed(BrokerError),
}

impl From<BrokerError> for Guarded {
    fn from(e: BrokerError) -> Self {
        Guarded::Failed(e)
    }
}

/// The contract guards, all answered from memory once the agent and
/// contract caches are warm:
/// 1. a payload whose type is a registered contract may only come from a
///    source agent that declares it in `emits` (PERMISSION_DENIED);
/// 2. a target that accepts a contract takes only that type
///    (FAILED_PRECONDITION), checked against the highest registered
///    version in its range: decode, unknown fields, required fields,
///    bytes, tokens, confidence, tool result age.
pub async fn guard(broker: &Broker, req: &pb::HandoffRequest) -> Result<Checked, Guarded> {
    let payload = req
        .payload
        .as_ref()
        .ok_or_else(|| Guarded::Failed(BrokerError::malformed("payload", "payload is required")))?;
    let payload_type = contracts::type_of_url(&payload.type_url);
    if !req.source_agent.is_empty() && broker.contracts().knows(payload_type) {
        let declared = match broker.agent(&req.source_agent).await {
            Ok(source) => source.emits.iter().any(|t| t == payload_type),
            Err(BrokerError::AgentNotFound(_)) => false,
            Err(e) => return Err(e.into()),
        };
        if !declared {
            return Err(Guarded::Refused(Refusal {
                contract_type: payload_type.to_string(),
                metadata: vec![
                    ("agent", req.source_agent.clone()),
                    ("contract_type", payload_type.to_string()),
                ],
                ..Refusal::new(
                    "undeclared_emit",
                    Reason::UndeclaredEmit,
                    format!(
                        "agent {:?} does not declare that it emits {payload_type} (RegisterAgent emits)",
                        req.source_agent
                    ),
                )
            }));
        }
    }
    if req.r#final || req.to_barrier {
        return Ok(Checked::default());
    }
    check_target(broker, &req.target_agent, req, payload).await
}

/// The target's contract guard (see [`guard`]): for a handoff to an agent,
/// and for a branch result reaching an open barrier, whose target agent's
/// contract applies to every arrived branch.
pub async fn check_target(
    broker: &Broker,
    target: &str,
    req: &pb::HandoffRequest,
    payload: &prost_types::Any,
) -> Result<Checked, Guarded> {
    let target = broker.agent(target).await?;
    let Some(accepts) = &target.accepts else {
        return Ok(Checked::default());
    };
    check_contract(broker, &target.name, accepts, req, payload).await
}

/// The guards of contract `accepts` (a type and a version range) on a
/// payload for `agent` (named in refusals): the payload's type, then the
/// highest registered version in the range.
pub async fn check_contract(
    broker: &Broker,
    agent: &str,
    accepts: &pb::ContractRef,
    req: &pb::HandoffRequest,
    payload: &prost_types::Any,
) -> Result<Checked, Guarded> {
    let payload_type = contracts::type_of_url(&payload.type_url);
    let refusal = |rule, reason, message| {
        Guarded::Refused(Refusal {
            contract_type: accepts.message_type.clone(),
            metadata: vec![
                ("agent", agent.to_string()),
                ("contract_type", accepts.message_type.clone()),
                ("payload_type", payload_type.to_string()),
            ],
            ..Refusal::new(rule, reason, message)
        })
    };
    if payload_type != accepts.message_type {
        return Err(refusal(
            "contract_mismatch",
            Reason::ContractMismatch,
            format!(
                "agent {agent:?} accepts {}; the payload is {payload_type}",
                accepts.message_type
            ),
        ));
    }
    let versions = broker.contract_versions(&accepts.message_type).await?;
    let Some(contract) = contracts::pick(&versions, accepts.min_version, accepts.max_version)
    else {
        return Err(refusal(
            "contract_mismatch",
            Reason::ContractMismatch,
            format!(
                "no registered version of {} is in agent {agent:?}'s range {}",
                accepts.message_type,
                contracts::range_name(accepts.min_version, accepts.max_version)
            ),
        ));
    };
    let version = contract.contract.version;
    let tokenizer = broker.tokenizer().await?;
    let outcome = if payload.value.len() < BLOCKING_CHECK_BYTES {
        validate::check(
            &contract.message,
            &contract.rules,
            &tokenizer,
            &payload.value,
            req.confidence,
            &req.tool_results,
            SystemTime::now(),
        )
    } else {
        // Tokenizing a large payload takes milliseconds: keep it off the
        // async workers so other RPCs and the NATS connection go on.
        let value = payload.value.clone();
        let confidence = req.confidence;
        let tool_results = req.tool_results.clone();
        tokio::task::spawn_blocking(move || {
            validate::check(
                &contract.message,
                &contract.rules,
                &tokenizer,
                &value,
                confidence,
                &tool_results,
                SystemTime::now(),
            )
        })
        .await
        .map_err(|e| BrokerError::Internal(format!("contract check failed: {e}")))?
    };
    match outcome {
        Ok(measured) => Ok(Checked {
            contract_type: accepts.message_type.clone(),
            version,
            tokens: measured.tokens,
        }),
        Err(v) => Err(Guarded::Refused(Refusal {
            contract_type: accepts.message_type.clone(),
            version,
            stale_tool: match &v {
                validate::Violation::StaleToolResult { tool, .. }
                | validate::Violation::ToolResultUndated { tool } => Some(tool.clone()),
                _ => None,
            },
            metadata: v
                .metadata()
                .into_iter()
                .chain([
                    ("contract_type", accepts.message_type.clone()),
                    ("contract_version", version.to_string()),
                ])
                .collect(),
            ..Refusal::new(
                v.rule(),
                v.reason(),
                format!(
                    "{} (contract {} version {version})",
                    v, accepts.message_type
                ),
            )
        })),
    }
}

/// Given the first handoff made from the consumed delivery, refuses this
/// one if it goes to another target without both declaring fan-out (role
/// confusion): counted and published like every guard's refusal.
pub async fn check_claim(
    broker: &Broker,
    req: &pb::HandoffRequest,
    token: &pb::DeliveryToken,
    first: &pb::ConsumeClaim,
    mine: &pb::ConsumeClaim,
    checked: &Checked,
) -> Result<(), BrokerError> {
    let Some((message, metadata)) = crate::rules::handoff::role_confusion(token, first, mine)
    else {
        return Ok(());
    };
    Err(refuse(
        broker,
        req,
        Refusal {
            contract_type: checked.contract_type.clone(),
            version: checked.version,
            metadata,
            ..Refusal::new("role_confusion", Reason::RoleConfusion, message)
        },
    )
    .await)
}

/// Counts a refusal, publishes its `contract_rejected` event (when the run
/// exists), and turns it into the error the client sees.
pub async fn refuse(broker: &Broker, req: &pb::HandoffRequest, r: Refusal) -> BrokerError {
    broker.metrics().rejected(r.rule);
    if let Some(tool) = &r.stale_tool {
        broker.metrics().stale_tool_result(tool);
    }
    tracing::info!(run_id = %req.run_id, source = %req.source_agent, target = %req.target_agent, rule = r.rule, reason = %r.message, "handoff refused");
    match broker.run(&req.run_id).await {
        Ok((run, _)) => {
            let event = pb::Event {
                kind: pb::EventKind::ContractRejected as i32,
                run_id: run.id.clone(),
                owner: run.owner.clone(),
                agent: req.target_agent.clone(),
                source_agent: req.source_agent.clone(),
                reason: r.message.clone(),
                rule: r.rule.to_string(),
                contract_type: r.contract_type.clone(),
                contract_version: r.version,
                ..Default::default()
            };
            // Each refusal is its own event: no dedupe id to share.
            let msg_id = uuid::Uuid::now_v7().to_string();
            if let Err(e) = broker.emit(event, &msg_id).await {
                tracing::warn!(error = %e, "contract_rejected event not published");
            }
        }
        Err(e) => tracing::debug!(error = %e, "refused handoff names no known run; no event"),
    }
    BrokerError::Refused {
        reason: r.reason,
        message: r.message,
        metadata: r.metadata,
    }
}

/// Turns the outcome of a guard into the call's result: a refusal is
/// counted and published ([`refuse`]), a failure to check passes through.
pub async fn enforce(
    broker: &Broker,
    req: &pb::HandoffRequest,
    outcome: Result<Checked, Guarded>,
) -> Result<Checked, BrokerError> {
    match outcome {
        Ok(c) => Ok(c),
        Err(Guarded::Refused(r)) => Err(refuse(broker, req, r).await),
        Err(Guarded::Failed(e)) => Err(e),
    }
}

/// Signal 1: the payload fields dropped on the edge from the consumed
/// handoff `parent` to this one (both types must be registered contracts:
/// the names come from their schemas). A drop of a field the checked
/// contract says to carry (`ContractRules.carry`) is refused with
/// DROPPED_FIELD; the others are returned, for the event and the metrics.
pub async fn check_carry(
    broker: &Broker,
    req: &pb::HandoffRequest,
    parent: &pb::HandoffEnvelope,
    checked: &Checked,
) -> Result<Vec<String>, BrokerError> {
    let Some(out) = req.payload.as_ref() else {
        return Ok(Vec::new());
    };
    let in_type_url = match (&parent.payload, &parent.payload_ref) {
        (Some(p), _) => p.type_url.as_str(),
        (None, Some(r)) => r.type_url.as_str(),
        (None, None) => return Ok(Vec::new()),
    };
    let out_type = contracts::type_of_url(&out.type_url);
    let in_type = contracts::type_of_url(in_type_url);
    // Answered from the registry alone (loaded at start and kept current):
    // an unregistered type costs no read.
    let version = |ty: &str, v: u32| {
        let versions = broker.contracts().versions(ty)?;
        versions
            .iter()
            .find(|c| c.contract.version == v)
            .or(versions.last())
            .cloned()
    };
    let checked_here = checked.contract_type == out_type;
    let (Some(outgoing), Some(consumed)) = (
        version(out_type, if checked_here { checked.version } else { 0 }),
        version(in_type, parent.contract_version),
    ) else {
        return Ok(Vec::new());
    };
    // The consumed payload, whole: fetched when it came by reference.
    let input: std::borrow::Cow<'_, [u8]> = match (&parent.payload, &parent.payload_ref) {
        (Some(p), _) => std::borrow::Cow::Borrowed(&p.value),
        (None, Some(r)) => {
            std::borrow::Cow::Owned(crate::app::payloads::fetch(broker, r).await?.into())
        }
        (None, None) => return Ok(Vec::new()),
    };
    let dropped = if out.value.len() + input.len() < BLOCKING_CHECK_BYTES {
        contracts::dropped::dropped_fields(&consumed.message, &input, &outgoing.message, &out.value)
    } else {
        let (c, o) = (consumed.clone(), outgoing.clone());
        let (iv, ov) = (input.into_owned(), out.value.clone());
        tokio::task::spawn_blocking(move || {
            contracts::dropped::dropped_fields(&c.message, &iv, &o.message, &ov)
        })
        .await
        .map_err(|e| BrokerError::Internal(format!("comparing payloads failed: {e}")))?
    };
    let carried: Vec<&String> = if checked_here {
        dropped
            .iter()
            .filter(|f| outgoing.rules.carry.contains(f))
            .collect()
    } else {
        Vec::new()
    };
    if carried.is_empty() {
        return Ok(dropped);
    }
    let fields = carried
        .iter()
        .map(|f| f.as_str())
        .collect::<Vec<_>>()
        .join(",");
    let message = format!(
        "field {} held a value in the consumed handoff {} and is empty here; contract {} version {} says to carry it (rules.carry)",
        carried.iter().map(|f| format!("{f:?}")).collect::<Vec<_>>().join(", "),
        parent.id,
        checked.contract_type,
        checked.version
    );
    Err(refuse(
        broker,
        req,
        Refusal {
            contract_type: checked.contract_type.clone(),
            version: checked.version,
            metadata: vec![
                ("fields", fields),
                ("source", req.source_agent.clone()),
                ("target", req.target_agent.clone()),
                ("consumed_handoff_id", parent.id.clone()),
            ],
            ..Refusal::new("carry", Reason::DroppedField, message)
        },
    )
    .await)
}

/// Counts a handoff just accepted (`handoff_handoffs_accepted_total`, by
/// target) and records the age of each of its dated tool results
/// (`handoff_tool_result_age_seconds{tool}`), the measure behind
/// `max_tool_result_age`.
pub fn count_accepted(broker: &Broker, req: &pb::HandoffRequest) {
    let target = crate::metrics::target_label(&req.target_agent, req.r#final, req.to_barrier);
    broker.metrics().accepted(target);
    broker.metrics().tool_result_ages(
        req.tool_results.iter().map(|t| {
            let observed = t.observed_at.and_then(|at| SystemTime::try_from(at).ok());
            (t.tool.as_str(), observed)
        }),
        SystemTime::now(),
    );
}
