//! Runs: start one, end one (completed, failed, timed out) and tell its
//! owner, read one with its timeline.

use std::time::{Duration, SystemTime};

use handoff_proto::pb;
use prost::Message as _;

use crate::{
    app::{
        access,
        auth::{self, Caller},
        now, run_index, state, Broker,
    },
    error::BrokerError,
    rules::{
        grants::Action,
        handoff::{self as rules, pipeline_of},
        names,
    },
    store::{Decided, TimerKind},
};

/// How a run ends.
#[derive(Debug, Clone)]
pub enum RunEnd {
    /// A final handoff completed it.
    Completed {
        /// The final handoff.
        handoff_id: String,
        /// Its payload, when inline.
        result: Option<prost_types::Any>,
        /// Its payload, when stored by reference.
        result_ref: Option<pb::PayloadRef>,
    },
    /// A delivery was rejected or dead-lettered.
    Failed(String),
    /// Its deadline passed.
    TimedOut(String),
    /// Its owner cancelled it (`CancelRun`).
    Cancelled(String),
    /// As decided already (see [`decide`]).
    Decided(Box<pb::Run>),
}

/// Creates a run. Repeating a `StartRun` with the same id and owner answers
/// the existing run (so a client may retry); another owner is ALREADY_EXISTS.
pub async fn start(
    broker: &Broker,
    caller: &Caller,
    req: pb::StartRunRequest,
) -> Result<pb::StartRunResponse, BrokerError> {
    start_linked(broker, caller, req, None).await
}

/// Creates a run as [`start`] does; `parent`: the run it is forked from
/// and the revision of that run's state it starts from.
pub async fn start_linked(
    broker: &Broker,
    caller: &Caller,
    req: pb::StartRunRequest,
    parent: Option<(String, u64)>,
) -> Result<pb::StartRunResponse, BrokerError> {
    let run_id = if req.run_id.is_empty() {
        uuid::Uuid::now_v7().to_string()
    } else {
        names::validate("run_id", &req.run_id)?;
        req.run_id.clone()
    };
    names::validate("owner", &req.owner)?;
    auth::require(broker, caller, Action::Own, &req.owner).await?;
    let max_depth = if req.max_depth == 0 {
        broker.config().default_max_depth
    } else {
        req.max_depth
    };
    let pinned = req.pinned.unwrap_or_default();
    if pinned.encoded_len() > broker.config().max_inline_payload {
        return Err(BrokerError::PayloadTooLarge {
            size: pinned.encoded_len(),
            limit: broker.config().max_inline_payload,
            setting: "max_inline_payload",
        });
    }
    let deadline = match (req.timeout, req.no_timeout) {
        (Some(_), true) => {
            return Err(BrokerError::malformed(
                "no_timeout",
                "a run has a timeout or no_timeout, not both",
            ))
        }
        (None, true) => None,
        (None, false) => Some(prost_types::Timestamp::from(
            SystemTime::now() + broker.config().default_run_timeout,
        )),
        (Some(t), false) => {
            let t = Duration::try_from(t)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| BrokerError::malformed("timeout", "timeout must be positive"))?;
            let due = SystemTime::now()
                .checked_add(t)
                .filter(|_| t <= Duration::from_secs(10 * 365 * 24 * 3600))
                .ok_or_else(|| BrokerError::malformed("timeout", "timeout is over 10 years"))?;
            Some(prost_types::Timestamp::from(due))
        }
    };
    names::validate_optional("pipeline", &req.pipeline)?;
    if let Some(judge) = &req.judge {
        names::validate("judge.agent", &judge.agent)?;
        if !(0.0..=1.0).contains(&judge.threshold) {
            return Err(BrokerError::malformed(
                "judge.threshold",
                format!("judge.threshold {} is outside [0, 1]", judge.threshold),
            ));
        }
    }
    let seed = state::seed(broker, &run_id, req.state.as_ref())?;
    // A judge of the run's own, else its pipeline's (`pipeline_judges`).
    let judge = req.judge.clone().or_else(|| {
        broker
            .config()
            .pipeline_judges
            .get(&req.pipeline)
            .map(|(agent, threshold)| pb::JudgeSpec {
                agent: agent.clone(),
                threshold: *threshold,
            })
    });
    let run = pb::Run {
        id: run_id.clone(),
        owner: req.owner.clone(),
        status: pb::RunStatus::Running as i32,
        // Also the position of `run_started`: its handoffs follow it.
        created_at: Some(broker.stamp(0)),
        deadline,
        max_depth,
        pinned: Some(pinned),
        pipeline: req.pipeline.clone(),
        judge,
        has_state: seed.is_some(),
        parent_run_id: parent.as_ref().map(|p| p.0.clone()).unwrap_or_default(),
        forked_at_revision: parent.as_ref().map_or(0, |p| p.1),
        ..Default::default()
    };
    // The seed is stored before the run that says it has one, so no
    // handoff finds the run without its state; only for a run not there
    // yet (a retried StartRun finds both).
    if let Some(seed) = seed {
        if broker.store().run(&run_id).await?.is_none() {
            state::store_seed(broker, seed).await?;
        }
    }
    let run = if broker.store().create_run(&run).await? {
        run
    } else {
        let (existing, _) = broker.run(&run_id).await?;
        if existing.owner != run.owner || existing.parent_run_id != run.parent_run_id {
            return Err(BrokerError::RunExists(run_id));
        }
        existing
    };
    schedule_deadline(broker, &run).await?;
    let event = pb::Event {
        kind: pb::EventKind::RunStarted as i32,
        run_id: run.id.clone(),
        owner: run.owner.clone(),
        run_status: run.status,
        at: run.created_at,
        pipeline: run.pipeline.clone(),
        position: crate::app::clock::nanos(run.created_at.as_ref()),
        ..Default::default()
    };
    broker.emit(event, &format!("start-{}", run.id)).await?;
    tracing::info!(run_id = %run.id, owner = %run.owner, max_depth, "run started");
    Ok(pb::StartRunResponse { run: Some(run) })
}

