//! Deliveries: what becomes of a handoff the inbox offers to an instance
//! (delivered, discarded because its run ended, or routed to the fallback
//! or the dead letter once its attempts are used up), how a delivery is
//! settled (ack, nack, reject, extend), and the ack of a delivery that a
//! complete-and-handoff consumed.

use std::time::Duration;

use handoff_proto::pb;
use prost::Message as _;

use crate::{
    app::{
        access::{decide, decode, lease_for},
        agents::lease_of,
        auth, barriers, now,
        runs::{self, RunEnd},
        state, status_name, Broker,
    },
    error::BrokerError,
    rules::{
        handoff::{self as rules, Offer},
        lease::{Ask, Decision},
    },
    store::{Offered, Settlement},
};

/// Decides and records a settlement of `token`'s attempt: the lease
/// record moves by compare-and-set (read again if another write came
/// first). `Repeat` when the same settlement was made before. A first
/// attempt's record is created without reading it first.
async fn record_settlement(
    broker: &Broker,
    token: &pb::DeliveryToken,
    ask: Ask,
) -> Result<Decision, BrokerError> {
    if token.attempt == 1 {
        // Only when nothing is recorded yet; anything else (a refusal as
        // judged from the token alone included) is decided on the record.
        if let Ok((Decision::Proceed(next), None)) = decide(broker, token, None, ask).await {
            let decision = Decision::Proceed(next.clone());
            if broker
                .store()
                .put_lease(&token.agent, token.stream_sequence, &next, None)
                .await?
            {
                return Ok(decision);
            }
        }
    }
    loop {
        let record = broker
            .store()
            .lease(&token.agent, token.stream_sequence)
            .await?;
        let (decision, revision) = decide(broker, token, record, ask).await?;
        let Decision::Proceed(next) = &decision else {
            return Ok(decision);
        };
        if broker
            .store()
            .put_lease(&token.agent, token.stream_sequence, next, revision)
            .await?
        {
            return Ok(decision);
        }
    }
}

/// The name of one attempt of a delivery (`<agent>.<sequence>.<attempt>`):
/// what replicas tell each other when it is settled. Unlike the delivery
/// id it is no credential, so it may travel on a plain NATS subject.
pub fn slot(agent: &str, sequence: u64, attempt: u32) -> String {
    format!("{agent}.{sequence}.{attempt}")
}

/// What a session keeps of a delivery it holds.
#[derive(Debug, Clone)]
pub struct Held {
    /// The delivery id (the token the instance settles with).
    pub delivery_id: String,
    /// The delivery's slot ([`slot`]), by which any replica names it.
    pub slot: String,
    /// The handoff delivered.
    pub handoff_id: String,
    /// Its run and the run's owner.
    pub run_id: String,
    /// The run's owner.
    pub owner: String,
    /// The agent that handed it off.
    pub source_agent: String,
    /// Its depth in the run.
    pub depth: u32,
    /// Which attempt this is.
    pub attempt: u32,
    /// The barrier branch it belongs to (barrier, key, depth).
    pub branch: Option<(String, String, u32)>,
    /// The lease it was given.
    pub lease: Duration,
    /// The store's reference that settles it.
    pub reference: String,
    /// The agent it was delivered to.
    pub agent: String,
    /// When it was handed to the instance (for `handoff_processing_seconds`).
    pub delivered_at: std::time::Instant,
    /// How long the handoff waited from its creation to this delivery
    /// (for `handoff_queue_wait_seconds`); `None` if it carries no time.
    pub queued: Option<Duration>,
    /// The causal position of its `delivered` event (in its token too).
    pub position: u64,
}

/// What becomes of an offered handoff.
#[derive(Debug)]
pub enum Offering {
    /// Hand it to the instance.
    Deliver(Box<pb::Delivery>, Box<Held>),
    /// Nothing for the instance: it was routed to the fallback or the dead
    /// letter, discarded (its run ended), terminated (not a handoff), or
    /// left to its lease (the store did not answer).
    Skip,
}

/// How soon a handoff whose run was not found is offered again.
const RUN_NOT_SEEN: std::time::Duration = std::time::Duration::from_secs(1);

