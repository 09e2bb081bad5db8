//! Asking a run's owner and waiting for the answer: `AwaitInput`,
//! `ProvideInput`, and the timer that ends an unanswered wait.
//!
//! A waiting request lives in its run's record (`Run.waiting`), written
//! by compare-and-set together with the run's status, so the run is
//! WAITING_INPUT exactly while a request waits, and a broker killed at
//! any point loses nothing: the record and the request's durable timer
//! are stored before the asking delivery is acked, and every step is
//! recognised when done again (by the request's id, derived from the
//! asking handoff).

use std::time::{Duration, SystemTime};

use handoff_proto::pb;

use crate::{
    app::{
        access, auth, deliveries, guard, handoff, now,
        runs::{self, status_of, RunEnd},
        Broker,
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
    if run.waiting.is_empty() {
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
    if !req.fallback_agent.is_empty() {
        broker.agent(&req.fallback_agent).await?;
    }
    let token = access::decode(broker, &req.delivery_id).await?;
    auth::require(broker, caller, Action::ReceiveAs, &token.agent).await?;
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

/// Takes request `id` out of the run's waiting ones (compare-and-set): the
/// run as written and the request, or `None` when it no longer waits
/// (answered or timed out: ALREADY_SETTLED; unknown: INPUT_NOT_FOUND).
async fn settle(
    broker: &Broker,
    run_id: &str,
    id: &str,
    check: impl Fn(&pb::Run) -> Result<(), BrokerError>,
) -> Result<(pb::Run, pb::InputRequest), BrokerError> {
    loop {
        let (mut run, revision) = broker.run(run_id).await?;
        check(&run)?;
        let Some(at) = run.waiting.iter().position(|w| w.id == id) else {
            return Err(if run.settled_inputs.iter().any(|s| s == id) {
                already(id)
            } else {
                BrokerError::InputNotFound(id.to_string())
            });
        };
        let request = run.waiting.remove(at);
        run.settled_inputs.push(id.to_string());
        let over = run.settled_inputs.len().saturating_sub(SETTLED_KEPT);
        run.settled_inputs.drain(..over);
        if !status_of(&run).is_terminal() {
            run.status = running_status(&run);
        }
        if broker.store().update_run(&run, revision).await? {
            broker.forget_run(&run.id);
            return Ok((run, request));
        }
    }
}

/// Answers input request `req.request_id` for a caller with `own` on the
/// run's owner (anyone else is answered as if the run did not exist): the
/// answer is checked against the request's contract, then handed to the
/// agent that asked, with the request's id on its envelope.
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
        idempotency_key: format!("input-{}", request.id),
        ..Default::default()
    };
    if let Some(contract) = &request.answer {
        let outcome =
            guard::check_contract(broker, &request.agent, contract, &carrier, &answer).await;
        guard::enforce(broker, &carrier, outcome).await?;
    }
    let (run, request) = settle(broker, &run.id, &request.id, |r| {
        if status_of(r).is_terminal() {
            Err(closed(r))
        } else {
            Ok(())
        }
    })
    .await?;
    let receipt = deliver_answer(broker, &run, &request, answer).await?;
    let event = pb::Event {
        kind: pb::EventKind::InputProvided as i32,
        run_id: run.id.clone(),
        owner: run.owner.clone(),
        agent: request.agent.clone(),
        handoff_id: receipt.handoff_id.clone(),
        input_request_id: request.id.clone(),
        run_status: run.status,
        reason: format!("answered by {}", caller.principal),
        ..Default::default()
    };
    broker
        .emit(event, &format!("input-provided-{}", request.id))
        .await?;
    tracing::info!(run_id = %run.id, request_id = %request.id, "input provided");
    Ok(pb::ProvideInputResponse {
        handoff: Some(receipt),
        run: Some(run),
    })
}

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
    let envelope = pb::HandoffEnvelope {
        id: rules::derived_id(&format!("answer\u{0}{}", request.id)),
        run_id: run.id.clone(),
        source_agent: String::new(),
        target_agent: request.agent.clone(),
        payload: Some(answer),
        confidence: 1.0,
        parent_ids: vec![request.handoff_id.clone()],
        depth: request.depth,
        created_at: Some(now()),
        input_request_id: request.id.clone(),
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

/// Ends the wait of request `id` whose timeout passed (a durable timer
/// fired): the asking handoff's payload goes to its fallback agent, or
/// the run fails. A request answered first, or a run that ended or no
/// longer exists, is left alone.
pub async fn time_out(broker: &Broker, run_id: &str, id: &str) -> Result<(), BrokerError> {
    let settled = settle(broker, run_id, id, |r| {
        if status_of(r).is_terminal() {
            Err(closed(r))
        } else {
            Ok(())
        }
    })
    .await;
    let (run, request) = match settled {
        Ok(found) => found,
        Err(
            BrokerError::RunNotFound(_)
            | BrokerError::RunClosed { .. }
            | BrokerError::InputNotFound(_)
            | BrokerError::Refused { .. },
        ) => return Ok(()),
        Err(e) => return Err(e),
    };
    let event = pb::Event {
        kind: pb::EventKind::InputTimedOut as i32,
        run_id: run.id.clone(),
        owner: run.owner.clone(),
        agent: request.agent.clone(),
        handoff_id: request.handoff_id.clone(),
        input_request_id: request.id.clone(),
        fallback_agent: request.fallback_agent.clone(),
        run_status: run.status,
        ..Default::default()
    };
    broker.emit(event, &format!("input-timeout-{id}")).await?;
    if request.fallback_agent.is_empty() {
        let why = format!(
            "input request {id} of agent {} was not answered in time",
            request.agent
        );
        runs::end(broker, run_id, RunEnd::Failed(why)).await?;
        return Ok(());
    }
    let Some(payload) = request.payload.clone() else {
        let why = format!("input request {id} timed out; its payload was not kept");
        runs::end(broker, run_id, RunEnd::Failed(why)).await?;
        return Ok(());
    };
    let fallback = pb::HandoffRequest {
        run_id: run.id.clone(),
        target_agent: request.fallback_agent.clone(),
        payload: Some(payload),
        confidence: Some(1.0),
        parent_ids: vec![request.handoff_id.clone()],
        idempotency_key: format!("input-timeout-{id}"),
        ..Default::default()
    };
    match handoff::accept(broker, &auth::Caller::local(), fallback).await {
        Ok(_) => Ok(()),
        // Refused for what it is (not for an outage): it will never be
        // taken, so the run fails with why.
        Err(e)
            if !matches!(
                e.class(),
                Class::Unavailable | Class::Internal | Class::Aborted
            ) =>
        {
            let why = format!("input request {id} timed out; its fallback was refused: {e}");
            runs::end(broker, run_id, RunEnd::Failed(why)).await?;
            Ok(())
        }
        Err(e) => Err(e),
    }
}
