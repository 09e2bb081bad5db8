//! The exactly-once release, and the barrier timers (timeout, release
//! check).

use super::*;

/// Which durable barrier timer fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timer {
    /// The barrier's timeout: an open barrier releases (partial or failure).
    Timeout,
    /// The check scheduled with a release: re-publish it if its broker died
    /// before publishing.
    ReleaseCheck,
}

/// The agent a barrier releases to.
pub fn target_of(b: &pb::Barrier) -> String {
    b.spec
        .as_ref()
        .map(|s| s.target_agent.clone())
        .unwrap_or_default()
}

/// Fires a barrier timer. A barrier whose release is out needs nothing
/// (the usual case of the release check: it costs one read). Otherwise
/// either kind first counts branch results that were stored but not
/// counted (their broker died in between) and re-publishes a release not
/// yet published; a timeout then releases a barrier that is still open.
pub async fn fire(
    broker: &Broker,
    run_id: &str,
    barrier_id: &str,
    timer: Timer,
) -> Result<(), BrokerError> {
    let run = match broker.run(run_id).await {
        Ok((run, _)) => run,
        Err(BrokerError::RunNotFound(_)) => return Ok(()),
        Err(e) => return Err(e),
    };
    match broker.store().barrier(run_id, barrier_id).await? {
        None => return Ok(()),
        Some((b, _)) if b.state != pb::BarrierState::Open as i32 && b.release_published => {
            return Ok(())
        }
        Some(_) => {}
    }
    let Some(current) = apply_stored(broker, &run, barrier_id).await? else {
        return Ok(());
    };
    if current.state != pb::BarrierState::Open as i32 {
        if !current.release_published {
            let mut b = current;
            publish_release(broker, &run, &mut b).await?;
        }
        return Ok(());
    }
    if timer != Timer::Timeout {
        return Ok(());
    }
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
        let joined = joined(broker, &b).await?;
        let missing: Vec<String> = (0..joined.index.len())
            .filter(|&p| !barrier::is_counted(&b, p))
            .map(|p| joined.index.key(p))
            .collect();
        broker
            .emit_unconfirmed(
                pb::Event {
                    kind: pb::EventKind::BarrierTimedOut as i32,
                    run_id: run.id.clone(),
                    owner: run.owner.clone(),
                    agent: target_of(&b),
                    barrier_id: barrier_id.to_string(),
                    reason: format!("missing at timeout: {}", missing.join(", ")),
                    // Just before the release it causes.
                    position: clock::nanos(b.released_at.as_ref()).saturating_sub(1),
                    ..Default::default()
                },
                format!("timedout-{run_id}-{barrier_id}"),
            )
            .await;
        publish_release(broker, &run, &mut b).await?;
        return Ok(());
    }
}

/// Moves the barrier to its released state in memory (the caller writes
/// it with compare-and-set), after scheduling the durable check that
/// re-publishes the release if this broker dies before publishing it.
pub(super) async fn prepare_release(
    broker: &Broker,
    run: &pb::Run,
    b: &mut pb::Barrier,
    failure: bool,
    timed_out: bool,
) -> Result<(), BrokerError> {
    let barrier_id = b
        .spec
        .as_ref()
        .map(|s| s.barrier_id.clone())
        .unwrap_or_default();
    let check = pb::Timer {
        run_id: run.id.clone(),
        due: Some((SystemTime::now() + RELEASE_CHECK).into()),
        barrier_id: barrier_id.clone(),
        ..Default::default()
    };
    broker
        .store()
        .schedule(&check, TimerKind::ReleaseCheck)
        .await?;
    // Its position: after every arrival it counts.
    let last_arrival = b
        .branches
        .iter()
        .map(|r| clock::nanos(r.arrived_at.as_ref()))
        .chain([clock::nanos(b.last_arrival_at.as_ref())])
        .max()
        .unwrap_or(0);
    let released_at = broker.stamp(last_arrival.saturating_add(2));
    barrier::release(
        b,
        failure,
        timed_out,
        release_id(&run.id, &barrier_id),
        released_at,
    );
    Ok(())
}

