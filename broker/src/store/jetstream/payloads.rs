//! Payloads on JetStream.

use super::*;
use crate::store::Payloads;

#[async_trait::async_trait]
impl Payloads for JetStream {
    async fn put_payload(&self, name: &str, value: Bytes) -> Result<PayloadInfo> {
        if let Some(kept) = self.payload_info(name).await? {
            let young = kept
                .stored_at
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age < self.retention / 2);
            if young && kept.size == value.len() as u64 {
                return Ok(kept);
            }
        }
        let chunk = match self.client.server_info().max_payload {
            0 => PAYLOAD_CHUNK,
            max => PAYLOAD_CHUNK.min(max.saturating_sub(4096).max(4096)),
        };
        let meta = async_nats::jetstream::object_store::ObjectMetadata {
            name: name.to_string(),
            chunk_size: Some(chunk),
            ..Default::default()
        };
        let mut reader = std::io::Cursor::new(value);
        let info = self
            .payloads
            .put(meta, &mut reader)
            .await
            .map_err(|e| BrokerError::nats(&format!("storing payload {name}"), e))?;
        Ok(payload_info(&info))
    }

    async fn payload_info(&self, name: &str) -> Result<Option<PayloadInfo>> {
        use async_nats::jetstream::object_store::InfoErrorKind;
        match self.payloads.info(name).await {
            Ok(info) if info.deleted => Ok(None),
            Ok(info) => Ok(Some(payload_info(&info))),
            Err(e) if e.kind() == InfoErrorKind::NotFound => Ok(None),
            Err(e) => Err(BrokerError::nats(&format!("reading payload {name}"), e)),
        }
    }

    async fn read_payload(&self, name: &str) -> Result<Option<crate::store::PayloadReader>> {
        use async_nats::jetstream::object_store::GetErrorKind;
        match self.payloads.get(name).await {
            Ok(o) if o.info().deleted => Ok(None),
            Ok(o) => Ok(Some(Box::pin(o))),
            Err(e) if e.kind() == GetErrorKind::NotFound => Ok(None),
            Err(e) => Err(BrokerError::nats(&format!("reading payload {name}"), e)),
        }
    }

    async fn get_payload(&self, name: &str) -> Result<Option<Bytes>> {
        use async_nats::jetstream::object_store::GetErrorKind;
        use tokio::io::AsyncReadExt as _;
        let mut object = match self.payloads.get(name).await {
            Ok(o) => o,
            Err(e) if e.kind() == GetErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(BrokerError::nats(&format!("reading payload {name}"), e)),
        };
        if object.info().deleted {
            return Ok(None);
        }
        let mut value = Vec::with_capacity(object.info().size);
        object
            .read_to_end(&mut value)
            .await
            .map_err(|e| BrokerError::nats(&format!("reading payload {name}"), e))?;
        Ok(Some(Bytes::from(value)))
    }
}
