//! Barriers on JetStream.

use super::*;
use crate::store::Barriers;

#[async_trait::async_trait]
impl Barriers for JetStream {
    /// A barrier and its revision.
    async fn barrier(&self, run_id: &str, barrier_id: &str) -> Result<Option<(pb::Barrier, u64)>> {
        let key = barrier_key(run_id, barrier_id);
        let entry = self
            .barriers
            .entry(&key)
            .await
            .map_err(|e| BrokerError::nats("reading the barrier", e))?;
        match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                let barrier = pb::Barrier::decode(e.value).map_err(|err| {
                    BrokerError::Internal(format!("stored barrier {key} does not decode: {err}"))
                })?;
                Ok(Some((barrier, e.revision)))
            }
            _ => Ok(None),
        }
    }

    /// Creates a barrier unless it exists; returns whether it was created.
    async fn create_barrier(&self, barrier: &pb::Barrier) -> Result<bool> {
        let spec = barrier.spec.clone().unwrap_or_default();
        let key = barrier_key(&spec.run_id, &spec.barrier_id);
        match self
            .barriers
            .create(key.as_str(), barrier.encode_to_vec().into())
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(BrokerError::nats("storing the barrier", e)),
        }
    }

    async fn create_barrier_keys(&self, spec: &pb::BarrierSpec) -> Result<()> {
        let key = barrier_keys_key(&spec.run_id, &spec.barrier_id);
        match self
            .barriers
            .create(key.as_str(), spec.encode_to_vec().into())
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(BrokerError::nats("storing the barrier's keys", e)),
        }
    }

    async fn barrier_keys(
        &self,
        run_id: &str,
        barrier_id: &str,
    ) -> Result<Option<pb::BarrierSpec>> {
        read(&self.barriers, &barrier_keys_key(run_id, barrier_id))
            .await
            .map(|found| found.map(|(spec, _)| spec))
    }

    /// Compare-and-set of a barrier; false when another write came first.
    async fn update_barrier_at(&self, barrier: &pb::Barrier, revision: u64) -> Result<Option<u64>> {
        let spec = barrier.spec.clone().unwrap_or_default();
        let key = barrier_key(&spec.run_id, &spec.barrier_id);
        match self
            .barriers
            .update(key.as_str(), barrier.encode_to_vec().into(), revision)
            .await
        {
            Ok(written) => Ok(Some(written)),
            Err(e) if lost_compare_and_set(&e) => Ok(None),
            Err(e) => Err(BrokerError::nats("updating the barrier", e)),
        }
    }

    /// Notes that a branch result reached a barrier not yet opened, so
    /// that opening it looks for stored results (idempotent).
    async fn mark_early_branch(&self, run_id: &str, barrier_id: &str) -> Result<()> {
        self.barriers
            .put(early_key(run_id, barrier_id), Bytes::new())
            .await
            .map(|_| ())
            .map_err(|e| BrokerError::nats("noting an early branch", e))
    }

    /// Whether a branch result reached this barrier before it was opened.
    async fn has_early_branch(&self, run_id: &str, barrier_id: &str) -> Result<bool> {
        self.barriers
            .entry(early_key(run_id, barrier_id))
            .await
            .map(|e| e.is_some_and(|e| e.operation == kv::Operation::Put))
            .map_err(|e| BrokerError::nats("reading the barrier", e))
    }

    /// Published with the handoff id as message id (a retry is
    /// deduplicated) and an expected last sequence of 0 on the key's
    /// subject, so the stream itself keeps only a key's first result.
    async fn put_branch_result(
        &self,
        run_id: &str,
        barrier_id: &str,
        result: &pb::BranchResult,
    ) -> Result<BranchPut, BrokerError> {
        let subject = branch_subject(run_id, barrier_id, &result.key);
        let message = jetstream::message::PublishMessage::build()
            .payload(result.encode_to_vec().into())
            .message_id(&result.handoff_id)
            .expected_last_subject_sequence(0);
        let sent = self
            .js
            .send_publish(subject.clone(), message)
            .await
            .map_err(|e| BrokerError::nats("publishing a branch result", e))?;
        match sent.await {
            Ok(ack) => Ok(BranchPut::Stored(Stored {
                sequence: ack.sequence,
                duplicate: ack.duplicate,
            })),
            Err(e) if lost_compare_and_set(&e) => {
                let first = self
                    .branch_result(run_id, barrier_id, &result.key)
                    .await?
                    .ok_or_else(|| {
                        BrokerError::Unavailable(format!(
                            "branch {} has a result that cannot be read back yet",
                            result.key
                        ))
                    })?;
                if first.handoff_id == result.handoff_id {
                    Ok(BranchPut::Stored(Stored {
                        sequence: first.sequence,
                        duplicate: true,
                    }))
                } else {
                    Ok(BranchPut::Taken(Box::new(first)))
                }
            }
            Err(e) => Err(BrokerError::nats("storing a branch result", e)),
        }
    }

    async fn branch_result(
        &self,
        run_id: &str,
        barrier_id: &str,
        key: &str,
    ) -> Result<Option<pb::BranchResult>, BrokerError> {
        let subject = branch_subject(run_id, barrier_id, key);
        let msg = match self
            .branches
            .get_last_raw_message_by_subject(&subject)
            .await
        {
            Ok(m) => m,
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {
                return Ok(None)
            }
            Err(e) => return Err(BrokerError::nats("reading a branch result", e)),
        };
        let mut result = pb::BranchResult::decode(msg.payload).map_err(|e| {
            BrokerError::Internal(format!(
                "stored branch result {subject} does not decode: {e}"
            ))
        })?;
        result.sequence = msg.sequence;
        Ok(Some(result))
    }

    /// Every branch result stored for a barrier, in stream order, each
    /// with its stream sequence (a retried or late branch may appear more
    /// than once under its key).
    async fn branch_results(
        &self,
        run_id: &str,
        barrier_id: &str,
    ) -> Result<Vec<pb::BranchResult>> {
        let filter = format!("handoff.v1.branches.{run_id}.{barrier_id}.>");
        let consumer = self
            .branches
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                filter_subject: filter,
                deliver_policy: jetstream::consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .map_err(|e| BrokerError::nats("reading branch results", e))?;
        let mut pending = consumer.cached_info().num_pending;
        let mut out = Vec::new();
        if pending == 0 {
            return Ok(out);
        }
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| BrokerError::nats("reading branch results", e))?;
        while pending > 0 {
            let next = tokio::time::timeout(self.ack_timeout, messages.next())
                .await
                .map_err(|_| {
                    BrokerError::Unavailable("reading branch results timed out".to_string())
                })?;
            let Some(msg) = next else {
                break;
            };
            let msg = msg.map_err(|e| BrokerError::nats("reading branch results", e))?;
            let (left, sequence) = msg
                .info()
                .map(|i| (i.pending, i.stream_sequence))
                .unwrap_or((0, 0));
            pending = left;
            match pb::BranchResult::decode(msg.payload.clone()) {
                Ok(mut r) => {
                    r.sequence = sequence;
                    out.push(r);
                }
                Err(e) => tracing::warn!(error = %e, "undecodable branch result skipped"),
            }
        }
        Ok(out)
    }
}
