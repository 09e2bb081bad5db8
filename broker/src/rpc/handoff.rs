//! `Handoff`: validate, then durably accept one handoff.
//!
//! Order of a complete-and-handoff, chosen so that a crash anywhere leaves
//! a state a retry repairs: (1) store the new handoff in the target's inbox
//! under an id derived from the consumed handoff, (2) publish the accepted
//! event and ack the consumed delivery, together, and answer once both
//! are confirmed. A crash before the ack redelivers the input; the agent's
//! repeated handoff has the same id and JetStream recognises it, so
//! downstream sees it once. A failed event publish fails the call, and the
//! retry (the inbox keeps acked handoffs) publishes it under the same id.
//!
//! Before anything is stored, the guards run (see [`guard`]): the source
//! must declare the contract it emits, the payload must be the target's
//! contract, decode, carry no unknown field, have every required field and
//! keep within the budgets; and a consumed delivery must not already have
//! gone to another target unless every handoff from it declares fan-out.
//! A refusal is counted, published as a `contract_rejected` event, and
//! leaves nothing stored.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::SystemTime,
};

use handoff_proto::pb;
use prost::Message as _;

use crate::{
    broker::{now, status_name, Broker, RunEnd},
    contracts::{self, validate},
    domain,
    error::BrokerError,
    store,
};

/// Accepts one handoff.
pub async fn handoff(
    broker: &Broker,
    req: pb::HandoffRequest,
) -> Result<pb::HandoffResponse, BrokerError> {
    domain::validate_handoff(&req, broker.config().max_inline_payload)?;
    let consumed = if req.consumes.is_empty() {
        None
    } else {
        Some(domain::decode_token(&req.consumes)?)
    };
    let id = domain::handoff_id(&req, consumed.as_ref().map(|t| t.handoff_id.as_str()));
    let checked = match guard(broker, &req).await {
        Ok(c) => c,
        Err(Guarded::Refused(r)) => return Err(refuse(broker, &req, r).await),
        Err(Guarded::Failed(e)) => return Err(e),
    };
    // The run, the consumed handoff, the claim on the consumed delivery and
    // a named barrier are independent reads: one round trip for all.
    let mine = pb::ConsumeClaim {
        target_agent: req.target_agent.clone(),
        fan_out: req.fan_out,
        handoff_id: id.clone(),
    };
    let (run, parent, claim, barrier) = tokio::join!(
        broker.run(&req.run_id),
        async {
            match &consumed {
                Some(token) => consumed_parent(broker, &req.run_id, token).await.map(Some),
                None => Ok(None),
            }
        },
        async {
            match &consumed {
                Some(token) => broker
                    .store()
                    .claim_consumed(&token.handoff_id, &mine)
                    .await
                    .map(Some),
                None => Ok(None),
            }
        },
        async {
            if req.to_barrier && !req.barrier_id.is_empty() {
                broker
                    .store()
                    .barrier(&req.run_id, &req.barrier_id)
                    .await
                    .map(Some)
            } else {
                Ok(None)
            }
        },
    );
    let made = match (&claim, &consumed) {
        (Ok(Some(store::Claim::Made(revision))), Some(token)) => {
            Some((token.handoff_id.clone(), *revision))
        }
        _ => None,
    };
    let stored = AtomicBool::new(false);
    let result = async {
        let (run, _) = run?;
        let parent = parent?;
        if let (Some(store::Claim::Held(first)), Some(token)) = (claim?, &consumed) {
            check_claim(broker, &req, token, &first, &mine, &checked).await?;
        }
        let consumed = consumed.as_ref();
        let read = Read {
            run,
            parent,
            barrier: barrier?,
        };
        accept(broker, &req, consumed, id, checked, read, &stored).await
    }
    .await;
    if result.is_err() && !stored.load(Ordering::Relaxed) {
        // The handoff was not stored: withdraw the claim this request made.
        if let Some((key, revision)) = made {
            broker.store().release_claim(&key, revision).await;
        }
    }
    result
}

/// What a handoff read before it is accepted.
struct Read {
    run: pb::Run,
    /// The handoff whose delivery it consumes.
    parent: Option<pb::HandoffEnvelope>,
    /// The barrier the request names, when it goes to one (`None`: not
    /// read; `Some(None)`: not opened yet).
    barrier: Option<Option<(pb::Barrier, u64)>>,
}

