//! Handing a dead letter again: `RedriveDeadLetter`.
//!
//! The letter is claimed once (a claim record named after its sequence,
//! kept `retention`, like the claim on a consumed delivery): a second
//! redrive finds the claim with its receipt and is ALREADY_SETTLED; a
//! redrive interrupted before it stored anything is taken over by the
//! next one. The handoff is stored again under a write id derived from
//! the letter, so a redo stores it once. A run that failed only because
//! of the letter goes back to RUNNING before the handoff is stored, so
//! the handoff never finds its run ended.

use handoff_proto::pb;

use crate::{
    app::{
        access,
        auth::Caller,
        guard, now,
        runs::{self, status_of},
        Broker,
    },
    error::{BrokerError, Reason},
    rules::{contracts::type_of_url, handoff as rules, names},
    store::{Claim, ClaimKey},
};

/// ALREADY_SETTLED for a letter redriven before, to `target`.
fn redriven_already(sequence: u64, target: &str) -> BrokerError {
    BrokerError::Refused {
        reason: Reason::AlreadySettled,
        message: format!("dead letter {sequence} was already redriven to {target}"),
        metadata: vec![
            ("sequence", sequence.to_string()),
            ("target_agent", target.to_string()),
        ],
    }
}

/// The key of a letter's redrive claim (no handoff id looks like it).
fn claim_key(sequence: u64) -> ClaimKey {
    ClaimKey::Consumed(format!("redrive-{sequence}"))
}

/// Redrives the dead letter `req.sequence` for a caller with `own` on its
/// run's owner (anyone else is answered as if the run did not exist).
pub async fn redrive(
    broker: &Broker,
    caller: &Caller,
    req: pb::RedriveDeadLetterRequest,
) -> Result<pb::RedriveDeadLetterResponse, BrokerError> {
    names::validate_optional("to_agent", &req.to_agent)?;
    if req.sequence == 0 {
        return Err(BrokerError::malformed("sequence", "sequence is required"));
    }
    let letter = broker
        .store()
        .dead_letter(req.sequence)
        .await?
        .ok_or(BrokerError::DeadLetterNotFound(req.sequence))?;
    let mut envelope = letter
        .handoff
        .clone()
        .ok_or_else(|| BrokerError::Internal("a dead letter without its handoff".to_string()))?;
    let (run, _) = broker.run(&envelope.run_id).await?;
    if !caller.may(crate::rules::grants::Action::Own, &run.owner) {
        // Without `read`, a letter of a run the caller has no right to
        // does not exist either (its run's id stays unsaid).
        return Err(match access::hidden(broker, caller, &run).await {
            BrokerError::RunNotFound(_) => BrokerError::DeadLetterNotFound(req.sequence),
            other => other,
        });
    }
    let target = if req.to_agent.is_empty() {
        letter.agent.clone()
    } else {
        req.to_agent.clone()
    };
    check_target(broker, &target, &envelope).await?;

    let claim = pb::ConsumeClaim {
        target_agent: target.clone(),
        handoff_id: envelope.id.clone(),
        ..Default::default()
    };
    let (revision, target) = match broker
        .store()
        .claim_consumed(&claim_key(req.sequence), &claim)
        .await?
    {
        Claim::Made(revision) => (revision, target),
        Claim::Held(held, _) if !held.stored.is_empty() => {
            return Err(redriven_already(req.sequence, &held.target_agent))
        }
        // An earlier redrive recorded no receipt: it stopped before it
        // stored the handoff, or after (its event says so), or it is still
        // at it (its write id makes the store recognise this one's).
        Claim::Held(held, revision) => {
            let timeline = broker.store().run_events(&run.id).await?;
            let stored = timeline.iter().any(|e| {
                e.kind == pb::EventKind::HandoffRedriven as i32
                    && e.dead_letter_sequence == req.sequence
            });
            if stored {
                return Err(redriven_already(req.sequence, &held.target_agent));
            }
            if held.target_agent != target {
                check_target(broker, &held.target_agent, &envelope).await?;
            }
            (revision, held.target_agent)
        }
    };
    envelope.target_agent = target;

    let (run, resumed) = resume(broker, &run.id, &envelope.id, &letter).await?;
    if status_of(&run).is_terminal() {
        return Err(BrokerError::RunClosed {
            run: run.id.clone(),
            status: crate::app::status_name(run.status),
        });
    }
    envelope.fallback_from.clear();
    let stored = broker
        .store()
        .put_handoff_again(&envelope, &format!("redrive-{}", req.sequence))
        .await?;
    let receipt = pb::HandoffResponse {
        handoff_id: envelope.id.clone(),
        sequence: stored.sequence,
        duplicate: stored.duplicate,
        depth: envelope.depth,
        state_revision: envelope.state_revision,
        ..Default::default()
    };
    let event = pb::Event {
        kind: pb::EventKind::HandoffRedriven as i32,
        run_id: run.id.clone(),
        owner: run.owner.clone(),
        agent: envelope.target_agent.clone(),
        source_agent: envelope.source_agent.clone(),
        handoff_id: envelope.id.clone(),
        depth: envelope.depth,
        inbox_sequence: stored.sequence,
        dead_letter_sequence: req.sequence,
        reason: format!(
            "dead letter {} redriven by {}",
            req.sequence, caller.principal
        ),
        ..Default::default()
    };
    broker
        .emit(event, &format!("redriven-{}", req.sequence))
        .await?;
    let recorded = pb::ConsumeClaim {
        target_agent: envelope.target_agent.clone(),
        handoff_id: envelope.id.clone(),
        stored: vec![receipt.clone()],
        stored_at: Some(now()),
        ..Default::default()
    };
    if broker
        .store()
        .update_claim(&claim_key(req.sequence), &recorded, revision)
        .await?
        .is_none()
    {
        tracing::warn!(
            sequence = req.sequence,
            "the redrive's receipt was not recorded: the claim changed"
        );
    }
    tracing::info!(
        run_id = %run.id,
        handoff_id = %envelope.id,
        to = %envelope.target_agent,
        resumed,
        "dead letter redriven"
    );
    Ok(pb::RedriveDeadLetterResponse {
        handoff: Some(receipt),
        run: Some(run),
        resumed,
    })
}

