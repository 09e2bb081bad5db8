//! RunStates on JetStream.

use super::*;
use crate::store::{Decided, RunStates};

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

    async fn decide_end(
        &self,
        run_id: &str,
        resumed: u32,
        end: &pb::Run,
        with: Option<&pb::StateRecord>,
    ) -> Result<Decided> {
        let key = format!("{run_id}.end.{resumed}");
        let refused = match with {
            None => match self
                .state
                .create(key.as_str(), end.encode_to_vec().into())
                .await
            {
                Ok(_) => return Ok(Decided::Now),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => None,
                Err(e) => return Err(BrokerError::nats("deciding the run's end", e)),
            },
            Some(record) => {
                let revision = format!("{}.{}", record.run_id, record.revision);
                let writes = [
                    (revision.as_str(), Bytes::from(record.encode_to_vec())),
                    (key.as_str(), Bytes::from(end.encode_to_vec())),
                ];
                match self.create_together(&writes).await? {
                    None => return Ok(Decided::Now),
                    Some(refused) => Some((record.revision, refused)),
                }
            }
        };
        // Which key was taken: the end, or the revision that came with it.
        if let Some((before, _)) = read::<pb::Run>(&self.state, &key).await? {
            return Ok(Decided::Before(Box::new(before)));
        }
        match refused {
            Some((revision, _)) if self.state_record(run_id, revision).await?.is_some() => {
                Ok(Decided::RevisionTaken)
            }
            Some((_, refused)) => Err(BrokerError::Unavailable(format!(
                "the end of run {run_id:?} and its state were not stored: {refused}"
            ))),
            None => Err(BrokerError::Unavailable(format!(
                "the end of run {run_id:?} was decided, and cannot be read; retry"
            ))),
        }
    }
}

impl JetStream {
    /// Creates keys of the state bucket that do not exist yet, all or
    /// none, in one JetStream atomic batch (nats-server 2.12); `Some` with
    /// JetStream's refusal when one of them existed (or the batch was
    /// refused otherwise).
    async fn create_together(&self, writes: &[(&str, Bytes)]) -> Result<Option<String>> {
        use async_nats::header::{
            NATS_BATCH_COMMIT, NATS_BATCH_COMMIT_FINAL, NATS_BATCH_ID, NATS_BATCH_SEQUENCE,
            NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
        };
        let batch = uuid::Uuid::new_v4().simple().to_string();
        let failed = |e| BrokerError::nats("storing the run's end with its state", e);
        for (i, (key, value)) in writes.iter().enumerate() {
            let mut headers = HeaderMap::new();
            headers.insert(NATS_BATCH_ID, batch.as_str());
            headers.insert(NATS_BATCH_SEQUENCE, (i + 1).to_string().as_str());
            headers.insert(NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, "0");
            if i + 1 == writes.len() {
                headers.insert(NATS_BATCH_COMMIT, NATS_BATCH_COMMIT_FINAL);
            }
            let subject = format!("$KV.{STATE_BUCKET}.{key}");
            let reply = self
                .client
                .request_with_headers(subject, headers, value.clone())
                .await
                .map_err(failed)?;
            // Each message before the commit is answered empty, the commit
            // with its acknowledgement naming the batch; a refusal with an
            // error. Anything else is a server that stored the message on
            // its own (no atomic batches): not to be taken for one.
            let last = i + 1 == writes.len();
            if reply.payload.is_empty() && !last {
                continue;
            }
            let ack: BatchAck = serde_json::from_slice(&reply.payload).map_err(|e| {
                BrokerError::Internal(format!(
                    "JetStream's answer to a batch does not decode: {e}"
                ))
            })?;
            if let Some(error) = ack.error {
                return Ok(Some(format!(
                    "{} (JetStream error {})",
                    error.description, error.err_code
                )));
            }
            if !last || ack.batch != batch {
                return Err(BrokerError::Internal(format!(
                    "the state bucket's stream did not take an atomic batch (its leader needs nats-server 2.12 or newer, and allow_atomic); it answered {}",
                    String::from_utf8_lossy(&reply.payload)
                )));
            }
        }
        Ok(None)
    }
}

/// JetStream's answer to a message of an atomic batch.
#[derive(serde::Deserialize)]
struct BatchAck {
    #[serde(default)]
    error: Option<BatchError>,
    /// The batch committed.
    #[serde(default)]
    batch: String,
}

/// A refused batch.
#[derive(serde::Deserialize)]
struct BatchError {
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}
