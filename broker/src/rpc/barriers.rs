//! Barriers: `OpenBarrier`, `FanOut`, `GetBarrier`, and the arrival of
//! branch results.
//!
//! A barrier is one key/value entry (`handoff_barriers`, key
//! `<run>.<barrier>`) changed only by compare-and-set, so replicas racing
//! on the last branch agree on one release. A branch result is first
//! stored in the `HANDOFF_BRANCHES` stream (deduplicated by its handoff
//! id), then applied to the entry; a result that arrives before its barrier
//! is opened stays in the stream and is applied when the barrier opens.
//!
//! Release is exactly once: the compare-and-set that moves the barrier to
//! RELEASED (or FAILED) also stores the release payload; the winner then
//! publishes the release handoff under a deterministic id (deduplicated by
//! JetStream) and marks it published. A durable timer scheduled before the
//! compare-and-set re-publishes a release whose broker died in between.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, SystemTime},
};

use handoff_proto::pb;
use prost::Message as _;

use crate::{
    barrier::{self, Arrival, Decision},
    broker::{now, status_name, Broker},
    error::BrokerError,
    store, timers,
};

/// How long after a release its publication is checked again.
const RELEASE_CHECK: Duration = Duration::from_secs(5);

/// The id of a barrier's release handoff.
pub fn release_id(run_id: &str, barrier_id: &str) -> String {
    crate::domain::derived_id(&format!("barrier\u{0}{run_id}\u{0}{barrier_id}"))
}

fn spec_error(e: barrier::BarrierError) -> BrokerError {
    BrokerError::Malformed(e.to_string())
}

/// Opens a barrier (idempotent for the same spec), applies branch results
/// that arrived before it, and schedules its timeout.
pub async fn open(
    broker: &Broker,
    req: pb::OpenBarrierRequest,
) -> Result<pb::OpenBarrierResponse, BrokerError> {
    let spec = req
        .barrier
        .ok_or_else(|| BrokerError::Malformed("barrier is required".to_string()))?;
    open_spec(broker, spec).await
}

async fn open_spec(
    broker: &Broker,
    spec: pb::BarrierSpec,
) -> Result<pb::OpenBarrierResponse, BrokerError> {
    barrier::branch_keys(&spec).map_err(spec_error)?;
    let (run, _) = broker.run(&spec.run_id).await?;
    let status = pb::RunStatus::try_from(run.status).unwrap_or(pb::RunStatus::Unspecified);
    if status.is_terminal() {
        return Err(BrokerError::RunClosed {
            run: run.id.clone(),
            status: status_name(run.status),
        });
    }
    broker.agent(&spec.target_agent).await?;
    let fresh = barrier::open(spec.clone(), now());
    let created = broker.store().create_barrier(&fresh).await?;
    if !created {
        let (existing, _) = broker
            .store()
            .barrier(&spec.run_id, &spec.barrier_id)
            .await?
            .ok_or_else(|| BrokerError::Internal("barrier vanished".to_string()))?;
        if !barrier::same_spec(&existing.spec.clone().unwrap_or_default(), &spec) {
            return Err(BrokerError::BarrierExists(format!(
                "barrier {:?} of run {:?} is already open with another spec",
                spec.barrier_id, spec.run_id
            )));
        }
    }
    if let Some(timeout) = spec.timeout.and_then(|d| Duration::try_from(d).ok()) {
        let due = SystemTime::now() + timeout;
        timers::schedule_barrier(
            broker,
            &spec.run_id,
            &spec.barrier_id,
            due.into(),
            "timeout",
        )
        .await?;
    }
    broker
        .emit(
            pb::Event {
                kind: pb::EventKind::BarrierOpened as i32,
                run_id: run.id.clone(),
                owner: run.owner.clone(),
                agent: spec.target_agent.clone(),
                barrier_id: spec.barrier_id.clone(),
                ..Default::default()
            },
            &format!("opened-{}-{}", run.id, spec.barrier_id),
        )
        .await?;
    // Branch results that were stored before the barrier existed.
    for result in broker
        .store()
        .branch_results(&spec.run_id, &spec.barrier_id)
        .await?
    {
        apply(broker, &run, &spec.barrier_id, result).await?;
    }
    let (barrier, _) = broker
        .store()
        .barrier(&spec.run_id, &spec.barrier_id)
        .await?
        .ok_or_else(|| BrokerError::Internal("barrier vanished".to_string()))?;
    Ok(pb::OpenBarrierResponse {
        barrier: Some(barrier),
        created,
    })
}

