//! Inboxes on JetStream.

use super::*;
use crate::store::Inboxes;

#[async_trait::async_trait]
impl Inboxes for JetStream {
    fn max_payload(&self) -> usize {
        self.client.server_info().max_payload
    }

    fn reference_matches(&self, token: &pb::DeliveryToken) -> bool {
        ack_subject_matches(&token.ack_subject, &token.agent, token.stream_sequence)
    }

    async fn put_handoff(&self, envelope: &pb::HandoffEnvelope) -> Result<Stored, BrokerError> {
        let ack = self
            .publish(
                inbox_subject(&envelope.target_agent),
                &envelope.id,
                envelope.encode_to_vec().into(),
            )
            .await?;
        Ok(Stored {
            sequence: ack.sequence,
            duplicate: ack.duplicate,
        })
    }

    async fn put_handoff_again(
        &self,
        envelope: &pb::HandoffEnvelope,
        write_id: &str,
    ) -> Result<Stored, BrokerError> {
        let ack = self
            .publish(
                inbox_subject(&envelope.target_agent),
                write_id,
                envelope.encode_to_vec().into(),
            )
            .await?;
        Ok(Stored {
            sequence: ack.sequence,
            duplicate: ack.duplicate,
        })
    }

    async fn handoff_at(&self, sequence: u64) -> Result<Option<InboxMessage>, BrokerError> {
        let Some(msg) = self.inbox_message(sequence).await? else {
            return Ok(None);
        };
        let envelope = pb::HandoffEnvelope::decode(msg.payload)
            .map_err(|e| BrokerError::Internal(format!("stored handoff does not decode: {e}")))?;
        let agent = msg
            .subject
            .as_str()
            .strip_prefix("handoff.v1.inbox.")
            .unwrap_or_default()
            .to_string();
        Ok(Some(InboxMessage { agent, envelope }))
    }

    /// Creates the agent's durable pull consumer, or updates its lease.
    async fn prepare_inbox(
        &self,
        agent: &str,
        lease: Duration,
        max_ack_pending: i64,
    ) -> Result<(), BrokerError> {
        self.consumers.remove(agent);
        let config = pull::Config {
            durable_name: Some(agent.to_string()),
            filter_subject: inbox_subject(agent),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: lease,
            // Attempts are counted by the broker, which routes a handoff to
            // the fallback or the dead letter itself; JetStream must keep
            // offering it until then.
            max_deliver: -1,
            max_ack_pending,
            ..Default::default()
        };
        match self.inbox.consumer_info(agent).await {
            Ok(info)
                if info.config.ack_wait == lease
                    && info.config.max_ack_pending == max_ack_pending =>
            {
                Ok(())
            }
            Ok(_) => self
                .inbox
                .update_consumer(config)
                .await
                .map(|_| ())
                .map_err(|e| BrokerError::nats("updating the agent's consumer", e)),
            Err(_) => self
                .inbox
                .create_consumer(config)
                .await
                .map(|_| ())
                .map_err(|e| BrokerError::nats("creating the agent's consumer", e)),
        }
    }

    async fn was_delivered(&self, agent: &str, sequence: u64) -> Result<bool, BrokerError> {
        // The consumer delivers in stream order: what it delivered last
        // bounds what it delivered at all.
        let mut consumer = self.agent_consumer(agent).await?;
        let info = consumer
            .info()
            .await
            .map_err(|e| BrokerError::nats("reading the agent's consumer", e))?;
        Ok(info.delivered.stream_sequence >= sequence)
    }

    async fn inbox_pending(&self, agent: &str) -> Result<u64, BrokerError> {
        let mut consumer = self.agent_consumer(agent).await?;
        let info = consumer
            .info()
            .await
            .map_err(|e| BrokerError::nats("reading the agent's consumer", e))?;
        Ok(info.num_pending)
    }

    /// The consumer's counts, and the first message on the agent's
    /// subject after the last one it offered (one read of the stream).
    async fn backlog(&self, agent: &str) -> Result<Backlog, BrokerError> {
        let mut consumer = self.agent_consumer(agent).await?;
        let info = consumer
            .info()
            .await
            .map_err(|e| BrokerError::nats("reading the agent's consumer", e))?;
        let mut backlog = Backlog {
            pending: info.num_pending,
            in_flight: u64::try_from(info.num_ack_pending).unwrap_or_default(),
            oldest_pending: None,
        };
        if info.num_pending == 0 {
            return Ok(backlog);
        }
        let next = self
            .inbox
            .raw_message_builder()
            .sequence(info.delivered.stream_sequence + 1)
            .next_by_subject(inbox_subject(agent))
            .send()
            .await;
        match next {
            Ok(msg) => {
                backlog.oldest_pending = pb::HandoffEnvelope::decode(msg.payload)
                    .ok()
                    .and_then(|e| e.created_at);
            }
            Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => {}
            Err(e) => return Err(BrokerError::nats("reading the agent's inbox", e)),
        }
        Ok(backlog)
    }

