//! Barriers: open one, read one, the arrival of branch results, the
//! exactly-once release, and the barrier timers (timeout, release check).
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
    app::{
        auth::{self, Caller},
        now, state, status_name, Broker,
    },
    error::{BrokerError, Reason},
    rules::{
        barrier::{self, Arrival, Decision},
        grants::Action,
        names,
    },
    store::TimerKind,
};

/// How long after a release its publication is checked again.
const RELEASE_CHECK: Duration = Duration::from_secs(5);

/// The id of a barrier's release handoff.
pub fn release_id(run_id: &str, barrier_id: &str) -> String {
    crate::rules::handoff::derived_id(&format!("barrier\u{0}{run_id}\u{0}{barrier_id}"))
}

/// A barrier spec refused by the rules, as INVALID_BARRIER_SPEC.
pub fn spec_error(e: barrier::BarrierError) -> BrokerError {
    BrokerError::invalid(Reason::InvalidBarrierSpec, "barrier", e.to_string())
}

/// Opens a barrier (idempotent for the same spec), applies branch results
/// that arrived before it, and schedules its timeout.
pub async fn open(
    broker: &Broker,
    caller: &Caller,
    req: pb::OpenBarrierRequest,
) -> Result<pb::OpenBarrierResponse, BrokerError> {
    let spec = required(req.barrier)?;
    names::validate("barrier.run_id", &spec.run_id)?;
    let (run, _) = broker.run(&spec.run_id).await?;
    auth::require(broker, caller, Action::Own, &run.owner, Some(&run)).await?;
    open_spec(broker, spec).await
}

/// The barrier spec a request must carry.
pub fn required(spec: Option<pb::BarrierSpec>) -> Result<pb::BarrierSpec, BrokerError> {
    spec.ok_or_else(|| BrokerError::malformed("barrier", "barrier is required"))
}

/// Opens a barrier from its spec (see [`open`]).
pub async fn open_spec(
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
    let mut existing = None;
    if !created {
        let (current, _) = broker
            .store()
            .barrier(&spec.run_id, &spec.barrier_id)
            .await?
            .ok_or_else(|| BrokerError::Internal("barrier vanished".to_string()))?;
        if !barrier::same_spec(&current.spec.clone().unwrap_or_default(), &spec) {
            return Err(BrokerError::BarrierExists(format!(
                "barrier {:?} of run {:?} is already open with another spec",
                spec.barrier_id, spec.run_id
            )));
        }
        existing = Some(current);
    }
    if let Some(timeout) = spec.timeout.and_then(|d| Duration::try_from(d).ok()) {
        let due = SystemTime::now() + timeout;
        let timer = pb::Timer {
            run_id: spec.run_id.clone(),
            due: Some(due.into()),
            barrier_id: spec.barrier_id.clone(),
            ..Default::default()
        };
        broker
            .store()
            .schedule(&timer, TimerKind::BarrierTimeout)
            .await?;
    }
    let msg_id = format!("opened-{}-{}", run.id, spec.barrier_id);
    let (emitted, early) = tokio::join!(
        broker.emit(
            pb::Event {
                kind: pb::EventKind::BarrierOpened as i32,
                run_id: run.id.clone(),
                owner: run.owner.clone(),
                agent: spec.target_agent.clone(),
                barrier_id: spec.barrier_id.clone(),
                reason: describe(&spec),
                ..Default::default()
            },
            &msg_id,
        ),
        // Read after the barrier exists: a branch notes itself before it
        // looks for its barrier, so either it is noted here or it found
        // the barrier and counted itself.
        broker
            .store()
            .has_early_branch(&spec.run_id, &spec.barrier_id),
    );
    emitted?;
    let barrier = if early? {
        // Branch results that were stored before the barrier existed.
        apply_stored(broker, &run, &spec.barrier_id)
            .await?
            .ok_or_else(|| BrokerError::Internal("barrier vanished".to_string()))?
    } else {
        match existing {
            Some(b) => b,
            None => fresh,
        }
    };
    Ok(pb::OpenBarrierResponse {
        barrier: Some(barrier),
        created,
    })
}

/// "ALL of 4", "QUORUM 2 of 3, fail fast, timeout 20s (release partial)".
fn describe(spec: &pb::BarrierSpec) -> String {
    let n = barrier::branch_keys(spec).map(|k| k.len()).unwrap_or(0);
    let mut text = if spec.mode == pb::BarrierMode::Quorum as i32 {
        format!("QUORUM {} of {n}", spec.quorum)
    } else {
        format!("ALL of {n}")
    };
    if spec.fail_fast {
        text.push_str(", fail fast");
    }
    if let Some(t) = spec.timeout.and_then(|d| Duration::try_from(d).ok()) {
        let policy = if spec.on_timeout == pb::OnTimeout::ReleasePartial as i32 {
            "release partial"
        } else {
            "fail"
        };
        text.push_str(&format!(
            ", timeout {} ({policy})",
            humantime::format_duration(t)
        ));
    }
    text
}

