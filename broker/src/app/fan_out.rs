//! `FanOut`: open a barrier and accept one handoff per branch in one call
//! (a chord), so no branch can finish before its barrier exists.

use futures::{StreamExt, TryStreamExt};
use handoff_proto::pb;

use crate::{
    app::{access, auth::Caller, barriers, deliveries, handoff, Broker},
    error::{BrokerError, Reason},
    rules::barrier,
    store::ClaimKey,
};

/// Opens a barrier and accepts one handoff per branch, each tagged with
/// the barrier and its key. Branches that consume a delivery fan it out;
/// that delivery is acked once every branch is stored.
pub async fn fan_out(
    broker: &Broker,
    caller: &Caller,
    req: pb::FanOutRequest,
) -> Result<pb::FanOutResponse, BrokerError> {
    let spec = barriers::required(req.barrier)?;
    let keys = barrier::branch_keys(&spec).map_err(barriers::spec_error)?;
    if req.branches.is_empty() {
        return Err(BrokerError::malformed(
            "branches",
            "branches is empty: a fan-out hands off at least one branch",
        ));
    }
    let known: std::collections::HashSet<&str> = keys.iter().map(String::as_str).collect();
    let mut seen = std::collections::HashSet::new();
    let consumes = req.branches[0].consumes.clone();
    for (i, b) in req.branches.iter().enumerate() {
        if !known.contains(b.branch_key.as_str()) {
            return Err(BrokerError::invalid(
                Reason::UnknownBranchKey,
                format!("branches[{i}].branch_key"),
                format!(
                    "branches[{i}].branch_key {:?} is not a branch of barrier {:?}",
                    b.branch_key, spec.barrier_id
                ),
            ));
        }
        if !seen.insert(b.branch_key.as_str()) {
            return Err(BrokerError::invalid(
                Reason::UnknownBranchKey,
                format!("branches[{i}].branch_key"),
                format!("branches[{i}]: branch {:?} appears twice", b.branch_key),
            ));
        }
        if !b.run_id.is_empty() && b.run_id != spec.run_id {
            return Err(BrokerError::malformed(
                format!("branches[{i}].run_id"),
                format!(
                    "branches[{i}] names run {:?}, the barrier's is {:?}",
                    b.run_id, spec.run_id
                ),
            ));
        }
        if b.consumes != consumes {
            return Err(BrokerError::malformed(
                format!("branches[{i}].consumes"),
                "every branch of a fan-out consumes the same delivery (or none)",
            ));
        }
        if b.r#final || b.to_barrier || !b.barrier_id.is_empty() && b.barrier_id != spec.barrier_id
        {
            return Err(BrokerError::malformed(
                format!("branches[{i}]"),
                format!("branches[{i}] must be a handoff to an agent, without another barrier"),
            ));
        }
    }
    // Who may (see `access`): every branch's sender, and the run's owner
    // or the holder of the live delivery the branches consume, before
    // the barrier is opened or anything is checked against a contract.
    let token = match consumes.as_str() {
        "" => None,
        id => Some(access::decode(broker, id).await?),
    };
    access::precheck(
        broker,
        caller,
        &spec.run_id,
        req.branches.iter().map(|b| b.source_agent.as_str()),
        token.as_ref(),
    )
    .await?;
    let (run, record, claim) = tokio::join!(
        broker.store().run(&spec.run_id),
        async {
            match &token {
                Some(t) => broker
                    .store()
                    .lease(&t.agent, t.stream_sequence)
                    .await
                    .map(Some),
                None => Ok(None),
            }
        },
        async {
            match &token {
                Some(t) => {
                    broker
                        .store()
                        .claim(&ClaimKey::consumed(&t.handoff_id))
                        .await
                }
                None => Ok(None),
            }
        },
    );
    let run = run?.map(|(r, _)| r);
    let claim = claim?;
    let record = record?;
    if let (Some(token), Some(run)) = (&token, run.as_ref()) {
        // A delivery signed before deliveries named their run: its run is
        // the stored handoff's.
        if token.run_id.is_empty() {
            access::delivery_of_run(broker, token, &run.id).await?;
        }
    }
    let lives = match (&token, record) {
        // (A redo of a fan-out this attempt stored and acked without
        // recording it: its branches are recognised by their ids.)
        (Some(t), Some(record)) => {
            let held = claim.as_ref().map(|(c, _)| c);
            Some(access::consumed_right(broker, t, record, held).await)
        }
        _ => None,
    };
    if let (Some(run), Some((claim, _))) = (run.as_ref(), claim) {
        // A redo of a fan-out from this delivery (its items may differ),
        // even once the delivery is settled: the first one's barrier and
        // branches answer it.
        if claim.fan_out && !claim.barrier_id.is_empty() && !claim.stored.is_empty() {
            let barrier = broker
                .store()
                .barrier(&run.id, &claim.barrier_id)
                .await?
                .map(|(b, _)| b);
            deliveries::settle_consumed(broker, &run.id, &consumes).await?;
            let branches = claim
                .stored
                .into_iter()
                .map(|r| pb::HandoffResponse {
                    duplicate: true,
                    ..r
                })
                .collect();
            return Ok(pb::FanOutResponse { barrier, branches });
        }
    }
    access::may_act(broker, caller, &spec.run_id, run.as_ref(), lives).await?;
    let opened = barriers::open_spec(broker, spec.clone()).await?;
    let branches: Vec<pb::HandoffRequest> = req
        .branches
        .into_iter()
        .map(|mut b| {
            b.run_id = spec.run_id.clone();
            b.barrier_id = spec.barrier_id.clone();
            if b.idempotency_key.is_empty() {
                b.idempotency_key = format!("fan-out/{}/{}", spec.barrier_id, b.branch_key);
            }
            b.fan_out = !b.consumes.is_empty();
            b
        })
        .collect();
    let answers: Vec<pb::HandoffResponse> = futures::stream::iter(branches)
        .map(|b| handoff::accept_as(broker, caller, b, handoff::Receipts::Caller))
        .buffered(16)
        .try_collect()
        .await?;
    if let Some(token) = &token {
        record_fan_out(broker, token, &spec.barrier_id, &answers).await;
        deliveries::settle_consumed(broker, &spec.run_id, &consumes).await?;
    }
    Ok(pb::FanOutResponse {
        barrier: opened.barrier,
        branches: answers,
    })
}

