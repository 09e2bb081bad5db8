//! Events on Memory.

use super::*;
use crate::store::Events;

#[async_trait::async_trait]
impl Events for Memory {
    async fn publish_event(&self, event: &pb::Event, msg_id: &str) -> Result<u64> {
        self.trip("publish_event")?;
        let mut s = self.state()?;
        if let Some(&seq) = s.event_ids.get(msg_id) {
            return Ok(seq);
        }
        let mut event = event.clone();
        s.event_seq += 1;
        event.sequence = s.event_seq;
        let seq = event.sequence;
        s.events.push(event);
        s.event_ids.insert(msg_id.to_string(), seq);
        Ok(seq)
    }

    async fn publish_events(&self, events: &[(pb::Event, String)]) -> Vec<Result<u64>> {
        let mut out = Vec::with_capacity(events.len());
        for (event, msg_id) in events {
            out.push(self.publish_event(event, msg_id).await);
        }
        out
    }

    async fn run_events(&self, run_id: &str) -> Result<Vec<pb::Event>> {
        let s = self.state()?;
        Ok(s.events
            .iter()
            .filter(|e| e.run_id == run_id)
            .cloned()
            .collect())
    }

    async fn watch_events(
        &self,
        run_id: Option<&str>,
        kind: Option<pb::EventKind>,
        from_sequence: u64,
    ) -> Result<BoxStream<'static, Result<pb::Event>>> {
        let s = self.state()?;
        let events: Vec<Result<pb::Event>> = s
            .events
            .iter()
            .filter(|e| from_sequence > 0 && e.sequence >= from_sequence)
            .filter(|e| run_id.is_none_or(|r| e.run_id == r))
            .filter(|e| kind.is_none_or(|k| e.kind == k as i32))
            .cloned()
            .map(Ok)
            .collect();
        Ok(futures::stream::iter(events).boxed())
    }
}