/// A barrier's state.
pub async fn get(
    broker: &Broker,
    req: pb::GetBarrierRequest,
) -> Result<pb::GetBarrierResponse, BrokerError> {
    crate::names::validate("run_id", &req.run_id)?;
    crate::names::validate("barrier_id", &req.barrier_id)?;
    let (barrier, _) = broker
        .store()
        .barrier(&req.run_id, &req.barrier_id)
        .await?
        .ok_or_else(|| {
            BrokerError::BarrierNotFound(format!(
                "barrier {:?} of run {:?} not found",
                req.barrier_id, req.run_id
            ))
        })?;
    Ok(pb::GetBarrierResponse {
        barrier: Some(barrier),
    })
}

/// Stores a branch result durably (setting `stored`), then applies it to
/// its barrier if the barrier is open yet. Idempotent: the same handoff id
/// stores once and counts once. Returns the stream sequence and whether
/// the result was a duplicate.
pub async fn arrive(
    broker: &Broker,
    run: &pb::Run,
    barrier_id: &str,
    result: pb::BranchResult,
    stored: &AtomicBool,
) -> Result<(u64, bool), BrokerError> {
    let ack = broker
        .store()
        .publish(
            store::branch_subject(&run.id, barrier_id, &result.key),
            &result.handoff_id,
            result.encode_to_vec().into(),
        )
        .await?;
    stored.store(true, Ordering::Relaxed);
    apply(broker, run, barrier_id, result).await?;
    Ok((ack.sequence, ack.duplicate))
}

/// Opens a barrier and accepts one handoff per branch, each tagged with
/// the barrier and its key. Branches that consume a delivery fan it out;
/// that delivery is acked once every branch is stored.
pub async fn fan_out(
    broker: &Broker,
    req: pb::FanOutRequest,
) -> Result<pb::FanOutResponse, BrokerError> {
    use futures::{StreamExt, TryStreamExt};
    let spec = req
        .barrier
        .ok_or_else(|| BrokerError::Malformed("barrier is required".to_string()))?;
    let keys = barrier::branch_keys(&spec).map_err(spec_error)?;
    if req.branches.is_empty() {
        return Err(BrokerError::Malformed(
            "branches is empty: a fan-out hands off at least one branch".to_string(),
        ));
    }
    let known: std::collections::HashSet<&str> = keys.iter().map(String::as_str).collect();
    let mut seen = std::collections::HashSet::new();
    let consumes = req.branches[0].consumes.clone();
    for (i, b) in req.branches.iter().enumerate() {
        if !known.contains(b.branch_key.as_str()) {
            return Err(BrokerError::Malformed(format!(
                "branches[{i}].branch_key {:?} is not a branch of barrier {:?}",
                b.branch_key, spec.barrier_id
            )));
        }
        if !seen.insert(b.branch_key.as_str()) {
            return Err(BrokerError::Malformed(format!(
                "branches[{i}]: branch {:?} appears twice",
                b.branch_key
            )));
        }
        if !b.run_id.is_empty() && b.run_id != spec.run_id {
            return Err(BrokerError::Malformed(format!(
                "branches[{i}] names run {:?}, the barrier's is {:?}",
                b.run_id, spec.run_id
            )));
        }
        if b.consumes != consumes {
            return Err(BrokerError::Malformed(
                "every branch of a fan-out consumes the same delivery (or none)".to_string(),
            ));
        }
        if b.r#final || b.to_barrier || !b.barrier_id.is_empty() && b.barrier_id != spec.barrier_id
        {
            return Err(BrokerError::Malformed(format!(
                "branches[{i}] must be a handoff to an agent, without another barrier"
            )));
        }
    }
    let opened = open_spec(broker, spec.clone()).await?;
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
        .map(|b| crate::rpc::handoff::handoff(broker, b))
        .buffered(16)
        .try_collect()
        .await?;
    if !consumes.is_empty() {
        crate::rpc::handoff::settle_consumed(broker, &spec.run_id, &consumes).await?;
    }
    Ok(pb::FanOutResponse {
        barrier: opened.barrier,
        branches: answers,
    })
}