/// Closes the open barriers of a cancelled run, as its end is recorded
/// (those its timeline saw opened): CLOSED, with nothing to publish, so neither an arrival nor a
/// timer releases them.
async fn close_barriers(broker: &Broker, run_id: &str) -> Result<(), BrokerError> {
    let timeline = broker.store().run_events(run_id).await?;
    let mut opened: Vec<&str> = timeline
        .iter()
        .filter(|e| e.kind == pb::EventKind::BarrierOpened as i32)
        .map(|e| e.barrier_id.as_str())
        .collect();
    opened.sort_unstable();
    opened.dedup();
    for barrier_id in opened {
        loop {
            let Some((mut b, revision)) = broker.store().barrier(run_id, barrier_id).await? else {
                break;
            };
            if b.state != pb::BarrierState::Open as i32 {
                break;
            }
            b.state = pb::BarrierState::Closed as i32;
            b.release_published = true;
            if broker.store().update_barrier(&b, revision).await? {
                break;
            }
        }
    }
    Ok(())
}

/// Schedules the durable timer of a run's deadline, if it has one
/// (deduplicated: scheduling it again stores nothing more).
pub async fn schedule_deadline(broker: &Broker, run: &pb::Run) -> Result<(), BrokerError> {
    let Some(due) = run.deadline else {
        return Ok(());
    };
    let timer = pb::Timer {
        run_id: run.id.clone(),
        due: Some(due),
        ..Default::default()
    };
    broker
        .store()
        .schedule(&timer, TimerKind::RunDeadline)
        .await
}

/// A run with its whole timeline.
pub async fn get(
    broker: &Broker,
    caller: &Caller,
    req: pb::GetRunRequest,
) -> Result<pb::GetRunResponse, BrokerError> {
    names::validate("run_id", &req.run_id)?;
    let run = access::read(broker, caller, &req.run_id, "").await?;
    let mut timeline = broker.store().run_events(&req.run_id).await?;
    crate::app::clock::sort_timeline(&mut timeline);
    let mut run = run;
    if run.stats.is_none() {
        run.stats = Some(stats_of(&timeline));
    }
    Ok(pb::GetRunResponse {
        run: Some(run),
        timeline,
    })
}