/// Gives an offer that failed on the way (a read or write that did not
/// answer) back to the inbox, to be offered again after [`RUN_NOT_SEEN`]
/// rather than when its lease passes.
async fn again_soon(broker: &Broker, reference: &str) {
    if let Err(e) = broker
        .store()
        .settle(reference, Settlement::Nack(Some(RUN_NOT_SEEN)))
        .await
    {
        tracing::warn!(error = %e, "offer not given back; it is offered again when its lease passes");
    }
}

/// Decides what becomes of a handoff the inbox offers to an instance of
/// `agent`: attempts used up -> fallback or dead letter; run ended ->
/// discarded; run not found -> offered again shortly; otherwise a
/// delivery with the run's pinned context.
pub async fn offer(
    broker: &Broker,
    agent: &pb::AgentSpec,
    instance: &str,
    offered: Offered,
) -> Offering {
    let Offered {
        sequence,
        delivered,
        reference,
        payload,
    } = offered;
    let envelope = match pb::HandoffEnvelope::decode(payload) {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(sequence, error = %e, "inbox message is not a handoff; terminated");
            let _ = broker.store().settle(&reference, Settlement::Term).await;
            return Offering::Skip;
        }
    };
    // Re-read the spec so a re-registered lease or attempt count applies.
    let spec = broker
        .agent(&agent.name)
        .await
        .unwrap_or_else(|_| agent.clone());
    // JetStream's count, unless this replica nacked a later attempt than
    // it says (its consumer's state lost or reset): attempts never go
    // back.
    let delivered = match broker.nacked_attempt(&spec.name, sequence) {
        Some(nacked) => delivered.max(i64::from(nacked) + 1),
        None => delivered,
    };
    let attempt = match rules::offer(delivered, spec.max_attempts) {
        Offer::Deliver(n) => n,
        Offer::Exhausted => {
            if let Err(e) =
                exhaust(broker, &spec, &envelope, (&reference, sequence), delivered).await
            {
                tracing::warn!(error = %e, "routing an exhausted handoff failed; it will be offered again");
            }
            return Offering::Skip;
        }
    };
    let run = match broker.run_recent(&envelope.run_id).await {
        Ok(run) => run,
        Err(BrokerError::RunNotFound(_)) => {
            // Runs are never deleted and a handoff is accepted only for an
            // existing run, so this is a read that did not see it (a
            // stream leader changing): offered again shortly, never
            // dropped; a run truly gone ends in the dead letters once its
            // attempts are spent.
            tracing::warn!(run_id = %envelope.run_id, sequence, "the handoff's run was not found; offered again");
            let _ = broker
                .store()
                .settle(&reference, Settlement::Nack(Some(RUN_NOT_SEEN)))
                .await;
            return Offering::Skip;
        }
        Err(e) => {
            tracing::warn!(error = %e, "run lookup failed; offered again shortly");
            again_soon(broker, &reference).await;
            return Offering::Skip;
        }
    };
    // A judge's request is the one delivery a completed run still makes.
    if pb::RunStatus::try_from(run.status).is_ok_and(|s| s.is_terminal()) && !envelope.judge {
        if broker
            .store()
            .settle(&reference, Settlement::Term)
            .await
            .is_ok()
        {
            broker
                .emit_unconfirmed(
                    pb::Event {
                        kind: pb::EventKind::Discarded as i32,
                        run_id: run.id.clone(),
                        owner: run.owner.clone(),
                        agent: spec.name.clone(),
                        handoff_id: envelope.id.clone(),
                        reason: format!("run is {}", status_name(run.status)),
                        ..Default::default()
                    },
                    format!("discarded-{}", envelope.id),
                )
                .await;
        }
        return Offering::Skip;
    }
    let lease = lease_of(&spec, broker.config().default_lease);
    let deadline = prost_types::Timestamp::from(std::time::SystemTime::now() + lease);
    match take_lease(
        broker, &spec.name, sequence, attempt, instance, deadline, &reference,
    )
    .await
    {
        Ok(true) => broker.forget_nack(&spec.name, sequence),
        Ok(false) => return Offering::Skip,
        Err(e) => {
            tracing::warn!(error = %e, "lease not recorded; offered again shortly");
            again_soon(broker, &reference).await;
            return Offering::Skip;
        }
    }
    let mut token = pb::DeliveryToken {
        agent: spec.name.clone(),
        run_id: envelope.run_id.clone(),
        stream_sequence: sequence,
        ack_subject: reference.clone(),
        handoff_id: envelope.id.clone(),
        attempt,
        instance: instance.to_string(),
        lease_deadline: Some(deadline),
        // Decided before the instance sees it: after the handoff's
        // acceptance, before anything the instance hands off from it.
        delivered_position: broker
            .position(crate::app::clock::nanos(envelope.created_at.as_ref()).saturating_add(1)),
        ..Default::default()
    };
    if let Err(e) = auth::sign(broker, &mut token).await {
        tracing::warn!(error = %e, "delivery not signed; offered again shortly");
        again_soon(broker, &token.ack_subject).await;
        return Offering::Skip;
    }
    let delivery_id = rules::encode_token(&token);
    let held = Held {
        delivery_id: delivery_id.clone(),
        slot: slot(&spec.name, sequence, attempt),
        handoff_id: envelope.id.clone(),
        run_id: run.id.clone(),
        owner: run.owner.clone(),
        source_agent: envelope.source_agent.clone(),
        depth: envelope.depth,
        attempt,
        branch: branch_of(&envelope),
        lease,
        reference,
        agent: spec.name.clone(),
        delivered_at: std::time::Instant::now(),
        queued: envelope
            .created_at
            .and_then(|t| std::time::SystemTime::try_from(t).ok())
            .and_then(|t| std::time::SystemTime::now().duration_since(t).ok()),
        position: token.delivered_position,
    };
    let (state, pinned_digest) =
        match state::for_delivery(broker, &run, &envelope, &spec.reads).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "run state not read; offered again shortly");
                again_soon(broker, &held.reference).await;
                return Offering::Skip;
            }
        };
    let pinned_digest = if broker.config().faults.corrupt_intent_digest {
        format!("0{}", pinned_digest.get(1..).unwrap_or_default())
    } else {
        pinned_digest
    };
    // Made in a span of its own, whose context the agent continues.
    let mut envelope = envelope;
    if let Some(traces) = broker.traces() {
        envelope.trace_context = traces.receive(&envelope, &spec.name, attempt);
    }
    let delivery = pb::Delivery {
        delivery_id,
        attempt,
        max_attempts: spec.max_attempts,
        lease_deadline: Some(deadline),
        pinned: run.pinned,
        sequence,
        handoff: Some(envelope),
        state,
        pinned_digest,
    };
    Offering::Deliver(Box::new(delivery), Box::new(held))
}