/// Builds the release handoff from the counted records, publishes it
/// (deduplicated by its id), announces it and marks it published.
pub(super) async fn publish_release(
    broker: &Broker,
    run: &pb::Run,
    b: &mut pb::Barrier,
) -> Result<(), BrokerError> {
    let joined = joined(broker, b).await?;
    let spec = &joined.spec;
    // The aggregator sees the state every branch's delta made.
    let (records, state) = tokio::join!(
        counted_records(broker, run, b, &joined),
        state::latest(broker, &run.id)
    );
    let (records, state_revision) = (records?, state?.map_or(0, |r| r.revision));
    let counted = barrier::counted_branches(b, &joined.index, records);
    let release = barrier::release_payload(b, &joined.index, counted, false, false);
    let payload = prost_types::Any::from_msg(&release)
        .map_err(|e| BrokerError::Internal(format!("encoding the release: {e}")))?;
    let depth = release.branches.iter().map(|r| r.depth).max().unwrap_or(0) + 1;
    let mut envelope = pb::HandoffEnvelope {
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
        state_revision,
        // The trace of the barrier's opening goes on, joined by its
        // branches (linked).
        trace_context: match broker.traces() {
            Some(traces) => traces.release(spec, &release.branches),
            None => spec.trace_context.clone(),
        },
        ..Default::default()
    };
    // Inline up to one NATS message; a larger release goes by reference.
    crate::app::payloads::externalize_built(broker, &mut envelope).await?;
    broker.store().put_handoff(&envelope).await?;
    let stored_at = SystemTime::now();
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
                position: clock::nanos(envelope.created_at.as_ref()),
                reason: if release.failure {
                    format!("failure: {}", release.warnings.join("; "))
                } else {
                    release.warnings.join("; ")
                },
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
            observe_release(broker, &current, stored_at);
            *b = current;
            break;
        }
    }
    broker
        .barrier_local()
        .forget(&format!("{}.{}", run.id, spec.barrier_id));
    Ok(())
}

/// The records of the branches a barrier counted: those this replica
/// keeps, and the others read from the stream (one by one when few are
/// missing, else all of them).
pub(super) async fn counted_records(
    broker: &Broker,
    run: &pb::Run,
    b: &pb::Barrier,
    joined: &Joined,
) -> Result<Vec<pb::BranchResult>, BrokerError> {
    let barrier_id = &joined.spec.barrier_id;
    let key = format!("{}.{barrier_id}", run.id);
    let (mut found, missing) = {
        let kept = broker.barrier_local().records.get(&key);
        let mut found = Vec::new();
        let mut missing = Vec::new();
        for position in (0..joined.index.len()).filter(|&p| barrier::is_counted(b, p)) {
            let branch = joined.index.key(position);
            match kept.as_ref().and_then(|k| k.get(&branch)) {
                Some(r) => found.push(r.clone()),
                None => missing.push(branch),
            }
        }
        (found, missing)
    };
    if missing.is_empty() {
        return Ok(found);
    }
    if missing.len() > MISSING_READS {
        return broker.store().branch_results(&run.id, barrier_id).await;
    }
    let read = futures::future::try_join_all(
        missing
            .iter()
            .map(|branch| broker.store().branch_result(&run.id, barrier_id, branch)),
    )
    .await?;
    found.extend(read.into_iter().flatten());
    Ok(found)
}

/// Records a barrier's release once, by the broker that marked it
/// published: how long it stayed open, and (unless it timed out) the time
/// from its last branch arrival to the release handoff stored.
pub(super) fn observe_release(broker: &Broker, b: &pb::Barrier, stored_at: SystemTime) {
    let at = |t: Option<prost_types::Timestamp>| t.and_then(|t| SystemTime::try_from(t).ok());
    let target = target_of(b);
    if let (Some(opened), Some(released)) = (at(b.opened_at), at(b.released_at)) {
        if let Ok(open) = released.duration_since(opened) {
            broker.metrics().barrier_wait(&target, open);
        }
    }
    let timed_out = b.release.as_ref().is_some_and(|r| r.timed_out);
    if let (false, Some(last)) = (timed_out, at(b.last_arrival_at)) {
        if let Ok(took) = stored_at.duration_since(last) {
            broker.metrics().barrier_release(&target, took);
        }
    }
}

pub(super) fn branch_event(
    run: &pb::Run,
    b: &pb::Barrier,
    kind: pb::EventKind,
    result: &pb::BranchResult,
) -> pb::Event {
    pb::Event {
        kind: kind as i32,
        run_id: run.id.clone(),
        owner: run.owner.clone(),
        agent: target_of(b),
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
        // Right after the branch's `handoff_accepted` (whose position is
        // its arrival time), before the release that counts it.
        // (None: the emitter's clock.)
        position: match clock::nanos(result.arrived_at.as_ref()) {
            0 => 0,
            at => at.saturating_add(1),
        },
        ..Default::default()
    }
}
