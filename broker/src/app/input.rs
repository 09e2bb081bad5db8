//! Asking a run's owner and waiting for the answer: `AwaitInput`,
//! `ProvideInput`, and the timer that ends an unanswered wait.
//!
//! A waiting request lives in its run's record (`Run.waiting`), written
//! by compare-and-set together with the run's status, so the run is
//! WAITING_INPUT exactly while a request waits undecided. A request is
//! decided (answered, with the answer kept, or timed out) by one
//! compare-and-set, whoever comes first; what follows (the answer's
//! handoff; the fallback or the run's failure) is then done, and a last
//! compare-and-set takes the request out. A broker killed at any point
//! loses nothing: the record and the request's durable timer are stored
//! before the asking delivery is acked; a decided request whose follow-up
//! was cut short is followed up again by the next call or timer that
//! meets it (a check timer is scheduled with each answer), and every
//! follow-up step is recognised when done again (the request's id, and
//! the ids derived from it).

use std::time::{Duration, SystemTime};

use handoff_proto::pb;

use crate::{
    app::{
        access, auth, deliveries, guard, handoff, now,
        runs::{self, status_of, RunEnd},
        state, Broker,
    },
    error::{BrokerError, Class, Reason},
    rules::{grants::Action, handoff as rules, names},
    store::TimerKind,
};

/// The longest prompt.
const MAX_PROMPT: usize = 4096;

/// How many settled request ids a run remembers.
const SETTLED_KEPT: usize = 64;

/// The longest wait.
const MAX_WAIT: Duration = Duration::from_secs(366 * 24 * 3600);

/// The id of the input request a handoff's delivery makes.
fn request_id(handoff_id: &str) -> String {
    rules::derived_id(&format!("input\u{0}{handoff_id}"))
}

/// The status a run that has not ended has: WAITING_INPUT while a
/// request waits, else RUNNING.
pub fn running_status(run: &pb::Run) -> i32 {
    let undecided = run
        .waiting
        .iter()
        .any(|w| w.outcome == pb::InputOutcome::Unspecified as i32);
    if !undecided {
        pb::RunStatus::Running as i32
    } else {
        pb::RunStatus::WaitingInput as i32
    }
}