/// Records that `instance` holds attempt `attempt` (a redelivery) of the
/// inbox message at `sequence` until `deadline`. `false` when the message must not be
/// delivered: an earlier attempt's ack was recorded and its ack to the
/// inbox lost (it is acked now), or another offer recorded it first.
async fn take_lease(
    broker: &Broker,
    agent: &str,
    sequence: u64,
    attempt: u32,
    instance: &str,
    deadline: prost_types::Timestamp,
    reference: &str,
) -> Result<bool, BrokerError> {
    // A first attempt writes no record: its signed token is its lease
    // until it is settled or delivered again.
    if attempt == 1 {
        return Ok(true);
    }
    let next = pb::Lease {
        attempt,
        instance: instance.to_string(),
        deadline: Some(deadline),
        state: pb::LeaseState::Leased as i32,
        settled_at: None,
        delivery: reference.to_string(),
    };
    let record = broker.store().lease(agent, sequence).await?;
    if let Some((current, _)) = &record {
        let state = pb::LeaseState::try_from(current.state).unwrap_or(pb::LeaseState::Unspecified);
        match state {
            pb::LeaseState::Acked => {
                broker.store().settle(reference, Settlement::Ack).await?;
                return Ok(false);
            }
            pb::LeaseState::Rejected => {
                broker.store().settle(reference, Settlement::Term).await?;
                return Ok(false);
            }
            _ if current.attempt >= attempt => return Ok(false),
            _ => {}
        }
    }
    let revision = record.map(|(_, r)| r);
    broker
        .store()
        .put_lease(agent, sequence, &next, revision)
        .await
}