/// Runs matching a `ListRunsRequest`, newest first, a page at a time,
/// from this replica's index (see [`run_index`]): only those the caller
/// may read (every run with `read`, else those of owners it has `own`
/// on). A refusal of the whole call is never made for grants: a caller
/// that may read nothing gets an empty page.
pub async fn list(
    broker: &Broker,
    caller: &Caller,
    req: pb::ListRunsRequest,
) -> Result<pb::ListRunsResponse, BrokerError> {
    names::validate_optional("owner", &req.owner)?;
    names::validate_optional("pipeline", &req.pipeline)?;
    names::validate_optional("agent", &req.agent)?;
    names::validate_optional("parent_run_id", &req.parent_run_id)?;
    for status in &req.status {
        if pb::RunStatus::try_from(*status).is_err() || *status == 0 {
            return Err(BrokerError::malformed(
                "status",
                format!("{status} is not a run status"),
            ));
        }
    }
    let mut statuses = req.status.clone();
    statuses.sort_unstable();
    statuses.dedup();
    let size = match usize::try_from(req.page_size).unwrap_or(usize::MAX) {
        0 => run_index::DEFAULT_PAGE,
        n if n > run_index::MAX_PAGE => {
            return Err(BrokerError::malformed(
                "page_size",
                format!("page_size {n} is over {}", run_index::MAX_PAGE),
            ))
        }
        n => n,
    };
    let time = |field: &'static str, t: &Option<prost_types::Timestamp>| match t {
        None => Ok(None),
        Some(t) if t.nanos < 0 || t.nanos >= 1_000_000_000 => Err(BrokerError::malformed(
            field,
            format!("{field} is not a valid timestamp"),
        )),
        Some(t) => Ok(Some(run_index::nanos(t))),
    };
    let filter = run_index::Filter {
        owner: Some(req.owner.clone()).filter(|o| !o.is_empty()),
        statuses,
        pipeline: Some(req.pipeline.clone()).filter(|p| !p.is_empty()),
        agent: Some(req.agent.clone()).filter(|a| !a.is_empty()),
        started: (
            time("started_after", &req.started_after)?,
            time("started_before", &req.started_before)?,
        ),
        ended: (
            time("ended_after", &req.ended_after)?,
            time("ended_before", &req.ended_before)?,
        ),
        dead_letters: req.has_dead_letters,
        drift: req.drift,
        parent: Some(req.parent_run_id.clone()).filter(|p| !p.is_empty()),
    };
    let token = Some(req.page_token.as_str()).filter(|t| !t.is_empty());
    let index = broker.run_index();
    // Until the index has read every stored run once (at start), a page
    // would silently miss some.
    if tokio::time::timeout(broker.config().nats_timeout, index.ready())
        .await
        .is_err()
    {
        return Err(BrokerError::Unavailable(
            "the run index is still loading; try again in a moment".to_string(),
        ));
    }
    let all = caller.may(Action::Read, "");
    let page = index
        .list(
            &filter,
            |owner| all || caller.may(Action::Own, owner),
            size,
            token,
        )
        .map_err(|run_index::BadToken| {
            BrokerError::malformed("page_token", "not a page token of ListRuns")
        })?;
    Ok(pb::ListRunsResponse {
        runs: page.runs,
        next_page_token: page.next.unwrap_or_default(),
    })
}

