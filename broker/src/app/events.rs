//! Reading what happened: `Watch` (events as they are stored, resumable)
//! and `ListDeadLetters`.

use futures::{stream::BoxStream, StreamExt};
use handoff_proto::pb;

use crate::{
    app::{
        access,
        auth::{self, Caller},
        Broker,
    },
    error::BrokerError,
    rules::{grants::Action, names, watch},
};

/// A watch: its events, and what its caller must go on being allowed for
/// it to stay open.
pub type Watching = (
    BoxStream<'static, Result<pb::Event, BrokerError>>,
    auth::Standing,
);

/// The events a watch asks for, from `from_sequence` on (0: new events
/// only). The store's reader is created before this returns, so nothing
/// stored after `Watch` answers is missed.
pub async fn watch(
    broker: &Broker,
    caller: &Caller,
    req: pb::WatchRequest,
) -> Result<Watching, BrokerError> {
    let narrowed = watch::narrow(&req)?;
    // Who may: a reader watches anything; an owner watches its own runs
    // (a watch of one run, or of one owner's runs).
    let mut standing = auth::Standing::Watch(None);
    if !caller.may(Action::Read, "") {
        let owner = if req.run_id.is_empty() {
            req.owner.clone()
        } else {
            access::read(broker, caller, &req.run_id, "").await?.owner
        };
        if owner.is_empty() || (!req.owner.is_empty() && req.owner != owner) {
            auth::require(broker, caller, Action::Read, "").await?;
        }
        auth::require(broker, caller, Action::Own, &owner).await?;
        standing = auth::Standing::Watch(Some(owner));
    }
    let events = broker
        .store()
        .watch_events(narrowed.run_id.as_deref(), narrowed.kind, req.from_sequence)
        .await?;
    let events = events
        .filter(move |e| {
            let keep = match e {
                Ok(e) => watch::matches(&req, e),
                Err(_) => true,
            };
            std::future::ready(keep)
        })
        .boxed();
    Ok((events, standing))
}

/// Dead letters, oldest first.
pub async fn dead_letters(
    broker: &Broker,
    caller: &Caller,
    req: pb::ListDeadLettersRequest,
) -> Result<pb::ListDeadLettersResponse, BrokerError> {
    auth::require(broker, caller, Action::Read, "").await?;
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