/// Applies one branch result to the barrier with compare-and-set, and
/// releases it when it is satisfied. `None` when the barrier is not open
/// yet (the result waits in the branch stream).
pub async fn apply(
    broker: &Broker,
    run: &pb::Run,
    barrier_id: &str,
    result: pb::BranchResult,
) -> Result<Option<pb::Barrier>, BrokerError> {
    loop {
        let Some((mut b, revision)) = broker.store().barrier(&run.id, barrier_id).await? else {
            return Ok(None);
        };
        let arrival = barrier::arrive(&mut b, result.clone());
        let key = result.key.clone();
        match arrival {
            Arrival::Duplicate | Arrival::UnknownKey => {
                if let Arrival::UnknownKey = arrival {
                    tracing::warn!(run_id = %run.id, barrier_id, key, "branch result for a key the barrier does not have");
                }
                return Ok(Some(b));
            }
            Arrival::Late => {
                if !broker.store().update_barrier(&b, revision).await? {
                    continue;
                }
                broker.emit_detached(
                    branch_event(run, &b, pb::EventKind::BranchLate, &result),
                    format!("late-{}-{barrier_id}-{key}", run.id),
                );
                return Ok(Some(b));
            }
            Arrival::Counted => {}
        }
        let release = match barrier::decide(&b, false) {
            Decision::Wait => None,
            Decision::Release { failure, timed_out } => {
                Some(prepare_release(broker, run, &mut b, failure, timed_out).await?)
            }
        };
        if !broker.store().update_barrier(&b, revision).await? {
            continue;
        }
        broker.emit_detached(
            branch_event(run, &b, pb::EventKind::BranchArrived, &result),
            format!("arrived-{}-{barrier_id}-{key}", run.id),
        );
        if release.is_some() {
            publish_release(broker, run, &mut b).await?;
        }
        return Ok(Some(b));
    }
}

/// Fires a barrier's timeout: releases it (partial or failure) if it is
/// still open; makes sure a release reached the inbox.
pub async fn fire(broker: &Broker, run_id: &str, barrier_id: &str) -> Result<(), BrokerError> {
    let run = match broker.run(run_id).await {
        Ok((run, _)) => run,
        Err(BrokerError::RunNotFound(_)) => return Ok(()),
        Err(e) => return Err(e),
    };
    loop {
        let Some((mut b, revision)) = broker.store().barrier(run_id, barrier_id).await? else {
            return Ok(());
        };
        if b.state != pb::BarrierState::Open as i32 {
            if !b.release_published {
                publish_release(broker, &run, &mut b).await?;
            }
            return Ok(());
        }
        let Decision::Release { failure, timed_out } = barrier::decide(&b, true) else {
            return Ok(());
        };
        prepare_release(broker, &run, &mut b, failure, timed_out).await?;
        if !broker.store().update_barrier(&b, revision).await? {
            continue;
        }
        broker.emit_detached(
            pb::Event {
                kind: pb::EventKind::BarrierTimedOut as i32,
                run_id: run.id.clone(),
                owner: run.owner.clone(),
                agent: b
                    .spec
                    .as_ref()
                    .map(|s| s.target_agent.clone())
                    .unwrap_or_default(),
                barrier_id: barrier_id.to_string(),
                ..Default::default()
            },
            format!("timedout-{run_id}-{barrier_id}"),
        );
        publish_release(broker, &run, &mut b).await?;
        return Ok(());
    }
}