/// Stores a handoff that passed the guards, in a run that exists; sets
/// `stored` once it is in the target's inbox.
async fn accept(
    broker: &Broker,
    req: &pb::HandoffRequest,
    consumed: Option<&pb::DeliveryToken>,
    id: String,
    checked: Checked,
    read: Read,
    stored: &AtomicBool,
) -> Result<pb::HandoffResponse, BrokerError> {
    let Read {
        run,
        parent,
        barrier,
    } = read;
    let status = pb::RunStatus::try_from(run.status).unwrap_or(pb::RunStatus::Unspecified);
    if status.is_terminal() {
        if req.r#final && run.result_handoff_id == id {
            // A retry of the final handoff that completed this run: make
            // sure the owner was told (deduplicated), then answer duplicate.
            broker.announce_end(&run).await?;
            if let Some(token) = consumed {
                ack_consumed(broker, &run, &req.consumes, token).await;
            }
            return Ok(pb::HandoffResponse {
                handoff_id: id,
                sequence: 0,
                duplicate: true,
                depth: 0,
            });
        }
        return Err(BrokerError::RunClosed {
            run: run.id.clone(),
            status: status_name(run.status),
        });
    }
    let depth = domain::depth(parent.as_ref().map(|p| p.depth), run.max_depth, req.r#final)?;
    // A branch's chain carries its barrier and key from hop to hop.
    let (barrier_id, branch_key) = match (&parent, req.barrier_id.is_empty()) {
        (_, false) => (req.barrier_id.clone(), req.branch_key.clone()),
        (Some(p), true) => (p.barrier_id.clone(), p.branch_key.clone()),
        (None, true) => (String::new(), String::new()),
    };
    if req.to_barrier && (barrier_id.is_empty() || branch_key.is_empty()) {
        return Err(BrokerError::Malformed(
            "to_barrier: the consumed delivery belongs to no barrier branch; name barrier_id and branch_key".to_string(),
        ));
    }
    let branch_status = match pb::BranchStatus::try_from(req.branch_status) {
        Ok(pb::BranchStatus::Failed) => pb::BranchStatus::Failed,
        Ok(pb::BranchStatus::Skipped) => pb::BranchStatus::Skipped,
        _ => pb::BranchStatus::Arrived,
    };
    // A branch result reaching an open barrier is checked against the
    // contract of the barrier's target (a failed or skipped report is not).
    let barrier = match barrier {
        Some(read) if req.to_barrier && barrier_id == req.barrier_id => read,
        _ if req.to_barrier => broker.store().barrier(&run.id, &barrier_id).await?,
        _ => None,
    };
    let mut checked = checked;
    if let (Some((b, _)), pb::BranchStatus::Arrived) = (&barrier, branch_status) {
        let target = b.spec.as_ref().map(|s| s.target_agent.as_str());
        if let (Some(target), Some(payload)) = (target, &req.payload) {
            if b.state == pb::BarrierState::Open as i32 {
                checked = match check_target(broker, target, req, payload).await {
                    Ok(c) => c,
                    Err(Guarded::Refused(r)) => return Err(refuse(broker, req, r).await),
                    Err(Guarded::Failed(e)) => return Err(e),
                };
            }
        }
    }
    let mut parent_ids = req.parent_ids.clone();
    if let Some(p) = &parent {
        if !parent_ids.contains(&p.id) {
            parent_ids.insert(0, p.id.clone());
        }
    }
    let envelope = pb::HandoffEnvelope {
        id: id.clone(),
        run_id: run.id.clone(),
        source_agent: req.source_agent.clone(),
        target_agent: req.target_agent.clone(),
        payload: req.payload.clone(),
        confidence: req.confidence.unwrap_or(1.0),
        warnings: req.warnings.clone(),
        tool_results: req.tool_results.clone(),
        parent_ids,
        depth,
        trace_context: req.trace_context.clone(),
        idempotency_key: req.idempotency_key.clone(),
        r#final: req.r#final,
        created_at: Some(now()),
        fallback_from: String::new(),
        contract_type: checked.contract_type.clone(),
        contract_version: checked.version,
        token_count: checked.tokens,
        barrier_id: barrier_id.clone(),
        branch_key: branch_key.clone(),
    };
    let max_payload = broker.store().client.server_info().max_payload;
    let size = envelope.encoded_len();
    if max_payload > 0 && size > max_payload {
        return Err(BrokerError::EnvelopeTooLarge { size, max_payload });
    }
    let (sequence, duplicate) = if req.r#final {
        (0, false)
    } else if req.to_barrier {
        let result = pb::BranchResult {
            key: branch_key.clone(),
            status: branch_status as i32,
            payload: envelope.payload.clone(),
            handoff_id: id.clone(),
            source_agent: req.source_agent.clone(),
            confidence: envelope.confidence,
            warnings: envelope.warnings.clone(),
            depth,
            arrived_at: envelope.created_at,
            sequence: 0,
        };
        crate::rpc::barriers::arrive(broker, &run, &barrier_id, result, barrier, stored).await?
    } else {
        let ack = broker
            .store()
            .publish(
                store::inbox_subject(&req.target_agent),
                &id,
                envelope.encode_to_vec().into(),
            )
            .await?;
        stored.store(true, Ordering::Relaxed);
        (ack.sequence, ack.duplicate)
    };
    let accepted = pb::Event {
        kind: pb::EventKind::HandoffAccepted as i32,
        run_id: run.id.clone(),
        owner: run.owner.clone(),
        agent: req.target_agent.clone(),
        source_agent: req.source_agent.clone(),
        handoff_id: id.clone(),
        depth,
        barrier_id,
        branch_key,
        ..Default::default()
    };
    let settles = consumed.filter(|_| !req.fan_out && !req.r#final);
    if req.r#final {
        broker.emit(accepted, &format!("accepted-{id}")).await?;
        let ended = broker
            .end_run(
                &run.id,
                RunEnd::Completed {
                    handoff_id: id.clone(),
                    result: req.payload.clone(),
                },
            )
            .await?;
        if ended.result_handoff_id != id {
            return Err(BrokerError::RunClosed {
                run: run.id.clone(),
                status: status_name(ended.status),
            });
        }
        if let Some(token) = consumed.filter(|_| !req.fan_out) {
            settle_after_handoff(broker, &run, &req.consumes, token).await;
        }
    } else {
        // The handoff is stored: the event and the ack go out together,
        // and the call answers once both are confirmed.
        let msg_id = format!("accepted-{id}");
        let (published, ()) = tokio::join!(broker.emit(accepted, &msg_id), async {
            if let Some(token) = settles {
                settle_after_handoff(broker, &run, &req.consumes, token).await;
            }
        });
        published?;
    }
    if !duplicate {
        broker.metrics().accepted();
    }
    tracing::debug!(run_id = %run.id, handoff_id = %id, target = %req.target_agent, depth, duplicate, tokens = checked.tokens, "handoff accepted");
    Ok(pb::HandoffResponse {
        handoff_id: id,
        sequence,
        duplicate,
        depth,
    })
}