/// Announces that a delivery reached an instance (`delivered`, or
/// `redelivered` for a later attempt), and counts it; the queue wait of a
/// first attempt is recorded.
pub async fn announce_delivered(broker: &Broker, agent: &str, instance: &str, held: &Held) {
    broker.metrics().delivered(agent, held.attempt);
    if let (1, Some(queued)) = (held.attempt, held.queued) {
        broker.metrics().queue_wait(agent, queued);
    }
    let kind = if held.attempt > 1 {
        pb::EventKind::Redelivered
    } else {
        pb::EventKind::Delivered
    };
    broker
        .emit_unconfirmed(
            pb::Event {
                kind: kind as i32,
                run_id: held.run_id.clone(),
                owner: held.owner.clone(),
                agent: agent.to_string(),
                instance: instance.to_string(),
                handoff_id: held.handoff_id.clone(),
                source_agent: held.source_agent.clone(),
                attempt: held.attempt,
                depth: held.depth,
                position: held.position,
                ..Default::default()
            },
            format!("{}-{}-{}", kind.token(), held.handoff_id, held.attempt),
        )
        .await;
}

/// How an instance settles a delivery.
#[derive(Debug, Clone)]
pub enum Op {
    /// Done.
    Ack,
    /// Retry later (after the delay, if any).
    Nack(Option<Duration>),
    /// Terminal failure: fails the run (or the branch).
    Reject(String),
    /// Restart the lease.
    Extend,
}