/// Parks the delivery `req.delivery_id` on a question to its run's owner,
/// for the instance holding it (`receive_as` its agent, lease alive).
pub async fn await_input(
    broker: &Broker,
    caller: &auth::Caller,
    req: pb::AwaitInputRequest,
) -> Result<pb::AwaitInputResponse, BrokerError> {
    if req.prompt.len() > MAX_PROMPT {
        return Err(BrokerError::malformed(
            "prompt",
            format!("prompt is over {MAX_PROMPT} bytes"),
        ));
    }
    names::validate_optional("fallback_agent", &req.fallback_agent)?;
    let timeout = req
        .timeout
        .and_then(|t| Duration::try_from(t).ok())
        .filter(|t| !t.is_zero() && *t <= MAX_WAIT)
        .ok_or_else(|| {
            BrokerError::malformed(
                "timeout",
                "timeout is required, positive and at most a year",
            )
        })?;
    if let Some(answer) = &req.answer {
        crate::rules::contracts::validate_type_name("answer.message_type", &answer.message_type)?;
    }
    let token = access::decode(broker, &req.delivery_id).await?;
    auth::require(broker, caller, Action::ReceiveAs, &token.agent).await?;
    if !req.fallback_agent.is_empty() {
        broker.agent(&req.fallback_agent).await?;
    }
    let id = request_id(&token.handoff_id);
    let (record, stored) = tokio::join!(
        broker.store().lease(&token.agent, token.stream_sequence),
        broker.store().handoff_at(token.stream_sequence)
    );
    let envelope = stored?
        .map(|m| m.envelope)
        .filter(|e| e.id == token.handoff_id)
        .ok_or_else(|| BrokerError::DeliveryGone(token.handoff_id.clone()))?;
    // A repeat of a request already recorded (the ack after it was lost)
    // goes on; anything else needs the delivery's live lease.
    let (run, _) = broker.run(&envelope.run_id).await?;
    if !run.waiting.iter().any(|w| w.id == id) {
        access::lease_lives(broker, &token, record?).await?;
    }
    let due = SystemTime::now() + timeout;
    let request = pb::InputRequest {
        id: id.clone(),
        agent: token.agent.clone(),
        handoff_id: envelope.id.clone(),
        prompt: req.prompt.clone(),
        answer: req.answer.clone(),
        asked_at: Some(now()),
        deadline: Some(due.into()),
        fallback_agent: req.fallback_agent.clone(),
        depth: envelope.depth,
        source_agent: envelope.source_agent.clone(),
        payload: envelope.payload.clone(),
        payload_ref: envelope.payload_ref.clone(),
        outcome: pb::InputOutcome::Unspecified as i32,
        answer_payload: None,
    };
    let (run, request) = loop {
        let (mut run, revision) = broker.run(&envelope.run_id).await?;
        if status_of(&run).is_terminal() {
            return Err(BrokerError::RunClosed {
                run: run.id.clone(),
                status: crate::app::status_name(run.status),
            });
        }
        if let Some(known) = run.waiting.iter().find(|w| w.id == id) {
            let known = known.clone();
            break (run, known);
        }
        if run.settled_inputs.contains(&id) {
            // Answered and followed up already: the ack of the asking
            // delivery was lost.
            deliveries::ack_consumed(broker, &run, &token).await;
            return Err(already(&id));
        }
        run.waiting.push(request.clone());
        run.status = running_status(&run);
        if broker.store().update_run(&run, revision).await? {
            broker.forget_run(&run.id);
            break (run, request.clone());
        }
    };
    let timer = pb::Timer {
        run_id: run.id.clone(),
        due: request.deadline,
        input_request_id: id.clone(),
        ..Default::default()
    };
    broker
        .store()
        .schedule(&timer, TimerKind::InputTimeout)
        .await?;
    let event = pb::Event {
        kind: pb::EventKind::InputRequested as i32,
        run_id: run.id.clone(),
        owner: run.owner.clone(),
        agent: request.agent.clone(),
        handoff_id: request.handoff_id.clone(),
        input_request_id: id.clone(),
        reason: request.prompt.clone(),
        run_status: run.status,
        depth: request.depth,
        ..Default::default()
    };
    broker.emit(event, &format!("input-{id}")).await?;
    deliveries::ack_consumed(broker, &run, &token).await;
    tracing::info!(run_id = %run.id, request_id = %id, agent = %token.agent, "waiting for input");
    Ok(pb::AwaitInputResponse {
        request: Some(request),
    })
}

/// ALREADY_SETTLED for a request answered or timed out.
fn already(id: &str) -> BrokerError {
    BrokerError::Refused {
        reason: Reason::AlreadySettled,
        message: format!("input request {id} was already answered or timed out"),
        metadata: vec![("request_id", id.to_string())],
    }
}

/// What deciding a request found.
enum Decided {
    /// This call decided it, as asked.
    Now(pb::Run, pb::InputRequest),
    /// It was decided before (its follow-up may still be due).
    Before(pb::Run, pb::InputRequest),
    /// It was decided and followed up before.
    Finished,
}

/// Decides request `id` of run `run_id` as `outcome` (with `answer` for
/// an answer), by compare-and-set. A run that ended is RUN_CLOSED; a
/// request the run never had is INPUT_NOT_FOUND.
async fn decide(
    broker: &Broker,
    run_id: &str,
    id: &str,
    outcome: pb::InputOutcome,
    answer: Option<&prost_types::Any>,
) -> Result<Decided, BrokerError> {
    loop {
        let (mut run, revision) = broker.run(run_id).await?;
        if status_of(&run).is_terminal() {
            return Err(closed(&run));
        }
        let Some(request) = run.waiting.iter_mut().find(|w| w.id == id) else {
            return if run.settled_inputs.iter().any(|s| s == id) {
                Ok(Decided::Finished)
            } else {
                Err(BrokerError::InputNotFound(id.to_string()))
            };
        };
        if request.outcome != pb::InputOutcome::Unspecified as i32 {
            let request = request.clone();
            return Ok(Decided::Before(run, request));
        }
        request.outcome = outcome as i32;
        request.answer_payload = answer.cloned();
        let request = request.clone();
        run.status = running_status(&run);
        if broker.store().update_run(&run, revision).await? {
            broker.forget_run(&run.id);
            return Ok(Decided::Now(run, request));
        }
    }
}