/// Cancels a running run for its owner (`own` on the run's owner; anyone
/// else is answered as if the run did not exist, see [`access`]): it ends
/// CANCELLED like any other end (its owner told, later handoffs
/// RUN_CLOSED, pending handoffs discarded when offered, its open
/// barriers CLOSED), and every
/// replica, on its `run_cancelled` event, tells the instances holding
/// deliveries of the run (see [`Broker::cancel_deliveries`]). A run that
/// already ended is RUN_CLOSED.
pub async fn cancel(
    broker: &Broker,
    caller: &Caller,
    req: pb::CancelRunRequest,
) -> Result<pb::CancelRunResponse, BrokerError> {
    names::validate("run_id", &req.run_id)?;
    const MAX_REASON: usize = 1024;
    if req.reason.len() > MAX_REASON {
        return Err(BrokerError::malformed(
            "reason",
            format!("reason is over {MAX_REASON} bytes"),
        ));
    }
    let (run, _) = match broker.store().run(&req.run_id).await? {
        Some(found) => found,
        None => return Err(BrokerError::RunNotFound(req.run_id.clone())),
    };
    if !caller.may(Action::Own, &run.owner) {
        return Err(access::hidden(broker, caller, &run).await);
    }
    if status_of(&run).is_terminal() {
        // A cancel cut short before its barriers were closed is finished
        // by the next one.
        if status_of(&run) == pb::RunStatus::Cancelled {
            close_barriers(broker, &run.id).await?;
        }
        return Err(BrokerError::RunClosed {
            run: run.id.clone(),
            status: crate::app::status_name(run.status),
        });
    }
    let reason = if req.reason.is_empty() {
        format!("cancelled by {}", caller.principal)
    } else {
        req.reason.clone()
    };
    let ended = end(broker, &run.id, RunEnd::Cancelled(reason)).await?;
    if ended.status != pb::RunStatus::Cancelled as i32 {
        // It ended another way while being cancelled.
        return Err(BrokerError::RunClosed {
            run: ended.id.clone(),
            status: crate::app::status_name(ended.status),
        });
    }
    tracing::info!(run_id = %ended.id, by = %caller.principal, "run cancelled");
    Ok(pb::CancelRunResponse { run: Some(ended) })
}

/// What it took to get a run where it is (signal 4), from its timeline.
pub fn stats_of(timeline: &[pb::Event]) -> pb::RunStats {
    let mut stats = pb::RunStats::default();
    let mut accepted = std::collections::HashSet::new();
    for e in timeline {
        match pb::EventKind::try_from(e.kind) {
            Ok(pb::EventKind::HandoffAccepted) if accepted.insert(e.handoff_id.as_str()) => {
                stats.handoffs += 1;
                stats.hops = stats.hops.max(e.depth);
                stats.reasks += u32::from(!e.reasks.is_empty());
                stats.dropped_fields += u32::try_from(e.dropped_fields.len()).unwrap_or(u32::MAX);
            }
            Ok(pb::EventKind::BarrierReleased) if accepted.insert(e.handoff_id.as_str()) => {
                stats.handoffs += 1;
                stats.hops = stats.hops.max(e.depth);
            }
            Ok(pb::EventKind::Redelivered) => stats.redeliveries += 1,
            _ => {}
        }
    }
    stats
}

/// How a run ends, decided once for each of its lives (see
/// [`crate::store::RunStates::decide_end`]): `end` when nothing was decided
/// before, else what was. A run holding only how it ended.
pub async fn decide(broker: &Broker, run: &pb::Run, end: &RunEnd) -> Result<pb::Run, BrokerError> {
    match end {
        RunEnd::Decided(how) => Ok(pb::Run::clone(how)),
        end => decide_as(broker, run, ending(end)).await,
    }
}

/// [`decide`], for an end recorded as `how` (see [`ending`]).
pub async fn decide_as(
    broker: &Broker,
    run: &pb::Run,
    how: pb::Run,
) -> Result<pb::Run, BrokerError> {
    match broker
        .store()
        .decide_end(&run.id, run.resumed, &how, None)
        .await?
    {
        Decided::Now => Ok(how),
        Decided::Before(before) => Ok(*before),
        Decided::RevisionTaken => Err(BrokerError::Internal(
            "a run's end decided without state found a revision taken".into(),
        )),
    }
}

