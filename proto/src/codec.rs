//! The server's codec: prost's, except that a request body that does not
//! decode is INVALID_ARGUMENT (the client sent bad input), not INTERNAL.

use prost::Message;
use tonic::{
    codec::{BufferSettings, Codec, DecodeBuf, Decoder},
    Code, Status,
};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};
use tonic_types::{ErrorDetails, StatusExt};

/// The codec of the broker's generated server.
#[derive(Debug, Clone, Default)]
pub struct ServerCodec<T, U> {
    inner: ProstCodec<T, U>,
}

impl<T, U> Codec for ServerCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = RequestDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.inner.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        RequestDecoder {
            inner: self.inner.decoder(),
        }
    }
}

/// Decodes requests; see [`ServerCodec`].
#[derive(Debug)]
pub struct RequestDecoder<U> {
    inner: ProstDecoder<U>,
}

impl<U: Message + Default> Decoder for RequestDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.inner.decode(buf).map_err(|s| match s.code() {
            Code::Internal => {
                let mut details = ErrorDetails::new();
                details.set_error_info(
                    "MALFORMED_REQUEST",
                    "handoff.v1",
                    std::collections::HashMap::<String, String>::new(),
                );
                Status::with_error_details(
                    Code::InvalidArgument,
                    format!(
                        "the request body is not a valid protobuf message of the RPC's type: {}",
                        s.message()
                    ),
                    details,
                )
            }
            _ => s,
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.inner.buffer_settings()
    }
}
