//! Reading what happened: `Watch` (events as they are stored, resumable)
//! and `ListDeadLetters`.

use futures::{stream::BoxStream, StreamExt};
use handoff_proto::pb;

use crate::{
    app::{
        auth::{self, Caller},
        Broker,
    },
    error::BrokerError,
    rules::{grants::Action, names, watch},
};

/// The events a watch asks for, from `from_sequence` on (0: new events
/// only). The store's reader is created before this returns, so nothing
/// stored after `Watch` answers is missed.
pub async fn watch(
    broker: &Broker,
    caller: &Caller,
    req: pb::WatchRequest,
) -> Result<BoxStream<'static, Result<pb::Event, BrokerError>>, BrokerError> {
    let narrowed = watch::narrow(&req)?;
    // Who may: a reader watches anything; an owner watches its own runs
    // (a watch of one run, or of one owner's runs).
    if !caller.may(Action::Read, "") {
        let owner = if req.run_id.is_empty() {
            req.owner.clone()
        } else {
            broker.run(&req.run_id).await?.0.owner
        };
        if owner.is_empty() || (!req.owner.is_empty() && req.owner != owner) {
            auth::require(broker, caller, Action::Read, "", None).await?;
        }
        auth::require(broker, caller, Action::Own, &owner, None).await?;
    }
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
    caller: &Caller,
    req: pb::ListDeadLettersRequest,
) -> Result<pb::ListDeadLettersResponse, BrokerError> {
    auth::require(broker, caller, Action::Read, "", None).await?;
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
