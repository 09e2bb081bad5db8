//! RunStates on JetStream.

use super::*;
use crate::store::RunStates;

#[async_trait::async_trait]
impl RunStates for JetStream {
    async fn state_record(&self, run_id: &str, revision: u64) -> Result<Option<pb::StateRecord>> {
        let key = format!("{run_id}.{revision}");
        let entry = self
            .state
            .entry(&key)
            .await
            .map_err(|e| BrokerError::nats("reading the run state", e))?;
        match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                let record = pb::StateRecord::decode(e.value).map_err(|err| {
                    BrokerError::Internal(format!("stored run state {key} does not decode: {err}"))
                })?;
                Ok(Some(record))
            }
            _ => Ok(None),
        }
    }

    async fn create_state_record(&self, record: &pb::StateRecord) -> Result<bool> {
        let key = format!("{}.{}", record.run_id, record.revision);
        match self
            .state
            .create(key.as_str(), record.encode_to_vec().into())
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(BrokerError::nats("storing the run state", e)),
        }
    }

    async fn state_head(&self, run_id: &str) -> Result<u64> {
        let key = format!("{run_id}.head");
        let entry = self
            .state
            .entry(&key)
            .await
            .map_err(|e| BrokerError::nats("reading the run state's head", e))?;
        Ok(match entry {
            Some(e) if e.operation == kv::Operation::Put => std::str::from_utf8(&e.value)
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0),
            _ => 0,
        })
    }

    async fn set_state_head(&self, run_id: &str, revision: u64) -> Result<()> {
        self.state
            .put(
                format!("{run_id}.head"),
                revision.to_string().into_bytes().into(),
            )
            .await
            .map(|_| ())
            .map_err(|e| BrokerError::nats("recording the run state's head", e))
    }
}
