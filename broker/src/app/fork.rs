//! Restarting from a known-good state: `ForkRun`.

use handoff_proto::pb;

use crate::{
    app::{access, auth::Caller, guard, handoff, runs, state, Broker},
    error::{BrokerError, Reason},
    rules::{grants::Action, names},
};

/// Forks run `req.run_id` for a caller with `own` on its owner (anyone
/// else is answered as if the run did not exist): a new run with the
/// parent's owner, pinned context, pipeline, depth cap and judge, whose
/// state is the parent's at `at_revision`, then its first handoff (made
/// as the caller, like any handoff). The parent's timeline gets
/// `run_forked`; the parent itself is not changed.
pub async fn fork(
    broker: &Broker,
    caller: &Caller,
    req: pb::ForkRunRequest,
) -> Result<pb::ForkRunResponse, BrokerError> {
    names::validate("run_id", &req.run_id)?;
    names::validate_optional("new_run_id", &req.new_run_id)?;
    let Some(mut first) = req.handoff else {
        return Err(BrokerError::malformed("handoff", "handoff is required"));
    };
    if !first.run_id.is_empty() || !first.consumes.is_empty() {
        return Err(BrokerError::malformed(
            "handoff",
            "the first handoff of a fork names no run and consumes nothing",
        ));
    }
    let (parent, _) = broker.run(&req.run_id).await?;
    if !caller.may(Action::Own, &parent.owner) {
        return Err(access::hidden(broker, caller, &parent).await);
    }
    // The first handoff is checked before the run is made, so a refused
    // one leaves no run behind: its source, its target and its contract
    // (refused without an event: there is no run yet to tell).
    access::precheck(broker, caller, "", [first.source_agent.as_str()], None).await?;
    if !first.r#final && !first.to_barrier {
        names::validate("handoff.target_agent", &first.target_agent)?;
        broker.agent(&first.target_agent).await?;
    }
    if first.payload.is_some() {
        let outcome = guard::guard(broker, &first).await;
        guard::enforce(broker, &first, outcome).await?;
    }
    let seed = match req.at_revision {
        0 => None,
        revision => {
            let latest = state::latest(broker, &parent.id)
                .await?
                .map_or(0, |l| l.revision);
            let record = if revision <= latest {
                state::at(broker, &parent.id, revision).await?
            } else {
                None
            };
            let record = record.ok_or_else(|| BrokerError::Refused {
                reason: Reason::StateRevisionNotFound,
                message: format!(
                    "run {:?} has no state revision {revision}; its latest is {latest}",
                    parent.id
                ),
                metadata: vec![
                    ("run_id", parent.id.clone()),
                    ("revision", revision.to_string()),
                    ("latest_revision", latest.to_string()),
                ],
            })?;
            Some(pb::StateSeed {
                values: record
                    .entries
                    .iter()
                    .filter_map(|(k, e)| e.value.clone().map(|v| (k.clone(), v)))
                    .collect(),
                pinned_keys: record.pinned_keys.clone(),
                policies: record.policies.clone(),
            })
        }
    };
    let start = pb::StartRunRequest {
        run_id: req.new_run_id.clone(),
        owner: parent.owner.clone(),
        timeout: req.timeout,
        max_depth: parent.max_depth,
        pinned: parent.pinned.clone(),
        pipeline: parent.pipeline.clone(),
        state: seed,
        judge: parent.judge.clone(),
        ..Default::default()
    };
    let link = Some((parent.id.clone(), req.at_revision));
    let child = runs::start_linked(broker, caller, start, link)
        .await?
        .run
        .ok_or_else(|| BrokerError::Internal("a run started without its record".to_string()))?;
    let event = pb::Event {
        kind: pb::EventKind::RunForked as i32,
        run_id: parent.id.clone(),
        owner: parent.owner.clone(),
        related_run_id: child.id.clone(),
        run_status: parent.status,
        pipeline: parent.pipeline.clone(),
        state_change: Some(pb::StateChange {
            revision: req.at_revision,
            ..Default::default()
        }),
        ..Default::default()
    };
    broker
        .emit(event, &format!("forked-{}-{}", parent.id, child.id))
        .await?;
    first.run_id = child.id.clone();
    let receipt = handoff::accept(broker, caller, first).await?;
    tracing::info!(parent = %parent.id, run_id = %child.id, at_revision = req.at_revision, "run forked");
    Ok(pb::ForkRunResponse {
        run: Some(child),
        handoff: Some(receipt),
    })
}
