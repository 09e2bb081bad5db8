//! `Watch`: streams the events a use case selects until the client leaves,
//! the broker drains, or the caller's credentials stop allowing it (a
//! revoked token, a grant taken away: see [`auth::Live`]).

use futures::{stream::BoxStream, StreamExt};
use handoff_proto::pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Response, Status};

use crate::{
    app::{
        auth::{self, Caller, Credentials},
        events, Broker,
    },
    error::BrokerError,
    rpc::status::to_status,
};

/// Opens the watch (its reader exists before this answers, so nothing
/// stored afterwards is missed) and feeds it from a spawned task.
pub async fn watch(
    broker: &Broker,
    caller: &Caller,
    creds: Credentials,
    req: pb::WatchRequest,
) -> Result<Response<BoxStream<'static, Result<pb::Event, Status>>>, Status> {
    let (mut events, standing) = broker
        .bounded(events::watch(broker, caller, req))
        .await
        .map_err(to_status)?;
    let mut live = auth::Live::start(broker, creds, standing);
    let (tx, rx) = mpsc::channel::<Result<pb::Event, Status>>(256);
    let broker = broker.clone();
    tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                e = events.next() => e,
                _ = tx.closed() => return,
                refused = live.ended() => {
                    let _ = tx.send(Err(to_status(refused))).await;
                    return;
                }
                _ = broker.drained() => {
                    let draining = BrokerError::Draining(
                        "broker is draining; resume from the last sequence".to_string(),
                    );
                    let _ = tx.send(Err(to_status(draining))).await;
                    return;
                }
            };
            match next {
                Some(Ok(event)) => {
                    if let Err(refused) = live.check() {
                        let _ = tx.send(Err(to_status(refused))).await;
                        return;
                    }
                    if tx.send(Ok(event)).await.is_err() {
                        return;
                    }
                }
                Some(Err(e)) => {
                    let _ = tx.send(Err(to_status(e))).await;
                    return;
                }
                None => return,
            }
        }
    });
    Ok(Response::new(ReceiverStream::new(rx).boxed()))
}