/// A barrier's state.
pub async fn get(
    broker: &Broker,
    caller: &Caller,
    req: pb::GetBarrierRequest,
) -> Result<pb::GetBarrierResponse, BrokerError> {
    names::validate("run_id", &req.run_id)?;
    names::validate("barrier_id", &req.barrier_id)?;
    if !caller.may(Action::Read, "") {
        let (run, _) = broker.run(&req.run_id).await?;
        auth::require(broker, caller, Action::Own, &run.owner, Some(&run)).await?;
    }
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

/// How a branch result was taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arrived {
    /// Its sequence in the branch stream.
    pub sequence: u64,
    /// Whether it repeated a result the barrier has already.
    pub duplicate: bool,
    /// The handoff id of the result the barrier holds for the key, when it
    /// is another one than this (a second, different result).
    pub first: Option<String>,
}

/// Stores a branch result durably (setting `stored`), then applies it to
/// its barrier if the barrier is open yet. `current` is the barrier as the
/// caller read it (saves a read; a stale one only costs a retry).
/// Idempotent: the same handoff id stores once and counts once. Refused
/// before anything is stored: a key the barrier does not have
/// (`UNKNOWN_BRANCH_KEY`; a result for a barrier not opened yet is held
/// until it opens), and a result that would take an open barrier's
/// release past one NATS message. A second, different result for a key
/// that arrived is answered as a duplicate of the first (its handoff id in
/// [`Arrived::first`]) and stored nowhere.
pub async fn arrive(
    broker: &Broker,
    run: &pb::Run,
    barrier_id: &str,
    mut result: pb::BranchResult,
    current: Option<(pb::Barrier, u64)>,
    stored: &AtomicBool,
) -> Result<Arrived, BrokerError> {
    if let Some(b) = current.as_ref().map(|(b, _)| b) {
        if let Some(answer) = check_arrival(broker, barrier_id, &result, b)? {
            return Ok(answer);
        }
    } else {
        // Not open yet (as the caller read it): note the early result
        // before storing it and looking for the barrier again (see
        // `open_spec`).
        broker
            .store()
            .mark_early_branch(&run.id, barrier_id)
            .await?;
    }
    let put = broker
        .store()
        .put_branch_result(&run.id, barrier_id, &result)
        .await?;
    stored.store(true, Ordering::Relaxed);
    result.sequence = put.sequence;
    apply(broker, run, barrier_id, result, current).await?;
    Ok(Arrived {
        sequence: put.sequence,
        duplicate: put.duplicate,
        first: None,
    })
}

/// What `arrive` decides from the barrier as read, before anything is
/// stored: a key the barrier does not have is refused
/// (`UNKNOWN_BRANCH_KEY`), a result that would take an open barrier's
/// release past one NATS message is refused (`BRANCH_TOO_LARGE`), and a
/// second, different result for an arrived key is answered with the first
/// (`Some`). `None`: the result may arrive. The handoff use case asks it
/// before applying the handoff's state delta, so a refused branch changes
/// no state.
pub fn check_arrival(
    broker: &Broker,
    barrier_id: &str,
    result: &pb::BranchResult,
    b: &pb::Barrier,
) -> Result<Option<Arrived>, BrokerError> {
    if !b
        .spec
        .as_ref()
        .is_some_and(|spec| barrier::has_key(spec, &result.key))
    {
        return Err(BrokerError::invalid(
            Reason::UnknownBranchKey,
            "branch_key",
            format!(
                "branch {:?} is not a branch of barrier {barrier_id:?}",
                result.key
            ),
        ));
    }
    let first = b.branches.iter().find(|r| r.key == result.key);
    if let Some(first) = first.filter(|f| f.handoff_id != result.handoff_id) {
        return Ok(Some(Arrived {
            sequence: first.sequence,
            duplicate: true,
            first: Some(first.handoff_id.clone()),
        }));
    }
    if b.state == pb::BarrierState::Open as i32 && first.is_none() {
        let (size, budget) = (cost(result), budget(broker, b));
        if b.payload_bytes.saturating_add(size) > budget {
            return Err(BrokerError::BranchTooLarge {
                barrier: barrier_id.to_string(),
                key: result.key.clone(),
                size,
                used: b.payload_bytes,
                budget,
            });
        }
    }
    Ok(None)
}

