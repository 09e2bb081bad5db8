//! `Watch` and `ListDeadLetters`: reading the event and dead-letter streams.

use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use futures::StreamExt;
use handoff_proto::pb;
use prost::Message as _;
use tokio::sync::mpsc;
use tonic::Status;

use crate::{broker::Broker, error::BrokerError, names, rpc::runs::read_stream};

/// Checks a watch request and returns the NATS filter subject it reads.
pub fn filter_subject(req: &pb::WatchRequest) -> Result<String, BrokerError> {
    names::validate_optional("run_id", &req.run_id)?;
    names::validate_optional("agent", &req.agent)?;
    names::validate_optional("owner", &req.owner)?;
    for k in &req.kinds {
        match pb::EventKind::try_from(*k) {
            Ok(pb::EventKind::Unspecified) | Err(_) => {
                return Err(BrokerError::Malformed(format!(
                    "kinds: {k} is not an event kind"
                )))
            }
            Ok(_) => {}
        }
    }
    let run = if req.run_id.is_empty() {
        "*"
    } else {
        req.run_id.as_str()
    };
    let kind = match req.kinds.as_slice() {
        [one] => pb::EventKind::try_from(*one)
            .map(|k| k.token())
            .unwrap_or("*"),
        _ => "*",
    };
    Ok(format!("handoff.v1.events.{run}.{kind}"))
}

fn matches(req: &pb::WatchRequest, e: &pb::Event) -> bool {
    (req.agent.is_empty() || e.agent == req.agent || e.source_agent == req.agent)
        && (req.owner.is_empty() || e.owner == req.owner)
        && (req.kinds.is_empty() || req.kinds.contains(&e.kind))
}

/// The events a watch reads: an ordered consumer created before the RPC
/// answers, so nothing published after `Watch` returns is missed.
pub type Messages = async_nats::jetstream::consumer::pull::Ordered;

/// Opens the ordered consumer of a watch, starting at `from_sequence`, or
/// at new events when 0.
pub async fn open(broker: &Broker, req: &pb::WatchRequest) -> Result<Messages, BrokerError> {
    let filter = filter_subject(req)?;
    let deliver_policy = if req.from_sequence > 0 {
        DeliverPolicy::ByStartSequence {
            start_sequence: req.from_sequence,
        }
    } else {
        DeliverPolicy::New
    };
    let consumer = broker
        .store()
        .events
        .create_consumer(pull::OrderedConfig {
            filter_subject: filter,
            deliver_policy,
            ..Default::default()
        })
        .await
        .map_err(|e| BrokerError::nats("watching", e))?;
    consumer
        .messages()
        .await
        .map_err(|e| BrokerError::nats("watching", e))
}

/// Streams matching events into `tx` until the client leaves or the
/// broker drains.
pub async fn run(
    broker: Broker,
    req: pb::WatchRequest,
    mut messages: Messages,
    tx: mpsc::Sender<Result<pb::Event, Status>>,
) {
    loop {
        let next = tokio::select! {
            m = messages.next() => m,
            _ = tx.closed() => return,
            _ = broker.drained() => {
                let _ = tx.send(Err(Status::unavailable("broker is draining; resume from the last sequence"))).await;
                return;
            }
        };
        let msg = match next {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                let _ = tx.send(Err(BrokerError::nats("watching", e).into())).await;
                return;
            }
            None => return,
        };
        let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
        let Ok(mut event) = pb::Event::decode(msg.payload.clone()) else {
            tracing::warn!(seq, "undecodable event skipped");
            continue;
        };
        event.sequence = seq;
        if matches(&req, &event) && tx.send(Ok(event)).await.is_err() {
            return;
        }
    }
}

/// Dead letters, oldest first.
pub async fn dead_letters(
    broker: &Broker,
    req: pb::ListDeadLettersRequest,
) -> Result<pb::ListDeadLettersResponse, BrokerError> {
    names::validate_optional("agent", &req.agent)?;
    let agent = if req.agent.is_empty() {
        "*"
    } else {
        req.agent.as_str()
    };
    let limit = match req.limit {
        0 => 100,
        n => n.min(10_000) as usize,
    };
    let mut dead_letters = Vec::new();
    for (seq, payload) in read_stream(
        &broker.store().dead,
        &format!("handoff.v1.dead.{agent}"),
        limit,
    )
    .await?
    {
        if let Ok(mut d) = pb::DeadLetter::decode(payload) {
            d.sequence = seq;
            dead_letters.push(d);
        }
    }
    Ok(pb::ListDeadLettersResponse { dead_letters })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters() {
        let mut r = pb::WatchRequest::default();
        assert_eq!(
            filter_subject(&r).ok().as_deref(),
            Some("handoff.v1.events.*.*")
        );
        r.run_id = "r1".into();
        r.kinds = vec![pb::EventKind::RunFailed as i32];
        assert_eq!(
            filter_subject(&r).ok().as_deref(),
            Some("handoff.v1.events.r1.run_failed")
        );
        r.kinds = vec![99];
        assert!(filter_subject(&r).is_err());
        r.kinds.clear();
        r.run_id = "a.>".into();
        assert!(filter_subject(&r).is_err());
    }
}
