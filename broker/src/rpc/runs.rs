//! `StartRun` and `GetRun`.

use std::time::{Duration, SystemTime};

use futures::StreamExt;
use handoff_proto::pb;
use prost::Message as _;

use crate::{
    broker::{now, Broker},
    error::BrokerError,
    names, timers,
};

/// Creates a run. Repeating a `StartRun` with the same id and owner answers
/// the existing run (so a client may retry); another owner is ALREADY_EXISTS.
pub async fn start(
    broker: &Broker,
    req: pb::StartRunRequest,
) -> Result<pb::StartRunResponse, BrokerError> {
    let run_id = if req.run_id.is_empty() {
        uuid::Uuid::now_v7().to_string()
    } else {
        names::validate("run_id", &req.run_id)?;
        req.run_id.clone()
    };
    names::validate("owner", &req.owner)?;
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
        });
    }
    let deadline = match req.timeout {
        None => None,
        Some(t) => {
            let t = Duration::try_from(t)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| BrokerError::Malformed("timeout must be positive".to_string()))?;
            let due = SystemTime::now()
                .checked_add(t)
                .filter(|_| t <= Duration::from_secs(10 * 365 * 24 * 3600))
                .ok_or_else(|| BrokerError::Malformed("timeout is over 10 years".to_string()))?;
            Some(prost_types::Timestamp::from(due))
        }
    };
    let run = pb::Run {
        id: run_id.clone(),
        owner: req.owner.clone(),
        status: pb::RunStatus::Running as i32,
        created_at: Some(now()),
        deadline,
        max_depth,
        pinned: Some(pinned),
        ..Default::default()
    };
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
        timers::schedule_deadline(broker, &run.id, due).await?;
    }
    let event = pb::Event {
        kind: pb::EventKind::RunStarted as i32,
        run_id: run.id.clone(),
        owner: run.owner.clone(),
        run_status: run.status,
        at: run.created_at,
        ..Default::default()
    };
    broker.emit(event, &format!("start-{}", run.id)).await?;
    tracing::info!(run_id = %run.id, owner = %run.owner, max_depth, "run started");
    Ok(pb::StartRunResponse { run: Some(run) })
}

/// A run with its whole timeline.
pub async fn get(
    broker: &Broker,
    req: pb::GetRunRequest,
) -> Result<pb::GetRunResponse, BrokerError> {
    names::validate("run_id", &req.run_id)?;
    let (run, _) = broker.run(&req.run_id).await?;
    let timeline = read_events(
        broker,
        &format!("handoff.v1.events.{}.>", req.run_id),
        usize::MAX,
    )
    .await?;
    Ok(pb::GetRunResponse {
        run: Some(run),
        timeline,
    })
}

/// Reads the stored events on `filter` from the start, up to `limit`.
pub async fn read_events(
    broker: &Broker,
    filter: &str,
    limit: usize,
) -> Result<Vec<pb::Event>, BrokerError> {
    let mut out = Vec::new();
    for (seq, payload) in read_stream(&broker.store().events, filter, limit).await? {
        match pb::Event::decode(payload) {
            Ok(mut e) => {
                e.sequence = seq;
                out.push(e);
            }
            Err(e) => tracing::warn!(seq, error = %e, "undecodable event skipped"),
        }
    }
    Ok(out)
}

/// Reads a stream's messages on `filter` from its start, up to `limit`,
/// with an ordered consumer (nothing is acked or left behind).
pub async fn read_stream(
    stream: &async_nats::jetstream::stream::Stream,
    filter: &str,
    limit: usize,
) -> Result<Vec<(u64, bytes::Bytes)>, BrokerError> {
    use async_nats::jetstream::consumer::{pull, DeliverPolicy};
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: filter.to_string(),
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(|e| BrokerError::nats("reading events", e))?;
    let pending = consumer.cached_info().num_pending as usize;
    let want = pending.min(limit);
    let mut out = Vec::with_capacity(want);
    if want == 0 {
        return Ok(out);
    }
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| BrokerError::nats("reading events", e))?;
    while out.len() < want {
        let next = tokio::time::timeout(Duration::from_secs(5), messages.next())
            .await
            .map_err(|_| BrokerError::Unavailable("reading events timed out".to_string()))?;
        let Some(msg) = next else { break };
        let msg = msg.map_err(|e| BrokerError::nats("reading events", e))?;
        let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
        out.push((seq, msg.payload.clone()));
    }
    Ok(out)
}