/// What a branch result adds to its barrier's release handoff: the result
/// itself, and its warnings once more in the release's warnings.
fn cost(result: &pb::BranchResult) -> u64 {
    let warnings: usize = result
        .warnings
        .iter()
        .map(|w| w.len() + result.key.len() + 24)
        .sum();
    (result.encoded_len() + warnings + 8) as u64
}

/// How many bytes of branch results a barrier's release may carry: the
/// NATS message limit less the release's own fields (envelope, lists of
/// keys, placeholders for missing branches and their warnings).
fn budget(broker: &Broker, b: &pb::Barrier) -> u64 {
    // A release over one NATS message goes by reference
    // (`payloads::externalize`): it may be as large as any payload.
    let max = broker
        .config()
        .max_payload_size
        .max(match broker.store().max_payload() {
            0 => 1 << 20,
            n => n,
        }) as u64;
    // Key lengths, without listing the keys (this runs on every arrival).
    let per_key: u64 = match b.spec.as_ref() {
        Some(spec) if !spec.branch_keys.is_empty() => spec
            .branch_keys
            .iter()
            .map(|k| 3 * k.len() as u64 + 112)
            .sum(),
        Some(spec) => (0..spec.branch_count.min(barrier::MAX_BRANCHES as u32))
            .map(|i| 3 * u64::from(i.checked_ilog10().unwrap_or(0) + 1) + 112)
            .sum(),
        None => 0,
    };
    max.saturating_sub(16 * 1024 + per_key)
}

