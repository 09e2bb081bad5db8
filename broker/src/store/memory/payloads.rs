//! Payloads on Memory.

use super::*;
use crate::store::Payloads;

#[async_trait::async_trait]
impl Payloads for Memory {
    async fn put_payload(&self, name: &str, value: bytes::Bytes) -> Result<PayloadInfo> {
        self.trip("put_payload")?;
        let info = PayloadInfo {
            size: value.len() as u64,
            sha256: crate::store::sha256_hex(&value),
            stored_at: Some(std::time::SystemTime::now()),
        };
        let mut state = self.state()?;
        let kept = state
            .payloads
            .entry(name.to_string())
            .or_insert((value, info));
        Ok(kept.1.clone())
    }

    async fn payload_info(&self, name: &str) -> Result<Option<PayloadInfo>> {
        self.trip("payload_info")?;
        Ok(self.state()?.payloads.get(name).map(|(_, i)| i.clone()))
    }

    async fn read_payload(&self, name: &str) -> Result<Option<crate::store::PayloadReader>> {
        let value = self.get_payload(name).await?;
        Ok(value.map(|v| Box::pin(std::io::Cursor::new(v)) as crate::store::PayloadReader))
    }

    async fn get_payload(&self, name: &str) -> Result<Option<bytes::Bytes>> {
        self.trip("get_payload")?;
        Ok(self.state()?.payloads.get(name).map(|(v, _)| v.clone()))
    }
}