/// How a run ends, as recorded when it is decided: a run holding only its
/// status, result or failure, and when.
pub fn ending(end: &RunEnd) -> pb::Run {
    let mut how = pb::Run {
        ended_at: Some(now()),
        ..Default::default()
    };
    match end {
        RunEnd::Completed {
            handoff_id,
            result,
            result_ref,
        } => {
            how.status = pb::RunStatus::Completed as i32;
            how.result = result.clone();
            how.result_ref = result_ref.clone();
            how.result_handoff_id = handoff_id.clone();
        }
        RunEnd::Failed(reason) => {
            how.status = pb::RunStatus::Failed as i32;
            how.failure = reason.clone();
        }
        RunEnd::TimedOut(reason) => {
            how.status = pb::RunStatus::TimedOut as i32;
            how.failure = reason.clone();
        }
        RunEnd::Cancelled(reason) => {
            how.status = pb::RunStatus::Cancelled as i32;
            how.failure = reason.clone();
        }
        RunEnd::Decided(how) => return pb::Run::clone(how),
    }
    how
}

/// Ends a run (compare-and-set, retried on conflict) and tells its
/// owner: as decided (see [`decide`]), which may be another way than
/// `end`. Returns the run as it ended; if it had already ended, returns
/// it unchanged; the end event is re-published (deduplicated) while
/// within the dedupe window, so a crash between the two steps cannot
/// leave an ended run unannounced.
pub async fn end(broker: &Broker, run_id: &str, end: RunEnd) -> Result<pb::Run, BrokerError> {
    // What it took, counted once before the compare-and-set loop (the
    // events of the handoffs that led here are stored before it).
    let mut stats = None;
    // The handoffs its timeline holds accepted, read with the stats.
    let mut accepted: Option<std::collections::HashSet<String>> = None;
    // The decision read, for the life (`resumed`) it was read for.
    let mut decided: Option<(u32, pb::Run)> = None;
    loop {
        let (mut run, rev) = broker.run(run_id).await?;
        let status = pb::RunStatus::try_from(run.status).unwrap_or(pb::RunStatus::Unspecified);
        if status.is_terminal() {
            // Re-announce only while JetStream still deduplicates the
            // end event; past that window the announcement was made.
            let recent = run
                .ended_at
                .and_then(|t| SystemTime::try_from(t).ok())
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .is_some_and(|age| age < broker.config().dedupe_window);
            if recent {
                announce_end(broker, &run).await?;
            }
            return Ok(run);
        }
        if stats.is_none() {
            // What it took is a figure, not a condition of the end.
            stats = match broker.store().run_events(run_id).await {
                Ok(timeline) => {
                    accepted = Some(
                        timeline
                            .iter()
                            .filter(|e| e.kind == pb::EventKind::HandoffAccepted as i32)
                            .map(|e| e.handoff_id.clone())
                            .collect(),
                    );
                    Some(stats_of(&timeline))
                }
                Err(e) => {
                    tracing::warn!(error = %e, run_id, "run stats not counted");
                    None
                }
            };
        }
        // How it ends is decided once, beside its state (a final
        // handoff's delta and its end are stored together): the run
        // record follows what was decided, whoever decided it.
        let how = match &decided {
            Some((life, how)) if *life == run.resumed => how,
            _ => {
                let how = decide(broker, &run, &end).await?;
                &decided.insert((run.resumed, how)).1
            }
        };
        run.stats = stats;
        // When it is recorded (the end event is announced again while
        // that is recent).
        run.ended_at = Some(now());
        run.status = how.status;
        run.result = how.result.clone();
        run.result_ref = how.result_ref.clone();
        run.result_handoff_id = how.result_handoff_id.clone();
        run.failure = how.failure.clone();
        if broker.store().update_run(&run, rev).await? {
            broker.forget_run(&run.id);
            broker.states().forget(&run.id);
            let outcome = match status_of(&run) {
                pb::RunStatus::Completed => "completed",
                pb::RunStatus::Failed => "failed",
                pb::RunStatus::Cancelled => "cancelled",
                _ => "timed_out",
            };
            let handoffs = run.stats.as_ref().map_or(0, |s| s.handoffs);
            broker
                .metrics()
                .run_resolved(pipeline_of(&run), outcome, u64::from(handoffs));
            let decided_at = decided.as_ref().and_then(|(_, how)| how.ended_at);
            if let Some(accepted) = &accepted {
                announce_result(broker, &run, accepted, decided_at).await;
            }
            if status_of(&run) == pb::RunStatus::Cancelled {
                // Whoever recorded a cancel (the cancel, or a call that
                // found it decided), its barriers are closed.
                close_barriers(broker, &run.id).await?;
            }
            announce_end(broker, &run).await?;
            return Ok(run);
        }
    }
}