/// Applies one branch result to the barrier with compare-and-set, and
/// releases it when it is satisfied. `None` when the barrier is not open
/// yet (the result waits in the branch stream). The barrier keeps the
/// result without its payload (which stays in the branch stream under
/// `result.sequence`); a result that no longer fits in the release (two
/// racing past the check in [`arrive`]) is recorded as failed, saying so.
pub async fn apply(
    broker: &Broker,
    run: &pb::Run,
    barrier_id: &str,
    result: pb::BranchResult,
    mut current: Option<(pb::Barrier, u64)>,
) -> Result<Option<pb::Barrier>, BrokerError> {
    let key = result.key.clone();
    let size = cost(&result);
    loop {
        let read = match current.take() {
            Some(c) => Some(c),
            None => broker.store().barrier(&run.id, barrier_id).await?,
        };
        let Some((mut b, revision)) = read else {
            return Ok(None);
        };
        let mut record = result.clone();
        if record.payload.take().is_none() {
            // Nothing to fetch back for the release.
            record.sequence = 0;
        }
        let over = b.payload_bytes.saturating_add(size) > budget(broker, &b);
        if over && b.state == pb::BarrierState::Open as i32 {
            record.status = pb::BranchStatus::Failed as i32;
            record.sequence = 0;
            record.warnings.push(format!(
                "result of {size} bytes refused: the release would exceed one NATS message"
            ));
        }
        let first = b
            .branches
            .iter()
            .find(|r| r.key == key)
            .map(|r| r.handoff_id.clone());
        let arrival = barrier::arrive(&mut b, record);
        match arrival {
            Arrival::Duplicate | Arrival::UnknownKey => {
                // Never silently: a result stored before the barrier could
                // refuse it (it was not open yet, or a second result raced
                // the first) is announced as not counted.
                let why = match (&arrival, first) {
                    (Arrival::UnknownKey, _) => Some("not a branch of this barrier".to_string()),
                    (_, Some(first)) if first != result.handoff_id => {
                        Some(format!("branch {key} arrived already (handoff {first})"))
                    }
                    _ => None,
                };
                if why.is_none() && b.state != pb::BarrierState::Open as i32 && !b.release_published
                {
                    // The same branch again, after a call that decided the
                    // release and failed before publishing it (NATS lost
                    // its answer): publish now rather than at the check.
                    publish_release(broker, run, &mut b).await?;
                }
                if let Some(why) = why {
                    tracing::warn!(run_id = %run.id, barrier_id, key, reason = %why, "branch result not counted");
                    let mut event = branch_event(run, &b, pb::EventKind::BranchLate, &result);
                    event.reason = format!("not counted: {why}");
                    broker
                        .emit_unconfirmed(
                            event,
                            format!("uncounted-{}-{barrier_id}-{}", run.id, result.handoff_id),
                        )
                        .await;
                }
                return Ok(Some(b));
            }
            Arrival::Late => {
                if !broker.store().update_barrier(&b, revision).await? {
                    continue;
                }
                broker
                    .emit_unconfirmed(
                        branch_event(run, &b, pb::EventKind::BranchLate, &result),
                        format!("late-{}-{barrier_id}-{key}", run.id),
                    )
                    .await;
                return Ok(Some(b));
            }
            Arrival::Counted => {}
        }
        if !over {
            b.payload_bytes = b.payload_bytes.saturating_add(size);
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
        broker
            .emit_unconfirmed(
                branch_event(run, &b, pb::EventKind::BranchArrived, &result),
                format!("arrived-{}-{barrier_id}-{key}", run.id),
            )
            .await;
        if release.is_some() {
            publish_release(broker, run, &mut b).await?;
        }
        return Ok(Some(b));
    }
}

/// Applies every stored branch result of a barrier (those that arrived
/// before it was opened, or whose broker died between storing and
/// applying them). Returns the barrier as it then stands.
async fn apply_stored(
    broker: &Broker,
    run: &pb::Run,
    barrier_id: &str,
) -> Result<Option<pb::Barrier>, BrokerError> {
    let Some((mut latest, _)) = broker.store().barrier(&run.id, barrier_id).await? else {
        return Ok(None);
    };
    let done: std::collections::HashSet<String> = latest
        .branches
        .iter()
        .map(|r| r.key.clone())
        .chain(latest.late.iter().cloned())
        .collect();
    for result in broker.store().branch_results(&run.id, barrier_id).await? {
        if done.contains(&result.key) {
            continue;
        }
        if let Some(b) = apply(broker, run, barrier_id, result, None).await? {
            latest = b;
        }
    }
    Ok(Some(latest))
}

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
/// either kind first applies branch results that were stored but not
/// applied (their broker died in between) and re-publishes a release not
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
        broker
            .emit_unconfirmed(
                pb::Event {
                    kind: pb::EventKind::BarrierTimedOut as i32,
                    run_id: run.id.clone(),
                    owner: run.owner.clone(),
                    agent: target_of(&b),
                    barrier_id: barrier_id.to_string(),
                    reason: b
                        .release
                        .as_ref()
                        .map(|r| r.missing.join(", "))
                        .map(|m| format!("missing at timeout: {m}"))
                        .unwrap_or_default(),
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
async fn prepare_release(
    broker: &Broker,
    run: &pb::Run,
    b: &mut pb::Barrier,
    failure: bool,
    timed_out: bool,
) -> Result<(), BrokerError> {
    let spec = b.spec.clone().unwrap_or_default();
    let check = pb::Timer {
        run_id: run.id.clone(),
        due: Some((SystemTime::now() + RELEASE_CHECK).into()),
        barrier_id: spec.barrier_id.clone(),
        ..Default::default()
    };
    broker
        .store()
        .schedule(&check, TimerKind::ReleaseCheck)
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
    let mut release = b.release.clone().unwrap_or_default();
    fill_payloads(broker, &mut release).await?;
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
        // The aggregator sees the state every branch's delta made.
        state_revision: state::latest(broker, &run.id)
            .await?
            .map_or(0, |r| r.revision),
        ..Default::default()
    };
    crate::app::payloads::externalize(broker, &mut envelope).await?;
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
    Ok(())
}

/// Records a barrier's release once, by the broker that marked it
/// published: how long it stayed open, and (unless it timed out) the time
/// from its last branch arrival to the release handoff stored.
fn observe_release(broker: &Broker, b: &pb::Barrier, stored_at: SystemTime) {
    let at = |t: Option<prost_types::Timestamp>| t.and_then(|t| SystemTime::try_from(t).ok());
    let target = target_of(b);
    if let (Some(opened), Some(released)) = (at(b.opened_at), at(b.released_at)) {
        if let Ok(open) = released.duration_since(opened) {
            broker.metrics().barrier_wait(&target, open);
        }
    }
    let timed_out = b.release.as_ref().is_some_and(|r| r.timed_out);
    let last = b.branches.iter().filter_map(|r| at(r.arrived_at)).max();
    if let (false, Some(last)) = (timed_out, last) {
        if let Ok(took) = stored_at.duration_since(last) {
            broker.metrics().barrier_release(&target, took);
        }
    }
}

/// Puts each recorded branch's payload back into the release, from the
/// branch stream (the barrier entry keeps none). A payload no longer
/// stored is named in the release's warnings, never dropped silently.
async fn fill_payloads(
    broker: &Broker,
    release: &mut pb::BarrierRelease,
) -> Result<(), BrokerError> {
    let sequences: Vec<u64> = release
        .branches
        .iter()
        .map(|r| r.sequence)
        .filter(|&s| s > 0)
        .collect();
    if sequences.is_empty() {
        return Ok(());
    }
    let mut payloads = broker.store().branch_payloads(&sequences).await?;
    for branch in &mut release.branches {
        if branch.sequence == 0 {
            continue;
        }
        match payloads.remove(&branch.sequence) {
            Some(p) => branch.payload = Some(p),
            None => release.warnings.push(format!(
                "branch {} result (handoff {}) is no longer stored; released without its payload",
                branch.key, branch.handoff_id
            )),
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
        ..Default::default()
    }
}
