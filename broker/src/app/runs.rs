//! Runs: start one, end one (completed, failed, timed out) and tell its
//! owner, read one with its timeline.

use std::time::{Duration, SystemTime};

use handoff_proto::pb;
use prost::Message as _;

use crate::{
    app::{
        access,
        auth::{self, Caller},
        now, state, Broker,
    },
    error::BrokerError,
    rules::{
        grants::Action,
        handoff::{self as rules, pipeline_of},
        names,
    },
    store::TimerKind,
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
}

/// Creates a run. Repeating a `StartRun` with the same id and owner answers
/// the existing run (so a client may retry); another owner is ALREADY_EXISTS.
pub async fn start(
    broker: &Broker,
    caller: &Caller,
    req: pb::StartRunRequest,
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
        created_at: Some(now()),
        deadline,
        max_depth,
        pinned: Some(pinned),
        pipeline: req.pipeline.clone(),
        judge,
        has_state: seed.is_some(),
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
        if existing.owner != run.owner {
            return Err(BrokerError::RunExists(run_id));
        }
        existing
    };
    if let Some(due) = run.deadline {
        let timer = pb::Timer {
            run_id: run.id.clone(),
            due: Some(due),
            barrier_id: String::new(),
            ..Default::default()
        };
        broker
            .store()
            .schedule(&timer, TimerKind::RunDeadline)
            .await?;
    }
    let event = pb::Event {
        kind: pb::EventKind::RunStarted as i32,
        run_id: run.id.clone(),
        owner: run.owner.clone(),
        run_status: run.status,
        at: run.created_at,
        pipeline: run.pipeline.clone(),
        ..Default::default()
    };
    broker.emit(event, &format!("start-{}", run.id)).await?;
    tracing::info!(run_id = %run.id, owner = %run.owner, max_depth, "run started");
    Ok(pb::StartRunResponse { run: Some(run) })
}

/// A run with its whole timeline.
pub async fn get(
    broker: &Broker,
    caller: &Caller,
    req: pb::GetRunRequest,
) -> Result<pb::GetRunResponse, BrokerError> {
    names::validate("run_id", &req.run_id)?;
    let run = access::read(broker, caller, &req.run_id, "").await?;
    let timeline = broker.store().run_events(&req.run_id).await?;
    let mut run = run;
    if run.stats.is_none() {
        run.stats = Some(stats_of(&timeline));
    }
    Ok(pb::GetRunResponse {
        run: Some(run),
        timeline,
    })
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

/// Ends a run (compare-and-set, retried on conflict) and tells its
/// owner. Returns the run as it ended; if it had already ended, returns
/// it unchanged; the end event is re-published (deduplicated) while
/// within the dedupe window, so a crash between the two steps cannot
/// leave an ended run unannounced.
pub async fn end(broker: &Broker, run_id: &str, end: RunEnd) -> Result<pb::Run, BrokerError> {
    // What it took, counted once before the compare-and-set loop (the
    // events of the handoffs that led here are stored before it).
    let mut stats = None;
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
                Ok(timeline) => Some(stats_of(&timeline)),
                Err(e) => {
                    tracing::warn!(error = %e, run_id, "run stats not counted");
                    None
                }
            };
        }
        run.stats = stats;
        run.ended_at = Some(now());
        match &end {
            RunEnd::Completed {
                handoff_id,
                result,
                result_ref,
            } => {
                run.status = pb::RunStatus::Completed as i32;
                run.result = result.clone();
                run.result_ref = result_ref.clone();
                run.result_handoff_id = handoff_id.clone();
            }
            RunEnd::Failed(reason) => {
                run.status = pb::RunStatus::Failed as i32;
                run.failure = reason.clone();
            }
            RunEnd::TimedOut(reason) => {
                run.status = pb::RunStatus::TimedOut as i32;
                run.failure = reason.clone();
            }
        }
        if broker.store().update_run(&run, rev).await? {
            broker.forget_run(&run.id);
            broker.states().forget(&run.id);
            let outcome = match status_of(&run) {
                pb::RunStatus::Completed => "completed",
                pb::RunStatus::Failed => "failed",
                _ => "timed_out",
            };
            let handoffs = run.stats.as_ref().map_or(0, |s| s.handoffs);
            broker
                .metrics()
                .run_resolved(pipeline_of(&run), outcome, u64::from(handoffs));
            announce_end(broker, &run).await?;
            return Ok(run);
        }
    }
}

fn status_of(run: &pb::Run) -> pb::RunStatus {
    pb::RunStatus::try_from(run.status).unwrap_or(pb::RunStatus::Unspecified)
}

/// Publishes the event that tells a run's owner how it ended.
pub async fn announce_end(broker: &Broker, run: &pb::Run) -> Result<(), BrokerError> {
    let status = pb::RunStatus::try_from(run.status).unwrap_or(pb::RunStatus::Unspecified);
    let kind = match status {
        pb::RunStatus::Completed => pb::EventKind::RunCompleted,
        pb::RunStatus::Failed => pb::EventKind::RunFailed,
        pb::RunStatus::TimedOut => pb::EventKind::RunTimedOut,
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
    broker.emit(event, &format!("end-{}", run.id)).await?;
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
