//! `Handoff`: validate, then durably accept one handoff.
//!
//! Order of a complete-and-handoff, chosen so that a crash anywhere leaves
//! a state a retry repairs: (1) store the new handoff in the target's inbox
//! under an id derived from the consumed handoff, (2) publish the accepted
//! event, (3) ack the consumed delivery. A crash before (3) redelivers the
//! input; the agent's repeated handoff has the same id and JetStream
//! recognises it, so downstream sees it once.

use handoff_proto::pb;
use prost::Message as _;

use crate::{
    broker::{now, status_name, Broker, RunEnd},
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
    let (run, _) = broker.run(&req.run_id).await?;
    let status = pb::RunStatus::try_from(run.status).unwrap_or(pb::RunStatus::Unspecified);
    if status.is_terminal() {
        if req.r#final && run.result_handoff_id == id {
            // A retry of the final handoff that completed this run: make
            // sure the owner was told (deduplicated), then answer duplicate.
            broker.announce_end(&run).await?;
            if let Some(token) = &consumed {
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
    let parent = match &consumed {
        None => None,
        Some(token) => Some(consumed_parent(broker, &req.run_id, token).await?),
    };
    let depth = domain::depth(parent.as_ref().map(|p| p.depth), run.max_depth, req.r#final)?;
    if !req.r#final {
        broker.agent(&req.target_agent).await?;
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
    };
    let max_payload = broker.store().client.server_info().max_payload;
    let size = envelope.encoded_len();
    if max_payload > 0 && size > max_payload {
        return Err(BrokerError::EnvelopeTooLarge { size, max_payload });
    }
    let (sequence, duplicate) = if req.r#final {
        (0, false)
    } else {
        let ack = broker
            .store()
            .publish(
                store::inbox_subject(&req.target_agent),
                &id,
                envelope.encode_to_vec().into(),
            )
            .await?;
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
        ..Default::default()
    };
    broker.emit(accepted, &format!("accepted-{id}")).await?;
    if req.r#final {
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
    }
    if let Some(token) = &consumed {
        if broker.config().faults.skip_consume_ack {
            tracing::warn!("fault injected: consumed delivery left unacked");
        } else {
            ack_consumed(broker, &run, &req.consumes, token).await;
        }
    }
    tracing::debug!(run_id = %run.id, handoff_id = %id, target = %req.target_agent, depth, duplicate, "handoff accepted");
    Ok(pb::HandoffResponse {
        handoff_id: id,
        sequence,
        duplicate,
        depth,
    })
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
            if let Err(e) = broker
                .emit(event, &format!("acked-{}", token.handoff_id))
                .await
            {
                tracing::warn!(error = %e, "acked event not published");
            }
        }
        Err(e) => {
            tracing::warn!(handoff_id = %token.handoff_id, error = %e, "consumed delivery not acked; it will be redelivered")
        }
    }
}
