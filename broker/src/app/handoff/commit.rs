//! Commit and notify: store what passed the guards (the state delta, the
//! handoff or the branch result), then publish its event, settle the
//! consumed delivery and record the receipt in its claim, together.

use std::sync::atomic::{AtomicBool, Ordering};

use handoff_proto::pb;
use prost::Message as _;

use super::{Claim, ClaimKey, TimerKind};
use crate::{
    app::{
        barriers, clock, deliveries, guard,
        guard::Checked,
        judge, now, payloads,
        runs::{self, RunEnd},
        state, status_name, Broker,
    },
    error::BrokerError,
    rules::{handoff as rules, state as state_rules},
};

/// The barrier branch a handoff is on: the one it names, else the one of
/// the delivery it consumes (a branch's chain carries it hop to hop).
pub(super) fn branch_of(
    req: &pb::HandoffRequest,
    parent: Option<&pb::HandoffEnvelope>,
) -> (String, String) {
    match (parent, req.barrier_id.is_empty()) {
        (_, false) => (req.barrier_id.clone(), req.branch_key.clone()),
        (Some(p), true) => (p.barrier_id.clone(), p.branch_key.clone()),
        (None, true) => (String::new(), String::new()),
    }
}

/// The `handoff_accepted` event of a stored handoff.
pub(super) fn accepted_event(
    run: &pb::Run,
    req: &pb::HandoffRequest,
    receipt: &pb::HandoffResponse,
    barrier_id: String,
    branch_key: String,
) -> pb::Event {
    pb::Event {
        kind: pb::EventKind::HandoffAccepted as i32,
        run_id: run.id.clone(),
        owner: run.owner.clone(),
        agent: req.target_agent.clone(),
        source_agent: req.source_agent.clone(),
        handoff_id: receipt.handoff_id.clone(),
        depth: receipt.depth,
        barrier_id,
        branch_key,
        inbox_sequence: receipt.sequence,
        ..Default::default()
    }
}

/// The claim a handoff records what it stored into: on the delivery it
/// consumes, or on its key.
pub(super) struct Receipt {
    pub(super) key: ClaimKey,
    /// The claim this request made (or would make).
    pub(super) mine: pb::ConsumeClaim,
    /// The claim as this request knows it, and its revision.
    pub(super) known: Option<(pb::ConsumeClaim, u64)>,
}

/// Records in a claim what was stored from its delivery (or under its
/// key), so a redo is recognised for as long as the claim is kept: into
/// the claim as this request knows it (one write), read again only if it
/// changed. A failure is logged: the dedupe window still recognises a
/// redo within it.
async fn record_receipt(broker: &Broker, claim: Receipt, receipt: pb::HandoffResponse) {
    record(broker, claim, |c| {
        if c.stored.iter().any(|r| r.handoff_id == receipt.handoff_id) {
            return false;
        }
        c.stored.push(receipt.clone());
        if c.stored_at.is_none() {
            c.stored_at = Some(now());
        }
        true
    })
    .await;
}

/// Records in a keyed handoff's claim the state revision its delta made,
/// before the handoff is stored: a redo finds it there, however many
/// revisions follow. Returns the claim as it now stands.
async fn record_revision(broker: &Broker, claim: Receipt, revision: u64) -> Receipt {
    record(broker, claim, |c| {
        let changed = c.state_revision != revision;
        c.state_revision = revision;
        changed
    })
    .await
}