/// How long a final handoff that decided its run's end has to announce
/// its acceptance before the run's end announces it in its stead.
const RESULT_ANNOUNCE_GRACE: Duration = Duration::from_secs(10);

/// A run completed by a final handoff whose call stopped after deciding
/// the end and before announcing its acceptance (the end recorded by
/// another call): its `handoff_accepted` is published, with what the
/// run's end knows of it, once the final had time to publish its own
/// (deduplicated against it). Logged, not returned.
async fn announce_result(
    broker: &Broker,
    run: &pb::Run,
    accepted: &std::collections::HashSet<String>,
    decided_at: Option<prost_types::Timestamp>,
) {
    if status_of(run) != pb::RunStatus::Completed
        || run.result_handoff_id.is_empty()
        || accepted.contains(&run.result_handoff_id)
    {
        return;
    }
    let age = decided_at
        .and_then(|t| SystemTime::try_from(t).ok())
        .and_then(|t| SystemTime::now().duration_since(t).ok());
    if age.is_none_or(|age| age < RESULT_ANNOUNCE_GRACE) {
        return;
    }
    let event = pb::Event {
        kind: pb::EventKind::HandoffAccepted as i32,
        run_id: run.id.clone(),
        owner: run.owner.clone(),
        handoff_id: run.result_handoff_id.clone(),
        ..Default::default()
    };
    let msg_id = format!("accepted-{}", run.result_handoff_id);
    if let Err(e) = broker.emit(event, &msg_id).await {
        tracing::warn!(error = %e, run_id = %run.id, "the result's acceptance not announced");
    }
}

/// Records on the run the end decided before (`how`), for a caller that
/// found it decided and is refused: a decision whose maker stopped before
/// recording it is not left waiting for the run's deadline. Logged, not
/// returned.
pub async fn finish_decided(broker: &Broker, run_id: &str, how: pb::Run) {
    if let Err(e) = end(broker, run_id, RunEnd::Decided(Box::new(how))).await {
        tracing::warn!(error = %e, run_id, "the run's decided end not recorded; the next end records it");
    }
}

/// A run's status.
pub fn status_of(run: &pb::Run) -> pb::RunStatus {
    pb::RunStatus::try_from(run.status).unwrap_or(pb::RunStatus::Unspecified)
}

/// Publishes the event that tells a run's owner how it ended.
pub async fn announce_end(broker: &Broker, run: &pb::Run) -> Result<(), BrokerError> {
    let status = pb::RunStatus::try_from(run.status).unwrap_or(pb::RunStatus::Unspecified);
    let kind = match status {
        pb::RunStatus::Completed => pb::EventKind::RunCompleted,
        pb::RunStatus::Failed => pb::EventKind::RunFailed,
        pb::RunStatus::TimedOut => pb::EventKind::RunTimedOut,
        pb::RunStatus::Cancelled => pb::EventKind::RunCancelled,
        _ => return Ok(()),
    };
    let event = pb::Event {
        kind: kind as i32,
        at: run.ended_at,
        run_id: run.id.clone(),
        owner: run.owner.clone(),
        handoff_id: run.result_handoff_id.clone(),
        reason: run.failure.clone(),
        run_status: run.status,
        pipeline: run.pipeline.clone(),
        ..Default::default()
    };
    // A run resumed by a redrive ends again under another id.
    let msg_id = match run.resumed {
        0 => format!("end-{}", run.id),
        n => format!("end-{}-{n}", run.id),
    };
    broker.emit(event, &msg_id).await?;
    schedule_purge(broker, run).await?;
    if kind == pb::EventKind::RunCompleted {
        ask_judge(broker, run).await?;
    }
    Ok(())
}