/// Moves the barrier to its released state in memory (the caller writes
/// it with compare-and-set), after scheduling the durable check that
/// re-publishes the release if this broker dies before publishing it.
async fn prepare_release(
    broker: &Broker,
    run: &pb::Run,
    b: &mut pb::Barrier,
    failure: bool,
    timed_out: bool,
) -> Result<(), BrokerError> {
    let spec = b.spec.clone().unwrap_or_default();
    timers::schedule_barrier(
        broker,
        &run.id,
        &spec.barrier_id,
        (SystemTime::now() + RELEASE_CHECK).into(),
        "release",
    )
    .await?;
    let id = release_id(&run.id, &spec.barrier_id);
    let payload = barrier::release(b, failure, timed_out, id, now());
    b.release = Some(payload);
    Ok(())
}

/// Publishes the release handoff (deduplicated by its id), announces it
/// and marks it published.
async fn publish_release(
    broker: &Broker,
    run: &pb::Run,
    b: &mut pb::Barrier,
) -> Result<(), BrokerError> {
    let spec = b.spec.clone().unwrap_or_default();
    let release = b.release.clone().unwrap_or_default();
    let payload = prost_types::Any::from_msg(&release)
        .map_err(|e| BrokerError::Internal(format!("encoding the release: {e}")))?;
    let depth = release.branches.iter().map(|r| r.depth).max().unwrap_or(0) + 1;
    let envelope = pb::HandoffEnvelope {
        id: b.release_handoff_id.clone(),
        run_id: run.id.clone(),
        target_agent: spec.target_agent.clone(),
        payload: Some(payload),
        confidence: release.confidence,
        warnings: release.warnings.clone(),
        parent_ids: release
            .branches
            .iter()
            .filter(|r| !r.handoff_id.is_empty())
            .map(|r| r.handoff_id.clone())
            .collect(),
        depth,
        created_at: b.released_at,
        barrier_id: spec.barrier_id.clone(),
        ..Default::default()
    };
    broker
        .store()
        .publish(
            store::inbox_subject(&spec.target_agent),
            &envelope.id,
            envelope.encode_to_vec().into(),
        )
        .await?;
    broker
        .emit(
            pb::Event {
                kind: pb::EventKind::BarrierReleased as i32,
                run_id: run.id.clone(),
                owner: run.owner.clone(),
                agent: spec.target_agent.clone(),
                handoff_id: envelope.id.clone(),
                barrier_id: spec.barrier_id.clone(),
                depth,
                reason: release.warnings.join("; "),
                ..Default::default()
            },
            &format!("released-{}-{}", run.id, spec.barrier_id),
        )
        .await?;
    // Record that the release is out; a lost race here only means the
    // durable check re-publishes (deduplicated).
    loop {
        let Some((mut current, revision)) =
            broker.store().barrier(&run.id, &spec.barrier_id).await?
        else {
            return Ok(());
        };
        if current.release_published {
            break;
        }
        current.release_published = true;
        if broker.store().update_barrier(&current, revision).await? {
            *b = current;
            break;
        }
    }
    Ok(())
}

fn branch_event(
    run: &pb::Run,
    b: &pb::Barrier,
    kind: pb::EventKind,
    result: &pb::BranchResult,
) -> pb::Event {
    pb::Event {
        kind: kind as i32,
        run_id: run.id.clone(),
        owner: run.owner.clone(),
        agent: b
            .spec
            .as_ref()
            .map(|s| s.target_agent.clone())
            .unwrap_or_default(),
        source_agent: result.source_agent.clone(),
        handoff_id: result.handoff_id.clone(),
        barrier_id: b
            .spec
            .as_ref()
            .map(|s| s.barrier_id.clone())
            .unwrap_or_default(),
        branch_key: result.key.clone(),
        depth: result.depth,
        reason: result.warnings.join("; "),
        ..Default::default()
    }
}