    async fn withdraw_handoff(&self, sequence: u64) -> Result<(), BrokerError> {
        use jetstream::stream::DeleteMessageErrorKind;
        match self.inbox.delete_message(sequence).await {
            Ok(_) => Ok(()),
            Err(e) => match e.kind() {
                DeleteMessageErrorKind::JetStream(js)
                    if js.error_code() == jetstream::ErrorCode::NO_MESSAGE_FOUND =>
                {
                    Ok(())
                }
                _ => Err(BrokerError::nats("withdrawing a handoff", e)),
            },
        }
    }

    async fn pull(
        &self,
        agent: &str,
        max: usize,
        expires: Duration,
    ) -> Result<BoxStream<'static, Result<Offered, BrokerError>>, BrokerError> {
        let consumer = self.agent_consumer(agent).await?;
        let batch = consumer
            .batch()
            .max_messages(max)
            .expires(expires)
            .messages()
            .await;
        let batch = match batch {
            Ok(b) => b,
            Err(e) => {
                // The consumer may be gone (deleted, or the stream lost):
                // open it afresh next time.
                self.consumers.remove(agent);
                return Err(BrokerError::nats("pulling deliveries", e));
            }
        };
        Ok(batch
            .filter_map(|msg| async move {
                let msg = match msg {
                    Ok(m) => m,
                    Err(e) => return Some(Err(BrokerError::nats("pulling deliveries", e))),
                };
                let (sequence, delivered) = match msg.info() {
                    Ok(i) => (i.stream_sequence, i.delivered),
                    Err(e) => {
                        tracing::warn!(error = %e, "message without JetStream metadata ignored");
                        return None;
                    }
                };
                let reference = msg.reply.as_ref()?.to_string();
                Some(Ok(Offered {
                    sequence,
                    delivered,
                    reference,
                    payload: msg.payload.clone(),
                }))
            })
            .boxed())
    }

    /// Settles a delivery by its ack subject (`+ACK`, `-NAK`, `+TERM`,
    /// `+WPI`) and waits for JetStream's confirmation.
    async fn settle(&self, reference: &str, how: Settlement) -> Result<(), BrokerError> {
        let kind = match how {
            Settlement::Ack => AckKind::Ack,
            Settlement::Nack(delay) => AckKind::Nak(delay),
            Settlement::Term => AckKind::Term,
            Settlement::Progress => AckKind::Progress,
        };
        let body: Bytes = kind.into();
        let request = self.client.request(reference.to_string(), body);
        match tokio::time::timeout(self.ack_timeout, request).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(BrokerError::nats("settling the delivery", e)),
            Err(_) => Err(BrokerError::Unavailable(
                "JetStream did not confirm the settlement in time".to_string(),
            )),
        }
    }

    /// A plain NATS publish on `handoff.v1.settled.<agent>` (kept by no
    /// stream): every replica listens.
    async fn announce_settled(&self, agent: &str, slot: &str) {
        let subject = settled_subject(agent);
        if let Err(e) = self
            .client
            .publish(subject, Bytes::copy_from_slice(slot.as_bytes()))
            .await
        {
            tracing::debug!(slot, error = %e, "settlement not announced; the slot frees at its lease");
        }
    }

    async fn settled_announcements(&self) -> Result<BoxStream<'static, String>> {
        let subscription = self
            .client
            .subscribe(settled_subject("*"))
            .await
            .map_err(|e| BrokerError::nats("listening for settlements", e))?;
        Ok(subscription
            .filter_map(|msg| async move { String::from_utf8(msg.payload.to_vec()).ok() })
            .boxed())
    }

    async fn put_dead_letter(
        &self,
        letter: &pb::DeadLetter,
        write_id: &str,
    ) -> Result<(), BrokerError> {
        self.publish(
            dead_subject(&letter.agent),
            write_id,
            letter.encode_to_vec().into(),
        )
        .await
        .map(|_| ())
    }

    async fn dead_letter(&self, sequence: u64) -> Result<Option<pb::DeadLetter>, BrokerError> {
        let msg = match self.dead.get_raw_message(sequence).await {
            Ok(m) => m,
            Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => return Ok(None),
            Err(e) => return Err(BrokerError::nats("reading the dead letter", e)),
        };
        let mut letter = pb::DeadLetter::decode(msg.payload).map_err(|e| {
            BrokerError::Internal(format!("stored dead letter does not decode: {e}"))
        })?;
        letter.sequence = sequence;
        Ok(Some(letter))
    }

    async fn dead_letters(
        &self,
        agent: Option<&str>,
        limit: usize,
    ) -> Result<Vec<pb::DeadLetter>, BrokerError> {
        let filter = format!("handoff.v1.dead.{}", agent.unwrap_or("*"));
        let mut out = Vec::new();
        for (seq, payload) in read_stream(&self.dead, &filter, limit).await? {
            if let Ok(mut d) = pb::DeadLetter::decode(payload) {
                d.sequence = seq;
                out.push(d);
            }
        }
        Ok(out)
    }
}
