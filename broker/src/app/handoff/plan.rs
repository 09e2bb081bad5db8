//! Decide what a handoff does, on what was read: a redo the claim on the
//! consumed delivery answers; a refusal (the right to the run, the
//! contract guards, a claim another request holds); or what to commit.

use handoff_proto::pb;

use super::{
    commit::{accepted_event, branch_of, stored_receipt, Read},
    read::Reads,
    Claim,
};
use crate::{
    app::{access, auth::Caller, deliveries, guard, guard::Checked, payloads, Broker},
    error::BrokerError,
};

/// What a handoff does.
pub(super) enum Plan {
    /// Answered without storing anything (a redo of what is stored).
    Answered(pb::HandoffResponse),
    /// Commit it: what was read, what the guards found, and the claim to
    /// record its receipt into (none: the caller records it).
    Commit {
        read: Box<Read>,
        checked: Checked,
        receipt: Option<(pb::ConsumeClaim, Option<(pb::ConsumeClaim, u64)>)>,
    },
}

/// Decides, on `reads`, what the handoff `req` of `caller` does. `made`
/// is the claim this request took (cleared when it must stay), `known`
/// the claim as this request knows it.
#[allow(clippy::too_many_arguments)]
pub(super) async fn plan(
    broker: &Broker,
    caller: &Caller,
    req: &mut pb::HandoffRequest,
    consumed: Option<&pb::DeliveryToken>,
    id: &str,
    reads: Reads,
    made: &mut Option<(String, u64)>,
    known: &mut Option<(pb::ConsumeClaim, u64)>,
) -> Result<Plan, BrokerError> {
    let Reads {
        run,
        parent,
        claim,
        barrier,
        lease,
        mine,
    } = reads;
    let run = run?.map(|(r, _)| r);
    let claim = claim?;
    let lives = match (&consumed, lease?) {
        (Some(token), Some(record)) => {
            // (A redo whose receipt never reached the claim is
            // recognised below by the store, and its receipt recorded.)
            let held = match &claim {
                Some(Claim::Held(first, _)) => Some(first),
                _ => None,
            };
            Some(access::consumed_right(broker, token, record, held).await)
        }
        _ => None,
    };
    if let (Some(Claim::Held(first, _)), Some(token), Some(run)) = (&claim, &consumed, run.as_ref())
    {
        if let Some(receipt) = stored_receipt(first, req, id) {
            // A redo (or a retry) of what this delivery stored: the
            // claim answers it, however long ago, whatever its content,
            // even once the delivery is settled. Within the dedupe
            // window its event is published again (deduplicated), in
            // case the first call failed on it.
            // The consumed handoff left its inbox once acked: then
            // the event published again names the branch the request
            // names (it is deduplicated against the first anyway).
            let parent = match parent {
                Err(BrokerError::DeliveryGone(_)) => None,
                other => other?,
            };
            let recent = first
                .stored_at
                .and_then(|t| std::time::SystemTime::try_from(t).ok())
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age < broker.config().dedupe_window);
            if recent {
                let (barrier_id, branch_key) = branch_of(&*req, parent.as_ref());
                let event = accepted_event(run, req, &receipt, barrier_id, branch_key);
                broker
                    .emit(event, &format!("accepted-{}", receipt.handoff_id))
                    .await?;
            }
            // A fan-out handoff leaves the delivery to its agent's ack;
            // one whose lease is gone was settled already (or is
            // another attempt's to settle).
            if !req.fan_out && matches!(lives, Some(Ok(()))) {
                deliveries::ack_consumed(broker, run, token).await;
            }
            return Ok(Plan::Answered(pb::HandoffResponse {
                duplicate: true,
                ..receipt
            }));
        }
    }
    if let (Some(Err(_)), Some(Claim::Held(first, _)), Some(token)) = (&lives, &claim, &consumed) {
        // A delivery already consumed by a handoff to another target:
        // that is the cause to name, rather than the settlement it
        // made (nothing is checked or published for a delivery whose
        // lease is gone).
        if let Some((message, metadata)) = guard::role_confusion(token, first, &mine) {
            return Err(BrokerError::Refused {
                reason: crate::error::Reason::RoleConfusion,
                message,
                metadata,
            });
        }
    }
    // Who may: the run's owner, or the holder of a live delivery of
    // the run; nothing about the run or the target is checked, read
    // or written for anyone else.
    access::may_act(broker, caller, &req.run_id, run.as_ref(), lives).await?;
    let Some(run) = run else {
        return Err(BrokerError::RunNotFound(req.run_id.clone()));
    };
    let parent = parent?;
    // A payload by reference is fetched and checked against its size
    // and digest, so the guards see it whole.
    let forwarded = payloads::resolve_request(broker, req).await?;
    // The contract guards, answered from memory once caches are warm.
    let checked = guard::enforce(broker, req, guard::guard(broker, req).await).await?;
    if let (Some(Claim::Held(first, revision)), Some(token)) = (claim, &consumed) {
        if first.stored.is_empty() && first.attempt < token.attempt {
            // Left by an earlier attempt that stored nothing (it died
            // between claiming and storing): the redo takes it over.
            let taken = broker
                .store()
                .update_claim(&token.handoff_id, &mine, revision)
                .await?;
            match taken {
                Some(next) => {
                    *made = Some((token.handoff_id.clone(), next));
                    *known = Some((mine.clone(), next));
                }
                None => {
                    return Err(BrokerError::Unavailable(
                        "the consumed delivery's claim changed meanwhile; retry".to_string(),
                    ))
                }
            }
        } else {
            guard::check_claim(broker, req, token, &first, &mine, &checked).await?;
            *known = Some((first, revision));
        }
    }
    if consumed.is_some() && broker.config().faults.die_after_claim {
        tracing::warn!("fault injected: the broker dies between claiming and storing");
        *made = None;
        return Err(BrokerError::Unavailable(
            "fault injected: died between claiming and storing".to_string(),
        ));
    }
    let read = Read {
        run,
        parent,
        barrier: barrier?,
        forwarded,
    };
    Ok(Plan::Commit {
        read: Box::new(read),
        checked,
        receipt: consumed.map(|_| (mine, known.take())),
    })
}