/// Checks that `target` is registered and takes the letter's payload:
/// its contract's guards for an inline payload, its type for one by
/// reference.
async fn check_target(
    broker: &Broker,
    target: &str,
    envelope: &pb::HandoffEnvelope,
) -> Result<(), BrokerError> {
    let spec = broker.agent(target).await?;
    match (&envelope.payload, &envelope.payload_ref) {
        (Some(payload), _) => {
            let req = pb::HandoffRequest {
                run_id: envelope.run_id.clone(),
                source_agent: envelope.source_agent.clone(),
                target_agent: target.to_string(),
                payload: Some(payload.clone()),
                confidence: Some(envelope.confidence),
                tool_results: envelope.tool_results.clone(),
                ..Default::default()
            };
            let outcome = guard::check_target(broker, target, &req, payload).await;
            guard::enforce(broker, &req, outcome).await.map(|_| ())
        }
        (None, Some(reference)) => match &spec.accepts {
            Some(accepts) if accepts.message_type != type_of_url(&reference.type_url) => {
                Err(BrokerError::Refused {
                    reason: Reason::ContractMismatch,
                    message: format!(
                        "agent {target:?} accepts {}, not {}",
                        accepts.message_type,
                        type_of_url(&reference.type_url)
                    ),
                    metadata: vec![("agent", target.to_string())],
                })
            }
            _ => Ok(()),
        },
        (None, None) => Ok(()),
    }
}

/// Puts a run the letter failed back to RUNNING (once: a run already
/// running is left alone): only when its failure is that letter's. With
/// the run as it is now, and whether this call resumed it.
async fn resume(
    broker: &Broker,
    run_id: &str,
    handoff_id: &str,
    letter: &pb::DeadLetter,
) -> Result<(pb::Run, bool), BrokerError> {
    let failure = rules::dead_letter_failure(handoff_id, &letter.reason);
    loop {
        let (mut run, revision) = broker.run(run_id).await?;
        if status_of(&run) != pb::RunStatus::Failed || run.failure != failure {
            return Ok((run, false));
        }
        run.failure.clear();
        run.status = crate::app::input::running_status(&run);
        run.ended_at = None;
        run.stats = None;
        run.resumed += 1;
        if !broker.store().update_run(&run, revision).await? {
            continue;
        }
        broker.forget_run(&run.id);
        runs::schedule_deadline(broker, &run).await?;
        crate::app::input::reschedule(broker, &run).await?;
        let event = pb::Event {
            kind: pb::EventKind::RunResumed as i32,
            run_id: run.id.clone(),
            owner: run.owner.clone(),
            handoff_id: handoff_id.to_string(),
            run_status: run.status,
            pipeline: run.pipeline.clone(),
            ..Default::default()
        };
        broker
            .emit(event, &format!("resumed-{}-{}", run.id, run.resumed))
            .await?;
        tracing::info!(run_id = %run.id, handoff_id, "run resumed");
        return Ok((run, true));
    }
}