/// Payloads at least this large are checked on the blocking pool.
const BLOCKING_CHECK_BYTES: usize = 16 * 1024;

/// What the guards measured, for the envelope.
#[derive(Debug, Default)]
struct Checked {
    /// The contract checked against (empty: the target takes any payload).
    contract_type: String,
    version: u32,
    tokens: u64,
}

/// A handoff refused by a guard.
struct Refusal {
    rule: &'static str,
    code: tonic::Code,
    message: String,
    contract_type: String,
    version: u32,
}

impl Refusal {
    fn new(rule: &'static str, code: tonic::Code, message: String) -> Refusal {
        Refusal {
            rule,
            code,
            message,
            contract_type: String::new(),
            version: 0,
        }
    }
}

/// Why the guards stopped a handoff: a refusal (counted and published) or
/// a failure to check (NATS down, unknown target).
enum Guarded {
    Refused(Refusal),
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
async fn guard(broker: &Broker, req: &pb::HandoffRequest) -> Result<Checked, Guarded> {
    let payload = req.payload.as_ref().ok_or_else(|| {
        Guarded::Failed(BrokerError::Malformed("payload is required".to_string()))
    })?;
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
                ..Refusal::new(
                    "undeclared_emit",
                    tonic::Code::PermissionDenied,
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
async fn check_target(
    broker: &Broker,
    target: &str,
    req: &pb::HandoffRequest,
    payload: &prost_types::Any,
) -> Result<Checked, Guarded> {
    let payload_type = contracts::type_of_url(&payload.type_url);
    let target = broker.agent(target).await?;
    let Some(accepts) = &target.accepts else {
        return Ok(Checked::default());
    };
    let refusal = |rule, code, message| {
        Guarded::Refused(Refusal {
            contract_type: accepts.message_type.clone(),
            ..Refusal::new(rule, code, message)
        })
    };
    if payload_type != accepts.message_type {
        return Err(refusal(
            "contract_mismatch",
            tonic::Code::FailedPrecondition,
            format!(
                "agent {:?} accepts {}; the payload is {payload_type}",
                target.name, accepts.message_type
            ),
        ));
    }
    let versions = broker.contract_versions(&accepts.message_type).await?;
    let Some(contract) = contracts::pick(&versions, accepts.min_version, accepts.max_version)
    else {
        return Err(refusal(
            "contract_mismatch",
            tonic::Code::FailedPrecondition,
            format!(
                "no registered version of {} is in agent {:?}'s range {}",
                accepts.message_type,
                target.name,
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
            ..Refusal::new(
                v.rule(),
                v.code(),
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
/// confusion).
async fn check_claim(
    broker: &Broker,
    req: &pb::HandoffRequest,
    token: &pb::DeliveryToken,
    first: &pb::ConsumeClaim,
    mine: &pb::ConsumeClaim,
    checked: &Checked,
) -> Result<(), BrokerError> {
    if first.target_agent == mine.target_agent || (first.fan_out && mine.fan_out) {
        return Ok(());
    }
    let name = |t: &str| {
        if t.is_empty() {
            "the run's final result".to_string()
        } else {
            format!("agent {t:?}")
        }
    };
    let message = format!(
        "delivery of handoff {} was already consumed by a handoff to {} (handoff {}); one delivery goes to one target unless every handoff from it declares fan_out",
        token.handoff_id,
        name(&first.target_agent),
        first.handoff_id
    );
    Err(refuse(
        broker,
        req,
        Refusal {
            contract_type: checked.contract_type.clone(),
            version: checked.version,
            ..Refusal::new("role_confusion", tonic::Code::AlreadyExists, message)
        },
    )
    .await)
}

/// Counts a refusal, publishes its `contract_rejected` event (when the run
/// exists), and turns it into the error the client sees.
async fn refuse(broker: &Broker, req: &pb::HandoffRequest, r: Refusal) -> BrokerError {
    broker.metrics().rejected(r.rule);
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
        rule: r.rule,
        code: r.code,
        message: r.message,
    }
}

/// Acks the consumed delivery, unless a fault injection keeps it unacked.
async fn settle_after_handoff(
    broker: &Broker,
    run: &pb::Run,
    delivery_id: &str,
    token: &pb::DeliveryToken,
) {
    if broker.config().faults.skip_consume_ack {
        tracing::warn!("fault injected: consumed delivery left unacked");
    } else {
        ack_consumed(broker, run, delivery_id, token).await;
    }
}

/// Loads the handoff a delivery token names, checking it belongs to `run_id`.
async fn consumed_parent(
    broker: &Broker,
    run_id: &str,
    token: &pb::DeliveryToken,
) -> Result<pb::HandoffEnvelope, BrokerError> {
    let msg = broker
        .store()
        .inbox_message(token.stream_sequence)
        .await?
        .ok_or_else(|| {
            BrokerError::DeliveryGone(format!(
                "the consumed delivery's handoff {} is no longer stored (retention passed)",
                token.handoff_id
            ))
        })?;
    let parent = pb::HandoffEnvelope::decode(msg.payload)
        .map_err(|e| BrokerError::Internal(format!("stored handoff does not decode: {e}")))?;
    if parent.id != token.handoff_id || msg.subject.as_str() != store::inbox_subject(&token.agent) {
        return Err(BrokerError::BadDeliveryId(
            "it does not match a stored handoff".to_string(),
        ));
    }
    if parent.run_id != run_id {
        return Err(BrokerError::Malformed(format!(
            "the consumed delivery belongs to run {:?}, not {run_id:?}",
            parent.run_id
        )));
    }
    Ok(parent)
}

/// Acks a delivery that a fan-out consumed, once all its handoffs are
/// stored.
pub async fn settle_consumed(
    broker: &Broker,
    run_id: &str,
    delivery_id: &str,
) -> Result<(), BrokerError> {
    let token = domain::decode_token(delivery_id)?;
    let (run, _) = broker.run(run_id).await?;
    ack_consumed(broker, &run, delivery_id, &token).await;
    Ok(())
}

/// Acks the consumed delivery after the new handoff is stored. A failure
/// is logged, not returned: the new handoff is durable, and a delivery
/// that stays unacked is redelivered and its repeated handoff recognised.
async fn ack_consumed(
    broker: &Broker,
    run: &pb::Run,
    delivery_id: &str,
    token: &pb::DeliveryToken,
) {
    match broker
        .store()
        .settle(&token.ack_subject, async_nats::jetstream::AckKind::Ack)
        .await
    {
        Ok(()) => {
            broker.release_delivery(delivery_id);
            let event = pb::Event {
                kind: pb::EventKind::Acked as i32,
                run_id: run.id.clone(),
                owner: run.owner.clone(),
                agent: token.agent.clone(),
                handoff_id: token.handoff_id.clone(),
                ..Default::default()
            };
            broker
                .emit_unconfirmed(event, format!("acked-{}", token.handoff_id))
                .await;
        }
        Err(e) => {
            tracing::warn!(handoff_id = %token.handoff_id, error = %e, "consumed delivery not acked; it will be redelivered")
        }
    }
}
