//! `GetPayload`: streams a payload stored by reference in chunks of at
//! most 1 MiB, the first carrying its reference (size and digest).

use futures::{stream::BoxStream, StreamExt};
use handoff_proto::pb;
use tonic::{Response, Status};

use crate::{
    app::{auth::Caller, payloads, Broker},
    rpc::status::to_status,
};

/// Reads the payload (the caller's right to is checked first), then
/// answers it chunk by chunk.
pub async fn get_payload(
    broker: &Broker,
    caller: &Caller,
    req: pb::GetPayloadRequest,
) -> Result<Response<BoxStream<'static, Result<pb::PayloadChunk, Status>>>, Status> {
    let (reference, value) = broker
        .bounded(payloads::get(broker, caller, req))
        .await
        .map_err(to_status)?;
    let mut first = Some(reference);
    let chunks: Vec<Result<pb::PayloadChunk, Status>> = if value.is_empty() {
        vec![Ok(pb::PayloadChunk {
            data: Vec::new(),
            r#ref: first.take(),
        })]
    } else {
        value
            .chunks(payloads::CHUNK_BYTES)
            .map(|c| {
                Ok(pb::PayloadChunk {
                    data: c.to_vec(),
                    r#ref: first.take(),
                })
            })
            .collect()
    };
    Ok(Response::new(futures::stream::iter(chunks).boxed()))
}
