//! Inboxes on Memory.

use super::*;
use crate::store::Inboxes;

#[async_trait::async_trait]
impl Inboxes for Memory {
    fn max_payload(&self) -> usize {
        1 << 20
    }

    fn reference_matches(&self, token: &pb::DeliveryToken) -> bool {
        parse_reference(&token.ack_subject) == Some((&token.agent, token.stream_sequence))
    }

    async fn put_handoff_again(
        &self,
        envelope: &pb::HandoffEnvelope,
        write_id: &str,
    ) -> Result<Stored> {
        // Storing a handoff either way: both faults apply.
        self.trip("put_handoff_again")?;
        self.trip("put_handoff")?;
        self.put_as(envelope, write_id)
    }

    async fn put_handoff(&self, envelope: &pb::HandoffEnvelope) -> Result<Stored> {
        self.trip("put_handoff")?;
        self.put_as(envelope, &envelope.id)
    }

    async fn handoff_at(&self, sequence: u64) -> Result<Option<InboxMessage>> {
        self.trip("handoff_at")?;
        let s = self.state()?;
        let index = usize::try_from(sequence)
            .ok()
            .and_then(|i| i.checked_sub(1));
        Ok(index.and_then(|i| s.inbox.get(i)).map(|e| InboxMessage {
            agent: e.agent.clone(),
            envelope: e.envelope.clone(),
        }))
    }

    async fn was_delivered(&self, _agent: &str, sequence: u64) -> Result<bool> {
        let s = self.state()?;
        let index = usize::try_from(sequence)
            .ok()
            .and_then(|i| i.checked_sub(1));
        Ok(index
            .and_then(|i| s.inbox.get(i))
            .is_some_and(|e| e.delivered > 0))
    }

    async fn inbox_pending(&self, agent: &str) -> Result<u64> {
        let s = self.state()?;
        Ok(s.inbox
            .iter()
            .filter(|e| e.agent == agent && e.standing == Standing::Pending && e.delivered == 0)
            .count() as u64)
    }

    async fn backlog(&self, agent: &str) -> Result<Backlog> {
        self.trip("backlog")?;
        let s = self.state()?;
        let mine = || s.inbox.iter().filter(|e| e.agent == agent);
        let waiting = || mine().filter(|e| e.standing == Standing::Pending && e.delivered == 0);
        Ok(Backlog {
            pending: waiting().count() as u64,
            in_flight: mine().filter(|e| e.standing == Standing::Leased).count() as u64,
            oldest_pending: waiting().next().and_then(|e| e.envelope.created_at),
        })
    }

    async fn withdraw_handoff(&self, sequence: u64) -> Result<()> {
        let mut s = self.state()?;
        let index = usize::try_from(sequence)
            .ok()
            .and_then(|i| i.checked_sub(1));
        if let Some(e) = index.and_then(|i| s.inbox.get_mut(i)) {
            e.standing = Standing::Terminated;
        }
        Ok(())
    }

    async fn prepare_inbox(&self, _agent: &str, _lease: Duration, _max: i64) -> Result<()> {
        self.trip("prepare_inbox")
    }

    async fn pull(
        &self,
        agent: &str,
        max: usize,
        _expires: Duration,
    ) -> Result<BoxStream<'static, Result<Offered>>> {
        self.trip("pull")?;
        let mut s = self.state()?;
        let mut out = Vec::new();
        for (i, e) in s.inbox.iter_mut().enumerate() {
            if out.len() == max {
                break;
            }
            if e.agent == agent && e.standing == Standing::Pending {
                e.standing = Standing::Leased;
                e.delivered += 1;
                let sequence = i as u64 + 1;
                out.push(Ok(Offered {
                    sequence,
                    delivered: e.delivered,
                    reference: reference(agent, sequence, e.delivered),
                    payload: e.envelope.encode_to_vec().into(),
                }));
            }
        }
        Ok(futures::stream::iter(out).boxed())
    }

    async fn settle(&self, reference: &str, how: Settlement) -> Result<()> {
        self.trip("settle")?;
        let (_, sequence) = parse_reference(reference)
            .ok_or_else(|| BrokerError::Internal(format!("no delivery {reference}")))?;
        let mut s = self.state()?;
        let entry = usize::try_from(sequence)
            .ok()
            .and_then(|i| i.checked_sub(1))
            .and_then(|i| s.inbox.get_mut(i))
            .ok_or_else(|| BrokerError::Internal(format!("no delivery {reference}")))?;
        match (how, entry.standing) {
            (_, Standing::Acked | Standing::Terminated) => {}
            (Settlement::Ack, _) => entry.standing = Standing::Acked,
            (Settlement::Term, _) => entry.standing = Standing::Terminated,
            (Settlement::Nack(_), _) => entry.standing = Standing::Pending,
            (Settlement::Progress, _) => {}
        }
        Ok(())
    }

    async fn announce_settled(&self, _agent: &str, slot: &str) {
        let _ = self.settled.send(slot.to_string());
    }

    async fn settled_announcements(&self) -> Result<BoxStream<'static, String>> {
        let rx = self.settled.subscribe();
        Ok(futures::stream::unfold(rx, |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(slot) => return Some((slot, rx)),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                }
            }
        })
        .boxed())
    }

    async fn put_dead_letter(&self, letter: &pb::DeadLetter, write_id: &str) -> Result<()> {
        self.trip("put_dead_letter")?;
        let mut s = self.state()?;
        if s.dead_ids.insert(write_id.to_string()) {
            s.dead.push(letter.clone());
        }
        Ok(())
    }

    async fn dead_letter(&self, sequence: u64) -> Result<Option<pb::DeadLetter>> {
        self.trip("dead_letter")?;
        let s = self.state()?;
        let at = usize::try_from(sequence)
            .unwrap_or(usize::MAX)
            .wrapping_sub(1);
        Ok(s.dead.get(at).map(|d| pb::DeadLetter {
            sequence,
            ..d.clone()
        }))
    }

    async fn dead_letters(&self, agent: Option<&str>, limit: usize) -> Result<Vec<pb::DeadLetter>> {
        let s = self.state()?;
        Ok(s.dead
            .iter()
            .enumerate()
            .filter(|(_, d)| agent.is_none_or(|a| d.agent == a))
            .take(limit)
            .map(|(i, d)| pb::DeadLetter {
                sequence: i as u64 + 1,
                ..d.clone()
            })
            .collect())
    }
}

impl Memory {
    /// Stores a handoff in its target's inbox, deduplicated by `write_id`.
    fn put_as(&self, envelope: &pb::HandoffEnvelope, write_id: &str) -> Result<Stored> {
        let mut s = self.state()?;
        if let Some(&sequence) = s.inbox_ids.get(write_id) {
            return Ok(Stored {
                sequence,
                duplicate: true,
            });
        }
        s.inbox.push(Entry {
            agent: envelope.target_agent.clone(),
            envelope: envelope.clone(),
            delivered: 0,
            standing: Standing::Pending,
        });
        let sequence = s.inbox.len() as u64;
        s.inbox_ids.insert(write_id.to_string(), sequence);
        Ok(Stored {
            sequence,
            duplicate: false,
        })
    }
}
