//! `Subscribe`: adapts a bidirectional gRPC stream to a subscribe session
//! ([`crate::app::session`]).

use futures::{stream::BoxStream, StreamExt};
use handoff_proto::pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Response, Status, Streaming};

use crate::{
    app::{
        auth::{self, Caller, Credentials},
        session::{self, Out},
        Broker,
    },
    rpc::status::{code_of, to_status},
};

/// Opens a session from the stream's first message and runs it on its own
/// task; deliveries and settlements flow back through a channel.
pub async fn subscribe(
    broker: &Broker,
    caller: &Caller,
    creds: Credentials,
    mut inbound: Streaming<pb::SubscribeRequest>,
) -> Result<Response<BoxStream<'static, Result<pb::SubscribeResponse, Status>>>, Status> {
    let first = inbound.message().await?;
    let opened = broker
        .bounded(session::open(broker, caller, first))
        .await
        .map_err(to_status)?;
    // The session ends once its credentials stop allowing it to receive
    // as its agent (a revoked token, a grant taken away).
    let live = auth::Live::start(
        broker,
        creds,
        auth::Standing::ReceiveAs(opened.agent.name.clone()),
    );
    let (tx, rx) = mpsc::channel(opened.max_in_flight + 16);
    // The instance's commands until its stream ends or breaks.
    let commands = inbound
        .take_while(|m| std::future::ready(m.is_ok()))
        .filter_map(|m| std::future::ready(m.ok()))
        .boxed();
    tokio::spawn(session::run(broker.clone(), opened, live, commands, tx));
    let out = ReceiverStream::new(rx)
        .map(|m| m.map(response).map_err(to_status))
        .boxed();
    Ok(Response::new(out))
}

fn response(out: Out) -> pb::SubscribeResponse {
    use pb::subscribe_response::Message;
    let message = match out {
        Out::Subscribed(agent) => Message::Subscribed(pb::Subscribed { agent: Some(agent) }),
        Out::Delivery(d) => Message::Delivery(*d),
        Out::Cancelled(c) => Message::Cancelled(c),
        Out::Settled {
            request_id,
            delivery_id,
            result,
        } => {
            let (code, reason, message, lease_deadline) = match result {
                Ok(deadline) => (0, String::new(), String::new(), deadline),
                Err(e) => (
                    code_of(e.class()) as i32,
                    e.reason().as_str().to_string(),
                    e.to_string(),
                    None,
                ),
            };
            Message::Settled(pb::Settled {
                request_id,
                delivery_id,
                code,
                message,
                lease_deadline,
                reason,
            })
        }
    };
    pb::SubscribeResponse {
        message: Some(message),
    }
}