/// Records a fan-out's barrier and branch receipts in the consumed
/// delivery's claim, together, so a redo is answered with them. A failure
/// is logged: a redo then opens the same barrier and repeats the same
/// branches, recognised within the dedupe window.
async fn record_fan_out(
    broker: &Broker,
    token: &pb::DeliveryToken,
    barrier_id: &str,
    answers: &[pb::HandoffResponse],
) {
    let store = broker.store();
    let update = |claim: &mut pb::ConsumeClaim| {
        claim.fan_out = true;
        claim.barrier_id = barrier_id.to_string();
        for a in answers {
            if !claim.stored.iter().any(|r| r.handoff_id == a.handoff_id) {
                claim.stored.push(pb::HandoffResponse {
                    duplicate: false,
                    ..a.clone()
                });
            }
        }
        if claim.stored_at.is_none() {
            claim.stored_at = Some(crate::app::now());
        }
    };
    let key = ClaimKey::consumed(&token.handoff_id);
    for _ in 0..20 {
        let written = match store.claim(&key).await {
            Ok(Some((mut claim, revision))) => {
                update(&mut claim);
                store
                    .update_claim(&key, &claim, revision)
                    .await
                    .map(|r| r.is_some())
            }
            Ok(None) => {
                let mut claim = pb::ConsumeClaim {
                    attempt: token.attempt,
                    ..Default::default()
                };
                update(&mut claim);
                store
                    .claim_consumed(&key, &claim)
                    .await
                    .map(|c| matches!(c, crate::store::Claim::Made(_)))
            }
            Err(e) => Err(e),
        };
        match written {
            Ok(true) => return,
            Ok(false) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "fan-out not recorded in the claim");
                return;
            }
        }
    }
    tracing::warn!(barrier_id, "fan-out not recorded: the claim kept changing");
}
