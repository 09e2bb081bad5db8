//! Events on JetStream.

use super::*;
use crate::store::Events;

#[async_trait::async_trait]
impl Events for JetStream {
    /// Publishes an event (deduplicated by `msg_id`) and returns its sequence.
    async fn publish_event(&self, event: &pb::Event, msg_id: &str) -> Result<u64> {
        let kind = pb::EventKind::try_from(event.kind).unwrap_or(pb::EventKind::Unspecified);
        let ack = self
            .publish(
                event_subject(&event.run_id, kind),
                msg_id,
                event.encode_to_vec().into(),
            )
            .await?;
        Ok(ack.sequence)
    }

    async fn publish_events(&self, events: &[(pb::Event, String)]) -> Vec<Result<u64>> {
        // Send every one, then await the confirmations together.
        let mut acks = Vec::with_capacity(events.len());
        for (event, msg_id) in events {
            let kind = pb::EventKind::try_from(event.kind).unwrap_or(pb::EventKind::Unspecified);
            let mut headers = HeaderMap::new();
            headers.insert(NATS_MESSAGE_ID, msg_id.as_str());
            acks.push(
                self.js
                    .publish_with_headers(
                        event_subject(&event.run_id, kind),
                        headers,
                        event.encode_to_vec().into(),
                    )
                    .await,
            );
        }
        let confirm = acks.into_iter().map(|sent| async move {
            match sent {
                Ok(ack) => ack
                    .await
                    .map(|a| a.sequence)
                    .map_err(|e| BrokerError::nats("storing an event", e)),
                Err(e) => Err(BrokerError::nats("publishing an event", e)),
            }
        });
        futures::future::join_all(confirm).await
    }

    async fn run_events(&self, run_id: &str) -> Result<Vec<pb::Event>, BrokerError> {
        let filter = format!("handoff.v1.events.{run_id}.>");
        let mut out = Vec::new();
        for (seq, payload) in read_stream(&self.events, &filter, usize::MAX).await? {
            match pb::Event::decode(payload) {
                Ok(mut e) => {
                    e.sequence = seq;
                    out.push(e);
                }
                Err(e) => tracing::warn!(seq, error = %e, "undecodable event skipped"),
            }
        }
        Ok(out)
    }

    async fn watch_events(
        &self,
        run_id: Option<&str>,
        kind: Option<pb::EventKind>,
        from_sequence: u64,
    ) -> Result<BoxStream<'static, Result<pb::Event, BrokerError>>, BrokerError> {
        use jetstream::consumer::DeliverPolicy;
        let filter = format!(
            "handoff.v1.events.{}.{}",
            run_id.unwrap_or("*"),
            kind.map_or("*", |k| k.token())
        );
        let deliver_policy = if from_sequence > 0 {
            DeliverPolicy::ByStartSequence {
                start_sequence: from_sequence,
            }
        } else {
            DeliverPolicy::New
        };
        let consumer = self
            .events
            .create_consumer(pull::OrderedConfig {
                filter_subject: filter,
                deliver_policy,
                ..Default::default()
            })
            .await
            .map_err(|e| BrokerError::nats("watching", e))?;
        let messages = consumer
            .messages()
            .await
            .map_err(|e| BrokerError::nats("watching", e))?;
        Ok(messages
            .filter_map(|msg| async move {
                let msg = match msg {
                    Ok(m) => m,
                    Err(e) => return Some(Err(BrokerError::nats("watching", e))),
                };
                let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
                match pb::Event::decode(msg.payload.clone()) {
                    Ok(mut event) => {
                        event.sequence = seq;
                        Some(Ok(event))
                    }
                    Err(_) => {
                        tracing::warn!(seq, "undecodable event skipped");
                        None
                    }
                }
            })
            .boxed())
    }
}
