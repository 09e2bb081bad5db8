//! Decide what a handoff does, on what was read: a redo the claim on the
//! consumed delivery answers; a refusal (the right to the run, the
//! contract guards, a claim another request holds); or what to commit.
//! What the claim makes of it is [`rules::rule_claim`]'s to say (pure);
//! this executes the ruling.

use handoff_proto::pb;

use super::{
    commit::{accepted_event, branch_of, Read, Receipt},
    read::Reads,
    Claim, ClaimKey,
};
use crate::{
    app::{access, auth::Caller, deliveries, guard, guard::Checked, payloads, Broker},
    error::BrokerError,
    rules::handoff::{self as rules, ClaimRuling},
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
        receipt: Option<Box<Receipt>>,
    },
}

/// The contract guards of a payload carried inline (`None`: it comes by
/// reference, fetched only once the caller's right to the run is known).
/// They only read (the agents, from memory once caches are warm): what
/// they found is published, counted or answered by [`plan`] alone.
pub(super) async fn guard_inline(
    broker: &Broker,
    req: &pb::HandoffRequest,
) -> Option<Result<Checked, guard::Guarded>> {
    match req.payload_ref {
        Some(_) => None,
        None => Some(guard::guard(broker, req).await),
    }
}

/// Decides, on `reads` and what the guards found (`guarded`, else run
/// here), what the handoff `req` of `caller` does. `made`
/// is the claim this request took (cleared when it must stay), `known`
/// the claim as this request knows it.
///
/// A keyed handoff that consumes nothing claims its key, kept with its
/// run, once the caller's right to the run is known (one more round trip,
/// for these handoffs only; none for a fan-out's branches, whose receipts
/// the fan-out records): a redo, however late and however many revisions
/// followed, is answered from the receipt recorded there, and finds the
/// revision its delta made.
#[allow(clippy::too_many_arguments)]
pub(super) async fn plan(
    broker: &Broker,
    caller: &Caller,
    req: &mut pb::HandoffRequest,
    consumed: Option<&pb::DeliveryToken>,
    id: &str,
    reads: Reads,
    guarded: Option<Result<Checked, guard::Guarded>>,
    made: &mut Option<(ClaimKey, u64)>,
    known: &mut Option<(pb::ConsumeClaim, u64)>,
    receipts: super::Receipts,
) -> Result<Plan, BrokerError> {
    let Reads {
        run,
        parent,
        claim,
        barrier,
        lease,
        mine,
        mut key,
    } = reads;
    let run = run?.map(|(r, _)| r);
    let held = match claim? {
        Some(Claim::Held(first, revision)) => Some((first, revision)),
        _ => None,
    };
    let lives = match (&consumed, lease?) {
        (Some(token), Some(record)) => {
            // (A redo whose receipt never reached the claim is
            // recognised below by the store, and its receipt recorded.)
            let first = held.as_ref().map(|(first, _)| first);
            Some(access::consumed_right(broker, token, record, first).await)
        }
        _ => None,
    };
    let ruling = match consumed {
        Some(token) => {
            let first = held.as_ref().map(|(first, _)| first);
            let age = first
                .and_then(|f| f.stored_at)
                .and_then(|t| std::time::SystemTime::try_from(t).ok())
                .and_then(|t| t.elapsed().ok());
            let lives = lives.as_ref().map(Result::is_ok);
            let window = broker.config().dedupe_window;
            rules::rule_claim(first, req, id, token, lives, age, window)
        }
        None => ClaimRuling::Proceed,
    };
    match (&ruling, &consumed, run.as_ref()) {
        (
            ClaimRuling::Redo {
                receipt,
                republish,
                ack,
            },
            Some(token),
            Some(run),
        ) => {
            // The consumed handoff left its inbox once acked: then the
            // event published again names the branch the request names
            // (it is deduplicated against the first anyway).
            if *republish {
                let parent = match parent {
                    Err(BrokerError::DeliveryGone(_)) => None,
                    other => other?,
                };
                let (barrier_id, branch_key) = branch_of(&*req, parent.as_ref());
                let event = accepted_event(run, req, receipt, barrier_id, branch_key);
                broker
                    .emit(event, &format!("accepted-{}", receipt.handoff_id))
                    .await?;
            }
            if *ack {
                deliveries::ack_consumed(broker, run, token).await;
            }
            return Ok(Plan::Answered(pb::HandoffResponse {
                duplicate: true,
                ..receipt.clone()
            }));
        }
        (ClaimRuling::Confused { message, metadata }, _, _) => {
            return Err(BrokerError::Refused {
                reason: crate::error::Reason::RoleConfusion,
                message: message.clone(),
                metadata: metadata.clone(),
            });
        }
        _ => {}
    }
    // Who may: the run's owner, or the holder of a live delivery of
    // the run; nothing about the run or the target is checked, read
    // or written for anyone else.
    access::may_act(broker, caller, &req.run_id, run.as_ref(), lives).await?;
    let Some(run) = run else {
        return Err(BrokerError::RunNotFound(req.run_id.clone()));
    };
    // A keyed handoff that consumes nothing: its key claimed, or found
    // claimed by an earlier attempt.
    let mut made_revision = 0;
    let mut held = held;
    if consumed.is_none() && !req.idempotency_key.is_empty() && receipts == super::Receipts::Each {
        let on = ClaimKey::Keyed {
            run_id: run.id.clone(),
            handoff_id: id.to_string(),
        };
        match broker.store().claim_consumed(&on, &mine).await? {
            Claim::Made(revision) => {
                *made = Some((on.clone(), revision));
                *known = Some((mine.clone(), revision));
            }
            Claim::Held(first, revision) => held = Some((first, revision)),
        }
        key = Some(on);
    }
    if let (None, Some((first, revision))) = (consumed, &held) {
        if let Some(receipt) = first.stored.iter().find(|r| r.handoff_id == id) {
            let age = first
                .stored_at
                .and_then(|t| std::time::SystemTime::try_from(t).ok())
                .and_then(|t| t.elapsed().ok());
            if age.is_some_and(|age| age < broker.config().dedupe_window) {
                // Its event again, in case it was lost (deduplicated
                // against the first within the window).
                let (barrier_id, branch_key) = branch_of(&*req, None);
                let event = accepted_event(&run, req, receipt, barrier_id, branch_key);
                broker.emit(event, &format!("accepted-{id}")).await?;
            }
            return Ok(Plan::Answered(pb::HandoffResponse {
                duplicate: true,
                ..receipt.clone()
            }));
        }
        // Claimed by an attempt that stored no handoff (yet): this one
        // goes on, with the revision its delta made, if it made one.
        made_revision = first.state_revision;
        *known = Some((first.clone(), *revision));
    }
    let parent = parent?;
    // A payload by reference is fetched and checked against its size
    // and digest, so the guards see it whole.
    let forwarded = payloads::resolve_request(broker, req).await?;
    // The contract guards, answered from memory once caches are warm.
    let outcome = match guarded {
        Some(outcome) => outcome,
        None => guard::guard(broker, req).await,
    };
    let checked = guard::enforce(broker, req, outcome).await?;
    if let (Some((first, revision)), Some(token)) = (held, &consumed) {
        if ruling == ClaimRuling::TakeOver {
            // Left by an earlier attempt that stored nothing (it died
            // between claiming and storing): the redo takes it over.
            let on = ClaimKey::consumed(&token.handoff_id);
            let taken = broker.store().update_claim(&on, &mine, revision).await?;
            match taken {
                Some(next) => {
                    *made = Some((on, next));
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
        made_revision,
    };
    Ok(Plan::Commit {
        read: Box::new(read),
        checked,
        receipt: key.map(|key| {
            Box::new(Receipt {
                key,
                mine,
                known: known.take(),
            })
        }),
    })
}
