//! The timer adapter: fires durable timers (run deadlines, barrier
//! timeouts and release checks, queue waits, run purges) once, on
//! whichever replica is up, by calling the use cases.
//!
//! A timer is a message in the work-queue stream `HANDOFF_TIMERS`, read by
//! one durable consumer that every replica pulls from (the purges by one
//! of their own, see [`purges`]). A timer not yet due
//! is negatively acknowledged with a delay equal to the time left, so
//! JetStream itself holds it until then; a due timer ends the run with
//! compare-and-set (so a run that completed first is left alone) and is
//! acked. Nothing is kept in memory: a restarted broker picks up where the
//! stream left off.

use std::time::{Duration, SystemTime};

use async_nats::jetstream::AckKind;
use futures::{StreamExt, TryStreamExt};
use handoff_proto::pb;
use prost::Message as _;

use crate::{
    app::{barriers, deliveries, input, runs, Broker},
    error::BrokerError,
    store::jetstream::{JetStream, PURGES_CONSUMER, TIMERS_CONSUMER},
};

/// Longest single wait handed to JetStream; longer timers are re-checked.
const MAX_DELAY: Duration = Duration::from_secs(3600);

/// Fires due timers, and purges ended runs when due, until the broker
/// drains.
pub async fn run(broker: Broker, store: JetStream) {
    tokio::join!(
        keep_pumping(&broker, || pump(&broker, &store)),
        keep_pumping(&broker, || purges(&broker, &store)),
    );
}

/// Runs `pump` again after each failure (backing off), until the broker
/// drains.
async fn keep_pumping<F, Fut>(broker: &Broker, pump: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<(), BrokerError>>,
{
    let mut backoff = Duration::from_millis(200);
    loop {
        tokio::select! {
            r = pump() => {
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

/// Purges ended runs as their purges fall due. They come in the order
/// they fall due, so JetStream holds only the next few (`handoff_purges`
/// lets 16 be out at once), each until it is due; they are done up to
/// 16 at a time.
async fn purges(broker: &Broker, store: &JetStream) -> Result<(), BrokerError> {
    let consumer: async_nats::jetstream::consumer::PullConsumer = store
        .timers
        .get_consumer(PURGES_CONSUMER)
        .await
        .map_err(|e| BrokerError::nats("opening the purge consumer", e))?;
    let messages = consumer
        .stream()
        .max_messages_per_batch(16)
        .messages()
        .await
        .map_err(|e| BrokerError::nats("reading purges", e))?;
    messages
        .map(|msg| msg.map_err(|e| BrokerError::nats("reading purges", e)))
        .try_for_each_concurrent(16, |msg| async move {
            let Ok(timer) = pb::Timer::decode(msg.payload.clone()) else {
                tracing::error!("undecodable purge dropped");
                let _ = msg.ack_with(AckKind::Term).await;
                return Ok(());
            };
            if let Some(left) = left(&timer) {
                return msg
                    .ack_with(AckKind::Nak(Some(left.min(MAX_DELAY))))
                    .await
                    .map_err(|e| BrokerError::nats("rescheduling a purge", e));
            }
            match runs::purge(broker, &timer.run_id).await {
                Ok(()) => msg
                    .double_ack()
                    .await
                    .map_err(|e| BrokerError::nats("acking a purge", e)),
                Err(e) => {
                    // Done again once JetStream offers it again.
                    tracing::warn!(run_id = %timer.run_id, error = %e, "purge failed; it will be retried");
                    Ok(())
                }
            }
        })
        .await
}

/// How long until `timer` is due (`None`: it is due).
fn left(timer: &pb::Timer) -> Option<Duration> {
    let due = timer
        .due
        .and_then(|t| SystemTime::try_from(t).ok())
        .unwrap_or(SystemTime::UNIX_EPOCH);
    due.duration_since(SystemTime::now())
        .ok()
        .filter(|left| *left > Duration::from_millis(5))
}

async fn pump(broker: &Broker, store: &JetStream) -> Result<(), BrokerError> {
    let consumer: async_nats::jetstream::consumer::PullConsumer = store
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
        match left(&timer) {
            Some(left) => {
                msg.ack_with(AckKind::Nak(Some(left.min(MAX_DELAY))))
                    .await
                    .map_err(|e| BrokerError::nats("rescheduling a timer", e))?;
            }
            _ if !timer.input_request_id.is_empty() => {
                let check = timer.sequence == u64::MAX;
                input::time_out(broker, &timer.run_id, &timer.input_request_id, check).await?;
                msg.double_ack()
                    .await
                    .map_err(|e| BrokerError::nats("acking a timer", e))?;
            }
            _ if !timer.agent.is_empty() => {
                deliveries::queue_wait_passed(broker, &timer.agent, timer.sequence).await?;
                msg.double_ack()
                    .await
                    .map_err(|e| BrokerError::nats("acking a timer", e))?;
            }
            _ if !timer.barrier_id.is_empty() => {
                let kind = if msg.subject.ends_with(".timeout") {
                    barriers::Timer::Timeout
                } else {
                    barriers::Timer::ReleaseCheck
                };
                barriers::fire(broker, &timer.run_id, &timer.barrier_id, kind).await?;
                msg.double_ack()
                    .await
                    .map_err(|e| BrokerError::nats("acking a timer", e))?;
            }
            _ => {
                runs::time_out(broker, &timer.run_id, due).await?;
                msg.double_ack()
                    .await
                    .map_err(|e| BrokerError::nats("acking a timer", e))?;
            }
        }
    }
    Ok(())
}
