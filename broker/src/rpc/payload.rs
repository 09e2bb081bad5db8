//! `GetPayload`: streams a payload stored by reference in chunks of at
//! most 1 MiB, the first carrying its reference (size and digest), as it
//! is read from the object store.

use futures::{stream::BoxStream, StreamExt};
use handoff_proto::pb;
use tokio::io::AsyncReadExt as _;
use tonic::{Response, Status};

use crate::{
    app::{auth::Caller, payloads, Broker},
    error::BrokerError,
    rpc::status::to_status,
    store::PayloadReader,
};

/// Opens the payload (the caller's right to is checked first), then
/// answers it chunk by chunk as it is read: a read that fails (or whose
/// value does not match its digest, found at its end) ends the stream
/// with the error, and the chunks before it do not add up to the size.
pub async fn get_payload(
    broker: &Broker,
    caller: &Caller,
    req: pb::GetPayloadRequest,
) -> Result<Response<BoxStream<'static, Result<pb::PayloadChunk, Status>>>, Status> {
    let (reference, reader) = broker
        .bounded(payloads::get(broker, caller, req))
        .await
        .map_err(to_status)?;
    let name = reference.name.clone();
    let broker = broker.clone();
    let chunks = futures::stream::unfold(Some((reader, Some(reference))), move |open| {
        let (name, broker) = (name.clone(), broker.clone());
        async move {
            let (mut reader, mut first) = open?;
            // Each chunk within the bound of any NATS call: a stalled read
            // ends the stream with UNAVAILABLE.
            let read = broker.bounded(async {
                chunk(&mut reader)
                    .await
                    .map_err(|e| BrokerError::nats(&format!("reading payload {name}"), e))
            });
            match read.await {
                Ok(data) if data.is_empty() && first.is_none() => None,
                Ok(data) => {
                    let r#ref = first.take();
                    Some((Ok(pb::PayloadChunk { data, r#ref }), Some((reader, None))))
                }
                Err(e) => Some((Err(to_status(e)), None)),
            }
        }
    });
    Ok(Response::new(chunks.boxed()))
}

/// The next chunk of `reader`: up to [`payloads::CHUNK_BYTES`], fewer only
/// at its end (empty: it ended).
async fn chunk(reader: &mut PayloadReader) -> std::io::Result<Vec<u8>> {
    let mut data = Vec::with_capacity(payloads::CHUNK_BYTES.min(64 * 1024));
    let mut limited = reader.take(payloads::CHUNK_BYTES as u64);
    limited.read_to_end(&mut data).await?;
    Ok(data)
}