/// Changes a claim with `change` (which says whether it changed anything),
/// by compare-and-set; creates it if it is gone. Returns it as written.
async fn record(
    broker: &Broker,
    claim: Receipt,
    change: impl Fn(&mut pb::ConsumeClaim) -> bool,
) -> Receipt {
    let Receipt {
        key,
        mine,
        mut known,
    } = claim;
    let store = broker.store();
    for _ in 0..20 {
        let current = match known.take() {
            Some(k) => Ok(Some(k)),
            None => store.claim(&key).await,
        };
        let current = match current {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "not recorded in the claim");
                break;
            }
        };
        let (mut claim, revision) = match current {
            Some(c) => c,
            None => {
                let mut fresh = mine.clone();
                change(&mut fresh);
                match store.claim_consumed(&key, &fresh).await {
                    Ok(Claim::Made(revision)) => {
                        known = Some((fresh, revision));
                        break;
                    }
                    Ok(Claim::Held(c, r)) => (c, r),
                    Err(e) => {
                        tracing::warn!(error = %e, "not recorded in the claim");
                        break;
                    }
                }
            }
        };
        if !change(&mut claim) {
            known = Some((claim, revision));
            break;
        }
        match store.update_claim(&key, &claim, revision).await {
            Ok(Some(next)) => {
                known = Some((claim, next));
                break;
            }
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "not recorded in the claim");
                break;
            }
        }
    }
    if known.is_none() {
        tracing::warn!(claim = ?key, "not recorded in the claim: it kept changing, or could not be read");
    }
    Receipt { key, mine, known }
}

/// What a handoff read before it is committed.
pub(super) struct Read {
    pub(super) run: pb::Run,
    /// The handoff whose delivery it consumes.
    pub(super) parent: Option<pb::HandoffEnvelope>,
    /// The barrier the request names, when it goes to one (`None`: not
    /// read; `Some(None)`: not opened yet).
    pub(super) barrier: Option<Option<(pb::Barrier, u64)>>,
    /// The verified reference the request's payload came by, if any.
    pub(super) forwarded: Option<pb::PayloadRef>,
    /// The state revision an earlier attempt of this keyed handoff
    /// recorded its delta made (0: none).
    pub(super) made_revision: u64,
}