/// Settles a delivery of `agent` held by `instance` (`held`: what the
/// session knows of it; `None` when it was delivered to an earlier
/// session, after a reconnect). Returns the new lease of an extend.
pub async fn settle(
    broker: &Broker,
    spec: &pb::AgentSpec,
    instance: &str,
    delivery_id: &str,
    held: Option<&Held>,
    op: &Op,
) -> Result<Option<Duration>, BrokerError> {
    let agent = spec.name.as_str();
    let token = decode(broker, delivery_id).await?;
    if token.agent != agent {
        return Err(BrokerError::BadDeliveryId(format!(
            "the delivery belongs to agent {:?}, not {agent:?}",
            token.agent
        )));
    }
    let ask = match op {
        Op::Ack => Ask::Ack,
        Op::Nack(_) => Ask::Nack,
        Op::Reject(_) => Ask::Reject,
        Op::Extend => Ask::Extend,
    };
    // A rejection fails the run before it is recorded (see below), so it
    // is decided first and recorded after; every other settlement is
    // recorded first.
    let decided = if let Op::Reject(_) = op {
        let record = broker
            .store()
            .lease(&token.agent, token.stream_sequence)
            .await?;
        decide(broker, &token, record, ask).await?.0
    } else {
        record_settlement(broker, &token, ask).await?
    };
    if decided == Decision::Repeat {
        // The same settlement again (its answer was lost, or it failed
        // half-way): confirm it; an ack or a rejection is repeated to the
        // inbox in case it never reached it.
        match op {
            Op::Ack => {
                broker
                    .store()
                    .settle(&token.ack_subject, Settlement::Ack)
                    .await?
            }
            Op::Reject(_) => {
                broker
                    .store()
                    .settle(&token.ack_subject, Settlement::Term)
                    .await?
            }
            Op::Nack(_) | Op::Extend => {}
        }
        return Ok(None);
    }
    let (run_id, owner, attempt, branch) = match held {
        Some(h) => (
            h.run_id.clone(),
            h.owner.clone(),
            h.attempt,
            h.branch.clone(),
        ),
        None => {
            // Settled through another session (after a reconnect): the
            // stored handoff says which run it belongs to.
            let stored = broker
                .store()
                .handoff_at(token.stream_sequence)
                .await?
                .ok_or_else(|| {
                    BrokerError::DeliveryGone(
                        "the delivery's handoff is no longer stored".to_string(),
                    )
                })?;
            let (run, _) = broker.run(&stored.envelope.run_id).await?;
            (run.id, run.owner, 0, branch_of(&stored.envelope))
        }
    };
    let event = |kind: pb::EventKind, reason: String| pb::Event {
        kind: kind as i32,
        run_id: run_id.clone(),
        owner: owner.clone(),
        agent: agent.to_string(),
        instance: instance.to_string(),
        handoff_id: token.handoff_id.clone(),
        attempt,
        reason,
        ..Default::default()
    };
    let how = match op {
        Op::Ack => Settlement::Ack,
        Op::Nack(d) => Settlement::Nack(*d),
        Op::Reject(_) => Settlement::Term,
        Op::Extend => Settlement::Progress,
    };
    if let Op::Reject(reason) = op {
        // Fail the run before terminating the delivery: a crash in
        // between redelivers it (and the ended run discards it), where
        // the other order could leave a terminated delivery and a run
        // that never ends.
        let reason = if reason.is_empty() {
            "rejected"
        } else {
            reason.as_str()
        };
        let rejected = event(pb::EventKind::Rejected, reason.to_string());
        broker
            .emit(rejected, &format!("rejected-{}", token.handoff_id))
            .await?;
        let why = format!(
            "agent {agent} rejected handoff {}: {reason}",
            token.handoff_id
        );
        match &branch {
            // A rejected branch fails that branch; its barrier decides.
            Some((barrier_id, key, depth)) => {
                fail_branch(
                    broker,
                    &run_id,
                    barrier_id,
                    key,
                    *depth,
                    &token.handoff_id,
                    agent,
                    why,
                )
                .await?;
            }
            None => {
                runs::end(broker, &run_id, RunEnd::Failed(why)).await?;
            }
        }
        record_settlement(broker, &token, ask).await?;
    }
    broker.store().settle(&token.ack_subject, how).await?;
    if let (Some(h), false) = (held, matches!(op, Op::Extend)) {
        broker.metrics().processing(agent, h.delivered_at.elapsed());
    }
    if held.is_none() && !matches!(op, Op::Extend) {
        // Held by an earlier session, maybe on another replica: free its
        // slot there.
        broker.release_delivery(&token).await;
    }
    match op {
        Op::Extend => {
            return Ok(Some(lease_for(broker, agent).await));
        }
        Op::Ack => {
            broker.metrics().acked(agent);
            broker
                .emit_unconfirmed(
                    event(pb::EventKind::Acked, String::new()),
                    format!("acked-{}", token.handoff_id),
                )
                .await;
        }
        Op::Nack(delay) => {
            broker.remember_nack(agent, token.stream_sequence, token.attempt);
            broker.metrics().nacked(agent);
            let reason = delay.map(|d| format!("retry in {d:?}")).unwrap_or_default();
            broker
                .emit_unconfirmed(
                    event(pb::EventKind::Nacked, reason),
                    format!(
                        "nacked-{}-{attempt}-{}",
                        token.handoff_id,
                        uuid::Uuid::now_v7()
                    ),
                )
                .await;
        }
        Op::Reject(_) => broker.metrics().delivery_rejected(agent),
    }
    Ok(None)
}

/// Returns a delivery for immediate redelivery (its instance went away).
pub async fn give_back(broker: &Broker, held: &Held) {
    if let Err(e) = broker
        .store()
        .settle(&held.reference, Settlement::Nack(None))
        .await
    {
        tracing::warn!(handoff_id = %held.handoff_id, error = %e, "could not return a delivery; it waits for its lease");
    }
}

/// Acks a delivery that a fan-out consumed, once all its handoffs are
/// stored.
pub async fn settle_consumed(
    broker: &Broker,
    run_id: &str,
    delivery_id: &str,
) -> Result<(), BrokerError> {
    let token = decode(broker, delivery_id).await?;
    let (run, _) = broker.run(run_id).await?;
    ack_consumed(broker, &run, &token).await;
    Ok(())
}