/// Hands the run's judge (if it has one) its `JudgeRequest`; repeated
/// calls store it once.
async fn ask_judge(broker: &Broker, run: &pb::Run) -> Result<(), BrokerError> {
    let Some(judge) = run.judge.as_ref().filter(|j| !j.agent.is_empty()) else {
        return Ok(());
    };
    if run.intent.is_some() {
        return Ok(());
    }
    let request = pb::JudgeRequest {
        run_id: run.id.clone(),
        pipeline: pipeline_of(run).to_string(),
        pinned: run.pinned.clone(),
        result: run.result.clone(),
        threshold: judge.threshold,
        result_ref: run.result_ref.clone(),
    };
    let payload = prost_types::Any::from_msg(&request)
        .map_err(|e| BrokerError::Internal(format!("encoding the judge request: {e}")))?;
    let envelope = pb::HandoffEnvelope {
        id: rules::derived_id(&format!("judge\u{0}{}", run.id)),
        run_id: run.id.clone(),
        target_agent: judge.agent.clone(),
        payload: Some(payload),
        confidence: 1.0,
        parent_ids: vec![run.result_handoff_id.clone()],
        depth: 1,
        created_at: Some(now()),
        judge: true,
        ..Default::default()
    };
    let max_payload = broker.store().max_payload();
    if max_payload > 0 && envelope.encoded_len() > max_payload {
        tracing::warn!(run_id = %run.id, size = envelope.encoded_len(), "the judge request is larger than NATS takes; the run is not judged");
        return Ok(());
    }
    broker.store().put_handoff(&envelope).await?;
    Ok(())
}

/// Schedules the purge of an ended run, `retention` after its end
/// (deduplicated: a re-announced end schedules nothing more).
async fn schedule_purge(broker: &Broker, run: &pb::Run) -> Result<(), BrokerError> {
    let ended = run
        .ended_at
        .and_then(|t| SystemTime::try_from(t).ok())
        .unwrap_or_else(SystemTime::now);
    let timer = pb::Timer {
        run_id: run.id.clone(),
        due: Some((ended + broker.config().retention).into()),
        ..Default::default()
    };
    broker.store().schedule(&timer, TimerKind::RunPurge).await
}

/// Removes an ended run, `retention` after its end (a durable timer
/// fired): its `run_purged` event is stored first, then everything kept
/// by the run's id is removed, the run record last, so a purge that
/// stops half-way is done again when its timer comes back. A run that
/// no longer exists is left alone.
pub async fn purge(broker: &Broker, run_id: &str) -> Result<(), BrokerError> {
    let Some((run, _)) = broker.store().run(run_id).await? else {
        return Ok(());
    };
    let status = pb::RunStatus::try_from(run.status).unwrap_or(pb::RunStatus::Unspecified);
    if !status.is_terminal() {
        tracing::warn!(run_id, "purge of a run that has not ended skipped");
        return Ok(());
    }
    let event = pb::Event {
        kind: pb::EventKind::RunPurged as i32,
        run_id: run.id.clone(),
        owner: run.owner.clone(),
        run_status: run.status,
        pipeline: run.pipeline.clone(),
        ..Default::default()
    };
    let sequence = broker.emit(event, &format!("purged-{}", run.id)).await?;
    broker.store().purge_run(&run.id, sequence).await?;
    broker.forget_run(&run.id);
    tracing::info!(run_id, "run purged");
    Ok(())
}

/// Ends a run whose deadline passed (a durable timer fired). A run that
/// ended first, or no longer exists, is left alone.
pub async fn time_out(broker: &Broker, run_id: &str, due: SystemTime) -> Result<(), BrokerError> {
    let reason = format!("deadline {} passed", humantime::format_rfc3339_millis(due));
    match end(broker, run_id, RunEnd::TimedOut(reason)).await {
        Ok(run) => {
            if run.status == pb::RunStatus::TimedOut as i32 {
                tracing::info!(run_id = %run.id, "run timed out");
            }
            Ok(())
        }
        Err(BrokerError::RunNotFound(_)) => Ok(()),
        Err(e) => Err(e),
    }
}
