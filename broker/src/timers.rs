//! Durable timers: run deadlines that fire once, on whichever replica is up.
//!
//! A timer is a message in the work-queue stream `HANDOFF_TIMERS`, read by
//! one durable consumer that every replica pulls from. A timer not yet due
//! is negatively acknowledged with a delay equal to the time left, so
//! JetStream itself holds it until then; a due timer ends the run with
//! compare-and-set (so a run that completed first is left alone) and is
//! acked. Nothing is kept in memory: a restarted broker picks up where the
//! stream left off.

use std::time::{Duration, SystemTime};

use async_nats::jetstream::AckKind;
use futures::StreamExt;
use handoff_proto::pb;
use prost::Message as _;

use crate::{
    broker::{Broker, RunEnd},
    error::BrokerError,
    store::TIMERS_CONSUMER,
};

/// Longest single wait handed to JetStream; longer timers are re-checked.
const MAX_DELAY: Duration = Duration::from_secs(3600);

/// Schedules a run's deadline (idempotent per run).
pub async fn schedule_deadline(
    broker: &Broker,
    run_id: &str,
    due: prost_types::Timestamp,
) -> Result<(), BrokerError> {
    let timer = pb::Timer {
        run_id: run_id.to_string(),
        due: Some(due),
        barrier_id: String::new(),
    };
    broker
        .store()
        .publish(
            format!("handoff.v1.timers.run.{run_id}"),
            &format!("deadline-{run_id}"),
            timer.encode_to_vec().into(),
        )
        .await
        .map(|_| ())
}

/// Schedules a barrier's timer: its timeout (`what` = "timeout") or the
/// check that its release was published ("release"); idempotent per
/// barrier and kind.
pub async fn schedule_barrier(
    broker: &Broker,
    run_id: &str,
    barrier_id: &str,
    due: prost_types::Timestamp,
    what: &str,
) -> Result<(), BrokerError> {
    let timer = pb::Timer {
        run_id: run_id.to_string(),
        due: Some(due),
        barrier_id: barrier_id.to_string(),
    };
    broker
        .store()
        .publish(
            format!("handoff.v1.timers.barrier.{run_id}.{barrier_id}.{what}"),
            &format!("barrier-{what}-{run_id}-{barrier_id}"),
            timer.encode_to_vec().into(),
        )
        .await
        .map(|_| ())
}

/// Fires due timers until the broker drains.
pub async fn run(broker: Broker) {
    let mut backoff = Duration::from_millis(200);
    loop {
        tokio::select! {
            r = pump(&broker) => {
                if let Err(e) = r {
                    tracing::warn!(error = %e, "timer loop failed; retrying");
                }
            }
            _ = broker.drained() => return,
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn pump(broker: &Broker) -> Result<(), BrokerError> {
    let consumer: async_nats::jetstream::consumer::PullConsumer = broker
        .store()
        .timers
        .get_consumer(TIMERS_CONSUMER)
        .await
        .map_err(|e| BrokerError::nats("opening the timer consumer", e))?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(100)
        .messages()
        .await
        .map_err(|e| BrokerError::nats("reading timers", e))?;
    while let Some(msg) = messages.next().await {
        let msg = msg.map_err(|e| BrokerError::nats("reading timers", e))?;
        let Ok(timer) = pb::Timer::decode(msg.payload.clone()) else {
            tracing::error!("undecodable timer dropped");
            let _ = msg.ack_with(AckKind::Term).await;
            continue;
        };
        let due = timer
            .due
            .and_then(|t| SystemTime::try_from(t).ok())
            .unwrap_or(SystemTime::UNIX_EPOCH);
        match due.duration_since(SystemTime::now()) {
            Ok(left) if left > Duration::from_millis(5) => {
                msg.ack_with(AckKind::Nak(Some(left.min(MAX_DELAY))))
                    .await
                    .map_err(|e| BrokerError::nats("rescheduling a timer", e))?;
            }
            _ if !timer.barrier_id.is_empty() => {
                let kind = if msg.subject.ends_with(".timeout") {
                    crate::rpc::barriers::Timer::Timeout
                } else {
                    crate::rpc::barriers::Timer::ReleaseCheck
                };
                crate::rpc::barriers::fire(broker, &timer.run_id, &timer.barrier_id, kind).await?;
                msg.double_ack()
                    .await
                    .map_err(|e| BrokerError::nats("acking a timer", e))?;
            }
            _ => {
                let reason = format!("deadline {} passed", humantime::format_rfc3339_millis(due));
                match broker
                    .end_run(&timer.run_id, RunEnd::TimedOut(reason))
                    .await
                {
                    Ok(run) => {
                        if run.status == pb::RunStatus::TimedOut as i32 {
                            tracing::info!(run_id = %run.id, "run timed out");
                        }
                    }
                    Err(BrokerError::RunNotFound(_)) => {}
                    Err(e) => return Err(e),
                }
                msg.double_ack()
                    .await
                    .map_err(|e| BrokerError::nats("acking a timer", e))?;
            }
        }
    }
    Ok(())
}