/// Acks the consumed delivery after the new handoff is stored: its lease
/// record and the inbox, together. A failure is logged, not returned: the
/// new handoff is durable, and a delivery that stays unacked is
/// redelivered and its repeated handoff recognised. (The fault
/// `skip_consume_ack` leaves it unacked, as a broker that died here would.)
pub async fn ack_consumed(broker: &Broker, run: &pb::Run, token: &pb::DeliveryToken) {
    if broker.config().faults.skip_consume_ack {
        tracing::warn!("fault injected: consumed delivery left unacked");
        return;
    }
    let (recorded, acked) = tokio::join!(
        record_settlement(broker, token, Ask::Ack),
        broker.store().settle(&token.ack_subject, Settlement::Ack)
    );
    // Counted once: a repeated handoff acks its consumed delivery again.
    let first = match &recorded {
        Ok(decision) => *decision != Decision::Repeat,
        Err(e) => {
            tracing::debug!(handoff_id = %token.handoff_id, error = %e, "consumed delivery's lease not recorded as acked");
            false
        }
    };
    match acked {
        Ok(()) => {
            if first {
                broker.metrics().acked(&token.agent);
            }
            broker.release_delivery(token).await;
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

/// Routes a handoff whose attempts are used up: to the agent's fallback if
/// it has a registered one, else to the dead letter (and the run fails).
/// Every step is idempotent, so a crash here is repaired when JetStream
/// offers the message again.
async fn exhaust(
    broker: &Broker,
    spec: &pb::AgentSpec,
    envelope: &pb::HandoffEnvelope,
    (reference, sequence): (&str, u64),
    delivered: i64,
) -> Result<(), BrokerError> {
    let attempts = u32::try_from(delivered - 1).unwrap_or(u32::MAX);
    let reason = format!(
        "not settled by agent {} after {attempts} attempts",
        spec.name
    );
    route_away(broker, spec, (envelope, sequence), attempts, reason).await?;
    broker.store().settle(reference, Settlement::Ack).await
}

/// A handoff no instance took within the agent's `max_queue_wait` (a
/// durable timer fired): routed to the fallback or the dead letter, and
/// withdrawn from the inbox. One an instance took is left alone.
pub async fn queue_wait_passed(
    broker: &Broker,
    agent: &str,
    sequence: u64,
) -> Result<(), BrokerError> {
    if broker.store().was_delivered(agent, sequence).await? {
        return Ok(());
    }
    let Some(stored) = broker.store().handoff_at(sequence).await? else {
        return Ok(());
    };
    let spec = match broker.agent(agent).await {
        Ok(spec) => spec,
        Err(BrokerError::AgentNotFound(_)) => return Ok(()),
        Err(e) => return Err(e),
    };
    let waited = spec
        .max_queue_wait
        .and_then(|d| Duration::try_from(d).ok())
        .unwrap_or_default();
    let reason = format!(
        "not taken by any instance of agent {agent} within max_queue_wait {}",
        humantime::format_duration(waited)
    );
    route_away(broker, &spec, (&stored.envelope, sequence), 0, reason).await?;
    broker.store().withdraw_handoff(sequence).await
}

/// Routes a handoff away from `spec`'s agent: to its registered fallback,
/// else to the dead letter (and its run, or its barrier branch, fails).
/// Every step is idempotent.
async fn route_away(
    broker: &Broker,
    spec: &pb::AgentSpec,
    (envelope, sequence): (&pb::HandoffEnvelope, u64),
    attempts: u32,
    reason: String,
) -> Result<(), BrokerError> {
    let owner = broker
        .run(&envelope.run_id)
        .await
        .map(|(r, _)| r.owner)
        .unwrap_or_default();
    let fallback = if spec.fallback_agent.is_empty() {
        None
    } else {
        match broker.agent(&spec.fallback_agent).await {
            Ok(fb) => Some(fb),
            Err(BrokerError::AgentNotFound(_)) => None,
            // Unknown is not absent: retry when the message is offered again.
            Err(e) => return Err(e),
        }
    };
    match fallback {
        Some(fb) => {
            let mut copy = envelope.clone();
            copy.id = rules::fallback_id(&envelope.id, &fb.name);
            copy.target_agent = fb.name.clone();
            copy.fallback_from = spec.name.clone();
            copy.parent_ids = vec![envelope.id.clone()];
            broker.store().put_handoff(&copy).await?;
            broker
                .emit(
                    pb::Event {
                        kind: pb::EventKind::RoutedToFallback as i32,
                        run_id: envelope.run_id.clone(),
                        owner,
                        agent: spec.name.clone(),
                        handoff_id: envelope.id.clone(),
                        fallback_agent: fb.name.clone(),
                        attempt: attempts,
                        depth: envelope.depth,
                        reason,
                        ..Default::default()
                    },
                    &format!("fallback-{}", envelope.id),
                )
                .await?;
            tracing::warn!(fallback = %fb.name, attempts, "handoff routed to fallback agent");
        }
        None => {
            let letter = pb::DeadLetter {
                handoff: Some(envelope.clone()),
                agent: spec.name.clone(),
                attempts,
                reason: reason.clone(),
                at: Some(now()),
                sequence: 0,
            };
            // Per inbox message: a redriven handoff (the same id, stored
            // again) may be dead-lettered again.
            let write_id = format!("dead-{}-{sequence}", envelope.id);
            broker.store().put_dead_letter(&letter, &write_id).await?;
            broker
                .emit(
                    pb::Event {
                        kind: pb::EventKind::DeadLettered as i32,
                        run_id: envelope.run_id.clone(),
                        owner,
                        agent: spec.name.clone(),
                        handoff_id: envelope.id.clone(),
                        attempt: attempts,
                        depth: envelope.depth,
                        reason: reason.clone(),
                        ..Default::default()
                    },
                    &format!("dead-{}-{sequence}", envelope.id),
                )
                .await?;
            let why = rules::dead_letter_failure(&envelope.id, &reason);
            let ended = match branch_of(envelope) {
                Some((barrier_id, key, depth)) => {
                    fail_branch(
                        broker,
                        &envelope.run_id,
                        &barrier_id,
                        &key,
                        depth,
                        &envelope.id,
                        &spec.name,
                        why,
                    )
                    .await
                }
                None => runs::end(broker, &envelope.run_id, RunEnd::Failed(why))
                    .await
                    .map(|_| ()),
            };
            match ended {
                Ok(()) | Err(BrokerError::RunNotFound(_)) => {}
                Err(e) => return Err(e),
            }
            broker.metrics().dead_lettered(&spec.name);
            tracing::warn!(attempts, "handoff dead-lettered");
        }
    }
    Ok(())
}

/// The barrier branch a handoff belongs to: (barrier, key, depth).
pub fn branch_of(envelope: &pb::HandoffEnvelope) -> Option<(String, String, u32)> {
    (!envelope.barrier_id.is_empty() && !envelope.branch_key.is_empty()).then(|| {
        (
            envelope.barrier_id.clone(),
            envelope.branch_key.clone(),
            envelope.depth,
        )
    })
}

/// Records a branch whose delivery was rejected or dead-lettered as failed
/// at its barrier (once: its id is derived from the failed handoff).
#[allow(clippy::too_many_arguments)]
async fn fail_branch(
    broker: &Broker,
    run_id: &str,
    barrier_id: &str,
    key: &str,
    depth: u32,
    handoff_id: &str,
    agent: &str,
    why: String,
) -> Result<(), BrokerError> {
    let (run, _) = broker.run(run_id).await?;
    let result = pb::BranchResult {
        key: key.to_string(),
        status: pb::BranchStatus::Failed as i32,
        handoff_id: rules::derived_id(&format!("failed\u{0}{handoff_id}")),
        source_agent: agent.to_string(),
        warnings: vec![why],
        depth,
        arrived_at: Some(now()),
        ..Default::default()
    };
    let stored = std::sync::atomic::AtomicBool::new(false);
    barriers::arrive(broker, &run, barrier_id, result, None, &stored)
        .await
        .map(|_| ())
}