/// Stores a handoff that passed the guards in a run that exists (setting
/// `stored` once it is durable), then publishes its event and settles the
/// delivery it consumes.
#[allow(clippy::too_many_arguments)]
pub(super) async fn commit(
    broker: &Broker,
    req: &pb::HandoffRequest,
    claim: Option<Receipt>,
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
        forwarded,
        made_revision,
    } = read;
    let status = pb::RunStatus::try_from(run.status).unwrap_or(pb::RunStatus::Unspecified);
    if let (Some(token), Some(p)) = (consumed, parent.as_ref().filter(|p| p.judge)) {
        // The judge's verdict on a completed run.
        if p.run_id == run.id {
            return judge::record(broker, &run, req, token, id).await;
        }
    }
    if status.is_terminal() {
        if req.r#final && run.result_handoff_id == id {
            // A retry of the final handoff that completed this run: make
            // sure the owner was told (deduplicated), then answer duplicate.
            runs::announce_end(broker, &run).await?;
            if let Some(token) = consumed {
                deliveries::ack_consumed(broker, &run, token).await;
            }
            return Ok(pb::HandoffResponse {
                handoff_id: id,
                sequence: 0,
                duplicate: true,
                depth: 0,
                ..Default::default()
            });
        }
        // A retry of a handoff whose earlier attempt made its delta (its
        // answer lost) is that handoff: it is finished (stored, or found
        // stored, and discarded when offered), not denied.
        let finishes = !req.r#final
            && !req.to_barrier
            && !req.fan_out
            && req.state_delta.is_some()
            && state::made_before(broker, &run, &id, made_revision).await?;
        if !finishes {
            return Err(BrokerError::RunClosed {
                run: run.id.clone(),
                status: status_name(run.status),
            });
        }
    }
    let depth = rules::depth(parent.as_ref().map(|p| p.depth), run.max_depth, req.r#final)?;
    let (barrier_id, branch_key) = branch_of(req, parent.as_ref());
    if req.to_barrier && (barrier_id.is_empty() || branch_key.is_empty()) {
        return Err(BrokerError::malformed(
            "barrier_id",
            "to_barrier: the consumed delivery belongs to no barrier branch; name barrier_id and branch_key",
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
                let outcome = guard::check_target(broker, target, req, payload).await;
                checked = guard::enforce(broker, req, outcome).await?;
            }
        }
    }
    // Signal 1: payload fields dropped on this edge; the target's contract
    // may refuse dropping some (`carry`).
    let dropped = match &parent {
        Some(p) => guard::check_carry(broker, req, p, &checked).await?,
        None => Vec::new(),
    };
    let mut parent_ids = req.parent_ids.clone();
    if let Some(p) = &parent {
        if !parent_ids.contains(&p.id) {
            parent_ids.insert(0, p.id.clone());
        }
    }
    let mut envelope = pb::HandoffEnvelope {
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
        // Its position in the run: after the run's start and the delivery
        // it consumes (whichever replica announced it).
        created_at: Some(
            broker.stamp(
                parent
                    .as_ref()
                    .map_or(0, |p| clock::nanos(p.created_at.as_ref()).saturating_add(2))
                    .max(clock::nanos(run.created_at.as_ref()).saturating_add(1))
                    .max(consumed.map_or(0, |t| t.delivered_position.saturating_add(1))),
            ),
        ),
        fallback_from: String::new(),
        contract_type: checked.contract_type.clone(),
        contract_version: checked.version,
        token_count: checked.tokens,
        barrier_id: barrier_id.clone(),
        branch_key: branch_key.clone(),
        state_revision: 0,
        asks_for: req.asks_for.clone(),
        judge: false,
        payload_ref: None,
        input_request_id: String::new(),
    };
    let max_payload = broker.store().max_payload();
    // The state revision is set below: room for its 11 bytes. What the
    // envelope holds besides its payload must fit before the payload is
    // stored by reference (a reference takes at most 512 bytes).
    let payload_len = envelope
        .payload
        .as_ref()
        .map_or(0, |p| prost::encoding::message::encoded_len(5, p));
    let bare = envelope.encoded_len() - payload_len + 11;
    if max_payload > 0 && bare + 512 > max_payload {
        return Err(BrokerError::EnvelopeTooLarge {
            size: bare,
            max_payload,
        });
    }
    // Moved out of the envelope now, written once nothing below can
    // refuse the handoff.
    let pending = payloads::externalize_known(broker, &mut envelope, forwarded.as_ref()).await?;
    let size = envelope.encoded_len() + 11;
    if max_payload > 0 && size > max_payload {
        return Err(BrokerError::EnvelopeTooLarge { size, max_payload });
    }
    // A branch result the barrier (as read) refuses, or answers with
    // another result for its key, is decided before the state changes.
    let branch = req.to_barrier.then(|| pb::BranchResult {
        key: branch_key.clone(),
        status: branch_status as i32,
        payload: envelope.payload.clone(),
        payload_ref: envelope.payload_ref.clone(),
        handoff_id: id.clone(),
        source_agent: req.source_agent.clone(),
        confidence: envelope.confidence,
        warnings: envelope.warnings.clone(),
        depth,
        arrived_at: envelope.created_at,
        sequence: 0,
        // Only what the release links to: the W3C fields.
        trace_context: envelope
            .trace_context
            .iter()
            .filter(|(k, _)| {
                k.eq_ignore_ascii_case(crate::trace::TRACEPARENT)
                    || k.eq_ignore_ascii_case(crate::trace::TRACESTATE)
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    });
    if let (Some(result), Some((b, _))) = (&branch, &barrier) {
        if let Some(arrived) =
            barriers::check_arrival(broker, &run.id, &barrier_id, result, b).await?
        {
            return Ok(answer_first(
                broker,
                &run,
                req,
                consumed,
                arrived,
                (depth, &barrier_id, &branch_key),
            )
            .await);
        }
    }
    // The state: the delta is applied once, with this handoff (every guard
    // has passed: a refused handoff changes nothing); signal 2: keys asked
    // for that the state already held.
    // A final handoff's delta is stored with the run's end, and refused
    // with nothing stored when the run's end was decided otherwise first
    // (a cancel, its deadline, another attempt of its step). The payload
    // its result names by reference is written before.
    let mut pending = pending;
    let ends = if req.r#final {
        if let Some(pending) = pending.take() {
            pending.put(broker).await?;
        }
        Some(runs::ending(&RunEnd::Completed {
            handoff_id: id.clone(),
            result: envelope.payload.clone(),
            result_ref: envelope.payload_ref.clone(),
        }))
    } else {
        None
    };
    let mut applied = state::apply(
        broker,
        &run,
        &id,
        &req.source_agent,
        req.state_delta.as_ref(),
        state::Hints {
            asks: !req.asks_for.is_empty(),
            made: made_revision,
            ends: ends.as_ref(),
        },
    )
    .await?;
    // A keyed handoff's delta is recorded in its claim as soon as it is
    // made, so a late redo does not apply it again.
    let mut claim = claim;
    if applied.change.is_some() && applied.revision != made_revision {
        if let Some(c) = claim.take() {
            claim = Some(match c.key {
                ClaimKey::Keyed { .. } => {
                    let c = record_revision(broker, c, applied.revision).await;
                    if c.known.is_some() {
                        // The claim now holds the revision: it stays.
                        stored.store(true, Ordering::Relaxed);
                    }
                    c
                }
                ClaimKey::Consumed(_) => c,
            });
        }
    }
    envelope.state_revision = applied.revision;
    // Its position in the run: after the revision it hands over too (a
    // concurrent branch's delta may have landed since it was built).
    let built = clock::nanos(envelope.created_at.as_ref());
    if applied.position >= built {
        envelope.created_at = Some(broker.stamp(applied.position.saturating_add(1)));
    }
    let mut branch = branch;
    if let Some(b) = branch.as_mut() {
        b.arrived_at = envelope.created_at;
    }
    let answers = state_rules::answers(applied.before.as_deref(), &req.asks_for);

    // Commit: the payload by reference first (a retry writes it again).
    if let Some(pending) = pending {
        pending.put(broker).await?;
    }
    let (sequence, duplicate) = if req.r#final {
        (0, false)
    } else if let Some(result) = branch {
        let arrived = barriers::arrive(broker, &run, &barrier_id, result, barrier, stored).await?;
        if arrived.first.is_some() {
            return Ok(answer_first(
                broker,
                &run,
                req,
                consumed,
                arrived,
                (depth, &barrier_id, &branch_key),
            )
            .await);
        }
        (arrived.sequence, arrived.duplicate)
    } else {
        // One handoff per consumed delivery and target (a fan-out's
        // branches aside): the inbox deduplicates it by that slot, so two
        // attempts of one step that raced (a broker paused, or cut off
        // from NATS, that goes on after its redo took the claim over)
        // store one between them, within the dedupe window.
        let slotted = !req.fan_out && !broker.config().faults.skip_claim;
        let put = match consumed.filter(|_| slotted) {
            Some(token) => {
                let slot = format!("slot-{}-{}", token.handoff_id, req.target_agent);
                broker.store().put_handoff_again(&envelope, &slot).await?
            }
            None => broker.store().put_handoff(&envelope).await?,
        };
        if put.duplicate {
            // A retry: the stored copy's position is the one its delivery
            // follows (the inbox keeps it until it is settled).
            if let Ok(Some(first)) = broker.store().handoff_at(put.sequence).await {
                if first.envelope.id == envelope.id {
                    envelope.created_at = first.envelope.created_at;
                } else if let Some(token) = consumed {
                    // Another attempt's handoff holds the slot: it is the
                    // step's, and this one is answered with it.
                    stored.store(true, Ordering::Relaxed);
                    let receipt = pb::HandoffResponse {
                        handoff_id: first.envelope.id.clone(),
                        sequence: put.sequence,
                        duplicate: true,
                        depth: first.envelope.depth,
                        state_revision: first.envelope.state_revision,
                        ..Default::default()
                    };
                    let mut event = accepted_event(
                        &run,
                        req,
                        &receipt,
                        first.envelope.barrier_id.clone(),
                        first.envelope.branch_key.clone(),
                    );
                    event.position = clock::nanos(first.envelope.created_at.as_ref());
                    announce_again(broker, event).await;
                    if let Some(claim) = claim {
                        record_receipt(
                            broker,
                            claim,
                            pb::HandoffResponse {
                                duplicate: false,
                                ..receipt.clone()
                            },
                        )
                        .await;
                    }
                    deliveries::ack_consumed(broker, &run, token).await;
                    return Ok(receipt);
                }
            }
        }
        // Its delivery, about to be prepared here, needs the run as read.
        broker.remember_run(&run);
        stored.store(true, Ordering::Relaxed);
        schedule_queue_wait(broker, &run, &req.target_agent, put.sequence).await?;
        (put.sequence, put.duplicate)
    };

    // Notify: the event, the ack of the consumed delivery and the receipt
    // in its claim go out together.
    let receipt = pb::HandoffResponse {
        handoff_id: id.clone(),
        sequence,
        duplicate: false,
        depth,
        state_revision: applied.revision,
        ..Default::default()
    };
    let remember = async {
        if let Some(claim) = claim {
            record_receipt(broker, claim, receipt.clone()).await;
        }
    };
    let mut accepted = accepted_event(&run, req, &receipt, barrier_id, branch_key);
    // Decided with the handoff: before its delivery and its arrival.
    accepted.position = clock::nanos(envelope.created_at.as_ref());
    accepted.state_change = applied.change.clone();
    accepted.dropped_fields = dropped.clone();
    let mut reasks: Vec<String> = answers.keys().cloned().collect();
    reasks.sort();
    accepted.reasks = reasks;
    let msg_id = format!("accepted-{id}");
    if let Some(ends) = ends {
        // Its end, unless decided with its delta, is decided now; decided
        // otherwise, the handoff is refused, and its delta was not stored.
        let how = match applied.decided.take() {
            Some(how) => how,
            None => runs::decide_as(broker, &run, ends).await?,
        };
        if how.result_handoff_id != id {
            let status = status_name(how.status);
            runs::finish_decided(broker, &run.id, how).await;
            return Err(BrokerError::RunClosed {
                run: run.id.clone(),
                status,
            });
        }
        // The run's end is its: its claim stays, whatever fails below (a
        // retry finishes it).
        stored.store(true, Ordering::Relaxed);
        broker.emit(accepted, &msg_id).await?;
        let ended = runs::end(broker, &run.id, RunEnd::Decided(Box::new(how))).await?;
        if ended.result_handoff_id != id {
            return Err(BrokerError::RunClosed {
                run: run.id.clone(),
                status: status_name(ended.status),
            });
        }
        remember.await;
        if let Some(token) = consumed.filter(|_| !req.fan_out) {
            deliveries::ack_consumed(broker, &run, token).await;
        }
    } else {
        // The handoff is stored: the event and the ack go out together,
        // and the call answers once both are confirmed.
        let settles = consumed.filter(|_| !req.fan_out);
        // A retry (stored before) announces it again unless the run's
        // timeline holds it.
        let (published, (), ()) = tokio::join!(
            async {
                if duplicate && announced(broker, &run.id, &id).await {
                    return Ok(0);
                }
                broker.emit(accepted, &msg_id).await
            },
            async {
                if let Some(token) = settles {
                    deliveries::ack_consumed(broker, &run, token).await;
                }
            },
            remember
        );
        published?;
    }
    if !duplicate {
        guard::count_accepted(broker, req);
        let target = crate::metrics::target_label(&req.target_agent, req.r#final, req.to_barrier);
        for field in &dropped {
            broker
                .metrics()
                .dropped_field(&req.source_agent, target, field);
        }
        for _ in &answers {
            broker.metrics().stale_reask(&req.source_agent);
        }
    }
    tracing::debug!(run_id = %run.id, handoff_id = %id, target = %req.target_agent, depth, duplicate, tokens = checked.tokens, "handoff accepted");
    Ok(pb::HandoffResponse {
        handoff_id: id,
        sequence,
        duplicate,
        depth,
        state_revision: applied.revision,
        answers,
        dropped_fields: dropped,
    })
}

/// The answer to a second, different result for an arrived branch: the
/// first one's (the consumed delivery is settled, as by the first). The
/// first's `handoff_accepted` goes out again in case its call stopped
/// before it did (deduplicated against it within the dedupe window; past
/// it, the first's was published long ago).
async fn answer_first(
    broker: &Broker,
    run: &pb::Run,
    req: &pb::HandoffRequest,
    consumed: Option<&pb::DeliveryToken>,
    arrived: barriers::Arrived,
    (depth, barrier_id, branch_key): (u32, &str, &str),
) -> pb::HandoffResponse {
    let receipt = pb::HandoffResponse {
        handoff_id: arrived.first.unwrap_or_default(),
        sequence: arrived.sequence,
        duplicate: true,
        depth,
        ..Default::default()
    };
    let age = arrived
        .first_at
        .and_then(|t| std::time::SystemTime::try_from(t).ok())
        .and_then(|t| t.elapsed().ok());
    if age.is_some_and(|a| a < broker.config().dedupe_window) {
        let mut event = accepted_event(
            run,
            req,
            &receipt,
            barrier_id.to_string(),
            branch_key.to_string(),
        );
        event.position = clock::nanos(arrived.first_at.as_ref());
        announce_again(broker, event).await;
    }
    if let Some(token) = consumed.filter(|_| !req.fan_out) {
        deliveries::ack_consumed(broker, run, token).await;
    }
    receipt
}

/// Publishes again the `handoff_accepted` of a handoff another call
/// stored, in case that call stopped before it did: unless the run's
/// timeline holds it (JetStream's deduplication alone does not outlive a
/// restart of the NATS node that leads the events stream), and else
/// deduplicated against it.
async fn announce_again(broker: &Broker, event: pb::Event) {
    if !announced(broker, &event.run_id, &event.handoff_id).await {
        let msg_id = format!("accepted-{}", event.handoff_id);
        broker.emit_unconfirmed(event, msg_id).await;
    }
}

/// Whether the run's timeline holds the `handoff_accepted` of `handoff_id`
/// (`false` when it cannot be read: it is published again, deduplicated).
async fn announced(broker: &Broker, run_id: &str, handoff_id: &str) -> bool {
    match broker.store().run_events(run_id).await {
        Ok(timeline) => timeline
            .iter()
            .any(|e| e.kind == pb::EventKind::HandoffAccepted as i32 && e.handoff_id == handoff_id),
        Err(e) => {
            tracing::debug!(error = %e, "timeline not read; the acceptance is published again");
            false
        }
    }
}

/// Schedules the end of the target's `max_queue_wait` for a handoff just
/// stored (idempotent: a retry schedules the same timer).
async fn schedule_queue_wait(
    broker: &Broker,
    run: &pb::Run,
    target: &str,
    sequence: u64,
) -> Result<(), BrokerError> {
    let wait = match broker.agent(target).await {
        Ok(spec) => spec
            .max_queue_wait
            .and_then(|d| std::time::Duration::try_from(d).ok()),
        Err(_) => None,
    };
    let Some(wait) = wait else {
        return Ok(());
    };
    let timer = pb::Timer {
        run_id: run.id.clone(),
        due: Some((std::time::SystemTime::now() + wait).into()),
        agent: target.to_string(),
        sequence,
        ..Default::default()
    };
    broker.store().schedule(&timer, TimerKind::QueueWait).await
}