/// Takes decided request `id` out of the run's waiting ones, once its
/// follow-up is done (a request already out is fine).
async fn finish(broker: &Broker, run_id: &str, id: &str) -> Result<pb::Run, BrokerError> {
    loop {
        let (mut run, revision) = broker.run(run_id).await?;
        let Some(at) = run.waiting.iter().position(|w| w.id == id) else {
            return Ok(run);
        };
        run.waiting.remove(at);
        run.settled_inputs.push(id.to_string());
        let over = run.settled_inputs.len().saturating_sub(SETTLED_KEPT);
        run.settled_inputs.drain(..over);
        if !status_of(&run).is_terminal() {
            run.status = running_status(&run);
        }
        if broker.store().update_run(&run, revision).await? {
            broker.forget_run(&run.id);
            return Ok(run);
        }
    }
}

/// Does what follows a decided request (again, if it was cut short): the
/// answer's handoff to the agent that asked; or, timed out, the asking
/// handoff's payload to the fallback agent, else the run's failure. Then
/// the request leaves the run's waiting ones. With the answer's receipt.
async fn follow_up(
    broker: &Broker,
    run: &pb::Run,
    request: &pb::InputRequest,
    by: &str,
) -> Result<Option<pb::HandoffResponse>, BrokerError> {
    let id = request.id.as_str();
    let receipt = match pb::InputOutcome::try_from(request.outcome) {
        Ok(pb::InputOutcome::Answered) => {
            let answer = request.answer_payload.clone().ok_or_else(|| {
                BrokerError::Internal(format!(
                    "input request {id} was answered without its answer"
                ))
            })?;
            let receipt = deliver_answer(broker, run, request, answer).await?;
            let event = pb::Event {
                kind: pb::EventKind::InputProvided as i32,
                run_id: run.id.clone(),
                owner: run.owner.clone(),
                agent: request.agent.clone(),
                handoff_id: receipt.handoff_id.clone(),
                input_request_id: id.to_string(),
                run_status: run.status,
                reason: by.to_string(),
                ..Default::default()
            };
            broker.emit(event, &format!("input-provided-{id}")).await?;
            Some(receipt)
        }
        Ok(pb::InputOutcome::TimedOut) => {
            let event = pb::Event {
                kind: pb::EventKind::InputTimedOut as i32,
                run_id: run.id.clone(),
                owner: run.owner.clone(),
                agent: request.agent.clone(),
                handoff_id: request.handoff_id.clone(),
                input_request_id: id.to_string(),
                fallback_agent: request.fallback_agent.clone(),
                run_status: run.status,
                ..Default::default()
            };
            broker.emit(event, &format!("input-timeout-{id}")).await?;
            fall_back(broker, run, request).await?;
            None
        }
        _ => return Ok(None),
    };
    finish(broker, &run.id, id).await?;
    Ok(receipt)
}

