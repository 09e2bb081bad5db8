//! Reading what happened: `Watch` (events as they are stored, resumable)
//! and `ListDeadLetters`.

use futures::{stream::BoxStream, StreamExt};
use handoff_proto::pb;

use crate::{
    app::Broker,
    error::BrokerError,
    rules::{names, watch},
};

/// The events a watch asks for, from `from_sequence` on (0: new events
/// only). The store's reader is created before this returns, so nothing
/// stored after `Watch` answers is missed.
pub async fn watch(
    broker: &Broker,
    req: pb::WatchRequest,
) -> Result<BoxStream<'static, Result<pb::Event, BrokerError>>, BrokerError> {
    let narrowed = watch::narrow(&req)?;
    let events = broker
        .store()
        .watch_events(narrowed.run_id.as_deref(), narrowed.kind, req.from_sequence)
        .await?;
    Ok(events
        .filter(move |e| {
            let keep = match e {
                Ok(e) => watch::matches(&req, e),
                Err(_) => true,
            };
            std::future::ready(keep)
        })
        .boxed())
}

/// Dead letters, oldest first.
pub async fn dead_letters(
    broker: &Broker,
    req: pb::ListDeadLettersRequest,
) -> Result<pb::ListDeadLettersResponse, BrokerError> {
    names::validate_optional("agent", &req.agent)?;
    let agent = (!req.agent.is_empty()).then_some(req.agent.as_str());
    let limit = match req.limit {
        0 => 100,
        n => n.min(10_000) as usize,
    };
    Ok(pb::ListDeadLettersResponse {
        dead_letters: broker.store().dead_letters(agent, limit).await?,
    })
}