/// A timed-out request's end: the asking handoff's payload to the
/// fallback agent (a handoff the owner makes, deduplicated by the
/// request), or, without one or when the fallback refuses it, the run's
/// failure.
async fn fall_back(
    broker: &Broker,
    run: &pb::Run,
    request: &pb::InputRequest,
) -> Result<(), BrokerError> {
    let id = request.id.as_str();
    let has_payload = request.payload.is_some() || request.payload_ref.is_some();
    let why = if request.fallback_agent.is_empty() {
        format!(
            "input request {id} of agent {} was not answered in time",
            request.agent
        )
    } else if !has_payload {
        format!("input request {id} timed out; its payload was not kept")
    } else {
        let fallback = pb::HandoffRequest {
            run_id: run.id.clone(),
            target_agent: request.fallback_agent.clone(),
            payload: request.payload.clone(),
            payload_ref: request.payload_ref.clone(),
            confidence: Some(1.0),
            parent_ids: vec![request.handoff_id.clone()],
            idempotency_key: format!("input-timeout-{id}"),
            ..Default::default()
        };
        match handoff::accept(broker, &auth::Caller::local(), fallback).await {
            Ok(_) => return Ok(()),
            // Refused for what it is (not for an outage): it will never
            // be taken, so the run fails with why.
            Err(e)
                if !matches!(
                    e.class(),
                    Class::Unavailable | Class::Internal | Class::Aborted
                ) =>
            {
                format!("input request {id} timed out; its fallback was refused: {e}")
            }
            Err(e) => return Err(e),
        }
    };
    match runs::end(broker, &run.id, RunEnd::Failed(why)).await {
        Ok(_) | Err(BrokerError::RunNotFound(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Answers input request `req.request_id` for a caller with `own` on the
/// run's owner (anyone else is answered as if the run did not exist): the
/// answer is checked against the request's contract, then handed to the
/// agent that asked, with the request's id on its envelope. A request
/// decided before is ALREADY_SETTLED (its follow-up done first, if it was
/// cut short).
pub async fn provide_input(
    broker: &Broker,
    caller: &auth::Caller,
    req: pb::ProvideInputRequest,
) -> Result<pb::ProvideInputResponse, BrokerError> {
    names::validate("run_id", &req.run_id)?;
    names::validate("request_id", &req.request_id)?;
    let answer = req
        .answer
        .clone()
        .ok_or_else(|| BrokerError::malformed("answer", "answer is required"))?;
    let (run, _) = broker.run(&req.run_id).await?;
    if !caller.may(Action::Own, &run.owner) {
        return Err(access::hidden(broker, caller, &run).await);
    }
    if status_of(&run).is_terminal() {
        return Err(closed(&run));
    }
    let Some(request) = run.waiting.iter().find(|w| w.id == req.request_id).cloned() else {
        return Err(if run.settled_inputs.contains(&req.request_id) {
            already(&req.request_id)
        } else {
            BrokerError::InputNotFound(req.request_id.clone())
        });
    };
    // The answer as the handoff that carries it: checked first, so a
    // refused answer leaves the request waiting.
    let carrier = pb::HandoffRequest {
        run_id: run.id.clone(),
        target_agent: request.agent.clone(),
        payload: Some(answer.clone()),
        confidence: Some(1.0),
        ..Default::default()
    };
    if let Some(contract) = &request.answer {
        let outcome =
            guard::check_contract(broker, &request.agent, contract, &carrier, &answer).await;
        guard::enforce(broker, &carrier, outcome).await?;
    }
    let max = broker.config().max_inline_payload;
    if prost::Message::encoded_len(&answer) > max {
        return Err(BrokerError::PayloadTooLarge {
            size: prost::Message::encoded_len(&answer),
            limit: max,
            setting: "max_inline_payload",
        });
    }
    let by = format!("answered by {}", caller.principal);
    // Should the follow-up of the decision be cut short, this check does
    // it again (scheduled first: it finds nothing to do otherwise).
    schedule_check(broker, &run.id, &request.id).await?;
    match decide(
        broker,
        &run.id,
        &request.id,
        pb::InputOutcome::Answered,
        Some(&answer),
    )
    .await?
    {
        Decided::Now(run, request) => {
            let receipt = follow_up(broker, &run, &request, &by).await?;
            tracing::info!(run_id = %run.id, request_id = %request.id, "input provided");
            let run = broker.run(&run.id).await?.0;
            Ok(pb::ProvideInputResponse {
                handoff: receipt,
                run: Some(run),
            })
        }
        Decided::Before(run, request) => {
            follow_up(broker, &run, &request, &by).await?;
            Err(already(&request.id))
        }
        Decided::Finished => Err(already(&request.id)),
    }
}

/// Schedules the check that a decided request is followed up.
async fn schedule_check(broker: &Broker, run_id: &str, id: &str) -> Result<(), BrokerError> {
    let due = SystemTime::now() + FOLLOW_UP_CHECK;
    let timer = pb::Timer {
        run_id: run_id.to_string(),
        due: Some(due.into()),
        input_request_id: id.to_string(),
        sequence: u64::MAX,
        ..Default::default()
    };
    broker
        .store()
        .schedule(&timer, TimerKind::InputTimeout)
        .await
}

/// When the check of a decided request's follow-up falls due.
const FOLLOW_UP_CHECK: Duration = Duration::from_secs(10);

fn closed(run: &pb::Run) -> BrokerError {
    BrokerError::RunClosed {
        run: run.id.clone(),
        status: crate::app::status_name(run.status),
    }
}

/// Stores the handoff carrying the answer to the agent that asked, under
/// an id derived from the request (stored once, whoever repeats it).
async fn deliver_answer(
    broker: &Broker,
    run: &pb::Run,
    request: &pb::InputRequest,
    answer: prost_types::Any,
) -> Result<pb::HandoffResponse, BrokerError> {
    // The asking agent goes on from the run's state as it is now.
    let state_revision = state::latest(broker, &run.id)
        .await?
        .map_or(0, |r| r.revision);
    let envelope = pb::HandoffEnvelope {
        id: rules::derived_id(&format!("answer\u{0}{}", request.id)),
        run_id: run.id.clone(),
        source_agent: String::new(),
        target_agent: request.agent.clone(),
        payload: Some(answer),
        confidence: 1.0,
        parent_ids: vec![request.handoff_id.clone()],
        depth: request.depth,
        created_at: Some(broker.stamp(0)),
        input_request_id: request.id.clone(),
        state_revision,
        ..Default::default()
    };
    let stored = broker.store().put_handoff(&envelope).await?;
    broker.remember_run(run);
    let accepted = pb::Event {
        kind: pb::EventKind::HandoffAccepted as i32,
        run_id: run.id.clone(),
        owner: run.owner.clone(),
        agent: request.agent.clone(),
        handoff_id: envelope.id.clone(),
        depth: envelope.depth,
        inbox_sequence: stored.sequence,
        // Before the answer's delivery, which follows its creation.
        position: crate::app::clock::nanos(envelope.created_at.as_ref()),
        ..Default::default()
    };
    broker
        .emit(accepted, &format!("accepted-{}", envelope.id))
        .await?;
    Ok(pb::HandoffResponse {
        handoff_id: envelope.id,
        sequence: stored.sequence,
        duplicate: stored.duplicate,
        depth: envelope.depth,
        ..Default::default()
    })
}

/// A timer of request `id` fired: its timeout (the request times out
/// unless it was decided first), or the check that a decided request was
/// followed up. Either way a decided request's follow-up is done again if
/// it was cut short. A request followed up already, or a run that ended
/// or no longer exists, is left alone.
pub async fn time_out(
    broker: &Broker,
    run_id: &str,
    id: &str,
    check: bool,
) -> Result<(), BrokerError> {
    let decided = if check {
        // Only a follow-up to finish; nothing is decided here.
        match broker.store().run(run_id).await? {
            Some((run, _)) if !status_of(&run).is_terminal() => {
                match run.waiting.iter().find(|w| w.id == id).cloned() {
                    Some(r) if r.outcome != pb::InputOutcome::Unspecified as i32 => {
                        Decided::Before(run, r)
                    }
                    _ => Decided::Finished,
                }
            }
            _ => Decided::Finished,
        }
    } else {
        match decide(broker, run_id, id, pb::InputOutcome::TimedOut, None).await {
            Ok(d) => d,
            Err(
                BrokerError::RunNotFound(_)
                | BrokerError::RunClosed { .. }
                | BrokerError::InputNotFound(_),
            ) => return Ok(()),
            Err(e) => return Err(e),
        }
    };
    match decided {
        Decided::Now(run, request) | Decided::Before(run, request) => {
            follow_up(broker, &run, &request, "").await?;
            Ok(())
        }
        Decided::Finished => Ok(()),
    }
}

/// Schedules again the timeouts of the requests a resumed run still waits
/// on (their timers may have fired while it had failed), as new timers.
pub async fn reschedule(broker: &Broker, run: &pb::Run) -> Result<(), BrokerError> {
    for request in run
        .waiting
        .iter()
        .filter(|w| w.outcome == pb::InputOutcome::Unspecified as i32)
    {
        let timer = pb::Timer {
            run_id: run.id.clone(),
            due: request.deadline,
            input_request_id: request.id.clone(),
            sequence: u64::from(run.resumed),
            ..Default::default()
        };
        broker
            .store()
            .schedule(&timer, TimerKind::InputTimeout)
            .await?;
    }
    Ok(())
}
