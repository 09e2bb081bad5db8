//! An in-memory [`Store`] for unit tests of the use cases: the same
//! contract as JetStream (dedupe by id, compare-and-set by revision,
//! explicit settlement), no server, and faults that fail a chosen step.
//! The integration tests keep the real `nats-server`.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Mutex,
    time::Duration,
};

use futures::{stream::BoxStream, StreamExt};
use handoff_proto::pb;
use prost::Message as _;

use super::{
    BranchPut, Claim, InboxMessage, Offered, PayloadInfo, Result, Settlement, Store, Stored,
    TimerKind,
};
use crate::error::BrokerError;

/// Where an inbox entry stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Waiting to be offered.
    Pending,
    /// Offered, not settled.
    Leased,
    /// Acked.
    Acked,
    /// Terminated.
    Terminated,
}

#[derive(Debug)]
struct Entry {
    agent: String,
    envelope: pb::HandoffEnvelope,
    delivered: i64,
    standing: Standing,
}

#[derive(Default)]
struct State {
    revision: u64,
    inbox: Vec<Entry>,
    inbox_ids: HashMap<String, u64>,
    events: Vec<pb::Event>,
    /// The last event sequence given (events of purged runs are gone).
    event_seq: u64,
    event_ids: HashMap<String, u64>,
    dead: Vec<pb::DeadLetter>,
    runs: HashMap<String, (pb::Run, u64)>,
    agents: BTreeMap<String, pb::AgentSpec>,
    contracts: BTreeMap<(String, u32), pb::Contract>,
    contract_modes: HashMap<String, (pb::ContractMode, u64)>,
    claims: HashMap<String, (pb::ConsumeClaim, u64)>,
    barriers: HashMap<String, (pb::Barrier, u64)>,
    run_states: HashMap<(String, u64), pb::StateRecord>,
    state_heads: HashMap<String, u64>,
    early: HashSet<String>,
    branches: Vec<(String, pb::BranchResult)>,
    /// The last branch record sequence given.
    branch_seq: u64,
    branch_ids: HashMap<String, u64>,
    barrier_keys: HashMap<String, pb::BarrierSpec>,
    timers: Vec<(pb::Timer, TimerKind)>,
    leases: HashMap<String, (pb::Lease, u64)>,
    /// Payloads kept by reference, by name.
    payloads: HashMap<String, (bytes::Bytes, PayloadInfo)>,
    keys: Option<(pb::SigningKeys, u64)>,
    principals: BTreeMap<String, pb::Principal>,
    tokens: BTreeMap<String, (pb::ApiToken, u64)>,
}

impl State {
    fn next_revision(&mut self) -> u64 {
        self.revision += 1;
        self.revision
    }
}

/// The in-memory store.
pub struct Memory {
    state: Mutex<State>,
    faults: Mutex<HashMap<&'static str, usize>>,
    /// Settlement announcements, to every broker over this store.
    settled: tokio::sync::broadcast::Sender<String>,
}

impl Default for Memory {
    fn default() -> Self {
        Memory {
            state: Mutex::default(),
            faults: Mutex::default(),
            settled: tokio::sync::broadcast::channel(1024).0,
        }
    }
}

fn barrier_key(run_id: &str, barrier_id: &str) -> String {
    format!("{run_id}.{barrier_id}")
}

fn reference(agent: &str, sequence: u64) -> String {
    format!("mem.{agent}.{sequence}")
}

fn parse_reference(reference: &str) -> Option<(&str, u64)> {
    let rest = reference.strip_prefix("mem.")?;
    let (agent, seq) = rest.rsplit_once('.')?;
    Some((agent, seq.parse().ok()?))
}

impl Memory {
    /// A new, empty store.
    pub fn new() -> Memory {
        Memory::default()
    }

    /// Makes the next `times` calls of `op` (a trait method's name) fail
    /// as if NATS were unreachable.
    pub fn fail(&self, op: &'static str, times: usize) {
        if let Ok(mut f) = self.faults.lock() {
            f.insert(op, times);
        }
    }

    fn trip(&self, op: &'static str) -> Result<()> {
        let mut faults = self
            .faults
            .lock()
            .map_err(|_| BrokerError::Internal("poisoned".into()))?;
        match faults.get_mut(op) {
            Some(n) if *n > 0 => {
                *n -= 1;
                Err(BrokerError::Unavailable(format!("fault injected in {op}")))
            }
            _ => Ok(()),
        }
    }

    fn state(&self) -> Result<std::sync::MutexGuard<'_, State>> {
        self.state
            .lock()
            .map_err(|_| BrokerError::Internal("poisoned".into()))
    }

    /// The handoffs stored in an agent's inbox, in order, with how each
    /// stands.
    pub fn inbox(&self, agent: &str) -> Vec<(pb::HandoffEnvelope, Standing)> {
        self.state()
            .map(|s| {
                s.inbox
                    .iter()
                    .filter(|e| e.agent == agent)
                    .map(|e| (e.envelope.clone(), e.standing))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// How an inbox entry stands.
    pub fn standing(&self, sequence: u64) -> Option<Standing> {
        let s = self.state().ok()?;
        s.inbox
            .get(usize::try_from(sequence).ok()?.checked_sub(1)?)
            .map(|e| e.standing)
    }

    /// The timers scheduled for a run, with their kinds.
    pub fn timers(&self, run_id: &str) -> Vec<(pb::Timer, TimerKind)> {
        self.state()
            .map(|s| {
                s.timers
                    .iter()
                    .filter(|(t, _)| t.run_id == run_id)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The stored events of a run of one kind.
    pub fn events(&self, run_id: &str, kind: pb::EventKind) -> Vec<pb::Event> {
        self.state()
            .map(|s| {
                s.events
                    .iter()
                    .filter(|e| e.run_id == run_id && e.kind == kind as i32)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Forgets which ids were stored, as JetStream does when its dedupe
    /// window passes (the stored handoffs stay).
    pub fn forget_ids(&self) {
        if let Ok(mut s) = self.state() {
            s.inbox_ids.clear();
            s.branch_ids.clear();
        }
    }

    /// The claim on a consumed delivery, if any.
    pub fn claimed(&self, consumed_handoff: &str) -> Option<pb::ConsumeClaim> {
        self.state()
            .ok()?
            .claims
            .get(consumed_handoff)
            .map(|(c, _)| c.clone())
    }
}

#[async_trait::async_trait]
impl Store for Memory {
    fn max_payload(&self) -> usize {
        1 << 20
    }

    fn reference_matches(&self, token: &pb::DeliveryToken) -> bool {
        parse_reference(&token.ack_subject) == Some((&token.agent, token.stream_sequence))
    }

    async fn put_handoff(&self, envelope: &pb::HandoffEnvelope) -> Result<Stored> {
        self.trip("put_handoff")?;
        let mut s = self.state()?;
        if let Some(&sequence) = s.inbox_ids.get(&envelope.id) {
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
        s.inbox_ids.insert(envelope.id.clone(), sequence);
        Ok(Stored {
            sequence,
            duplicate: false,
        })
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
                    reference: reference(agent, sequence),
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

    async fn put_dead_letter(&self, letter: &pb::DeadLetter) -> Result<()> {
        self.trip("put_dead_letter")?;
        let mut s = self.state()?;
        let id = letter.handoff.as_ref().map(|h| h.id.clone());
        if !s
            .dead
            .iter()
            .any(|d| d.handoff.as_ref().map(|h| h.id.clone()) == id)
        {
            s.dead.push(letter.clone());
        }
        Ok(())
    }

    async fn dead_letters(&self, agent: Option<&str>, limit: usize) -> Result<Vec<pb::DeadLetter>> {
        let s = self.state()?;
        Ok(s.dead
            .iter()
            .filter(|d| agent.is_none_or(|a| d.agent == a))
            .take(limit)
            .cloned()
            .collect())
    }

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

    async fn run(&self, run_id: &str) -> Result<Option<(pb::Run, u64)>> {
        self.trip("run")?;
        Ok(self.state()?.runs.get(run_id).cloned())
    }

    async fn create_run(&self, run: &pb::Run) -> Result<bool> {
        self.trip("create_run")?;
        let mut s = self.state()?;
        if s.runs.contains_key(&run.id) {
            return Ok(false);
        }
        let rev = s.next_revision();
        s.runs.insert(run.id.clone(), (run.clone(), rev));
        Ok(true)
    }

    async fn update_run(&self, run: &pb::Run, revision: u64) -> Result<bool> {
        self.trip("update_run")?;
        let mut s = self.state()?;
        if s.runs.get(&run.id).map(|(_, r)| *r) != Some(revision) {
            return Ok(false);
        }
        let rev = s.next_revision();
        s.runs.insert(run.id.clone(), (run.clone(), rev));
        Ok(true)
    }

    async fn purge_run(&self, run_id: &str, keep_events_from: u64) -> Result<()> {
        self.trip("purge_run")?;
        let mut s = self.state()?;
        s.events
            .retain(|e| e.run_id != run_id || e.sequence >= keep_events_from);
        s.run_states.retain(|(run, _), _| run != run_id);
        s.state_heads.remove(run_id);
        let prefix = format!("{run_id}.");
        s.barriers.retain(|key, _| !key.starts_with(&prefix));
        s.barrier_keys.retain(|key, _| !key.starts_with(&prefix));
        s.early.retain(|key| !key.starts_with(&prefix));
        s.branches.retain(|(key, _)| !key.starts_with(&prefix));
        s.timers
            .retain(|(t, kind)| t.run_id != run_id || matches!(kind, TimerKind::RunPurge));
        s.runs.remove(run_id);
        Ok(())
    }

    async fn agent(&self, name: &str) -> Result<Option<pb::AgentSpec>> {
        self.trip("agent")?;
        Ok(self.state()?.agents.get(name).cloned())
    }

    async fn put_agent(&self, spec: &pb::AgentSpec) -> Result<bool> {
        self.trip("put_agent")?;
        Ok(self
            .state()?
            .agents
            .insert(spec.name.clone(), spec.clone())
            .is_some())
    }

    async fn agents(&self) -> Result<Vec<pb::AgentSpec>> {
        Ok(self.state()?.agents.values().cloned().collect())
    }

    async fn contract(&self, message_type: &str, version: u32) -> Result<Option<pb::Contract>> {
        Ok(self
            .state()?
            .contracts
            .get(&(message_type.to_string(), version))
            .cloned())
    }

    async fn create_contract(&self, contract: &pb::Contract) -> Result<bool> {
        let mut s = self.state()?;
        let key = (contract.message_type.clone(), contract.version);
        if s.contracts.contains_key(&key) {
            return Ok(false);
        }
        s.contracts.insert(key, contract.clone());
        Ok(true)
    }

    async fn contract_versions(&self) -> Result<Vec<(String, u32)>> {
        Ok(self.state()?.contracts.keys().cloned().collect())
    }

    async fn claim_consumed(
        &self,
        consumed_handoff: &str,
        claim: &pb::ConsumeClaim,
    ) -> Result<Claim> {
        self.trip("claim_consumed")?;
        let mut s = self.state()?;
        if let Some((held, revision)) = s.claims.get(consumed_handoff) {
            return Ok(Claim::Held(held.clone(), *revision));
        }
        let rev = s.next_revision();
        s.claims
            .insert(consumed_handoff.to_string(), (claim.clone(), rev));
        Ok(Claim::Made(rev))
    }

    async fn claim(&self, consumed_handoff: &str) -> Result<Option<(pb::ConsumeClaim, u64)>> {
        Ok(self.state()?.claims.get(consumed_handoff).cloned())
    }

    async fn update_claim(
        &self,
        consumed_handoff: &str,
        claim: &pb::ConsumeClaim,
        revision: u64,
    ) -> Result<Option<u64>> {
        let mut s = self.state()?;
        if s.claims.get(consumed_handoff).map(|(_, r)| *r) != Some(revision) {
            return Ok(None);
        }
        let rev = s.next_revision();
        s.claims
            .insert(consumed_handoff.to_string(), (claim.clone(), rev));
        Ok(Some(rev))
    }

    async fn release_claim(&self, consumed_handoff: &str, revision: u64) {
        if self.trip("release_claim").is_err() {
            return;
        }
        if let Ok(mut s) = self.state() {
            if s.claims.get(consumed_handoff).map(|(_, r)| *r) == Some(revision) {
                s.claims.remove(consumed_handoff);
            }
        }
    }

    async fn barrier(&self, run_id: &str, barrier_id: &str) -> Result<Option<(pb::Barrier, u64)>> {
        self.trip("barrier")?;
        Ok(self
            .state()?
            .barriers
            .get(&barrier_key(run_id, barrier_id))
            .cloned())
    }

    async fn state_record(&self, run_id: &str, revision: u64) -> Result<Option<pb::StateRecord>> {
        self.trip("state_record")?;
        Ok(self
            .state()?
            .run_states
            .get(&(run_id.to_string(), revision))
            .cloned())
    }

    async fn create_state_record(&self, record: &pb::StateRecord) -> Result<bool> {
        self.trip("create_state_record")?;
        let mut s = self.state()?;
        let key = (record.run_id.clone(), record.revision);
        if s.run_states.contains_key(&key) {
            return Ok(false);
        }
        s.run_states.insert(key, record.clone());
        Ok(true)
    }

    async fn state_head(&self, run_id: &str) -> Result<u64> {
        Ok(self.state()?.state_heads.get(run_id).copied().unwrap_or(0))
    }

    async fn set_state_head(&self, run_id: &str, revision: u64) -> Result<()> {
        self.state()?
            .state_heads
            .insert(run_id.to_string(), revision);
        Ok(())
    }

    async fn create_barrier(&self, barrier: &pb::Barrier) -> Result<bool> {
        let spec = barrier.spec.clone().unwrap_or_default();
        let key = barrier_key(&spec.run_id, &spec.barrier_id);
        let mut s = self.state()?;
        if s.barriers.contains_key(&key) {
            return Ok(false);
        }
        let rev = s.next_revision();
        s.barriers.insert(key, (barrier.clone(), rev));
        Ok(true)
    }

    async fn create_barrier_keys(&self, spec: &pb::BarrierSpec) -> Result<()> {
        self.state()?
            .barrier_keys
            .entry(barrier_key(&spec.run_id, &spec.barrier_id))
            .or_insert_with(|| spec.clone());
        Ok(())
    }

    async fn barrier_keys(
        &self,
        run_id: &str,
        barrier_id: &str,
    ) -> Result<Option<pb::BarrierSpec>> {
        Ok(self
            .state()?
            .barrier_keys
            .get(&barrier_key(run_id, barrier_id))
            .cloned())
    }

    async fn update_barrier_at(&self, barrier: &pb::Barrier, revision: u64) -> Result<Option<u64>> {
        self.trip("update_barrier")?;
        let spec = barrier.spec.clone().unwrap_or_default();
        let key = barrier_key(&spec.run_id, &spec.barrier_id);
        let mut s = self.state()?;
        if s.barriers.get(&key).map(|(_, r)| *r) != Some(revision) {
            return Ok(None);
        }
        let rev = s.next_revision();
        s.barriers.insert(key, (barrier.clone(), rev));
        Ok(Some(rev))
    }

    async fn mark_early_branch(&self, run_id: &str, barrier_id: &str) -> Result<()> {
        self.state()?.early.insert(barrier_key(run_id, barrier_id));
        Ok(())
    }

    async fn has_early_branch(&self, run_id: &str, barrier_id: &str) -> Result<bool> {
        Ok(self
            .state()?
            .early
            .contains(&barrier_key(run_id, barrier_id)))
    }

    async fn put_branch_result(
        &self,
        run_id: &str,
        barrier_id: &str,
        result: &pb::BranchResult,
    ) -> Result<BranchPut> {
        self.trip("put_branch_result")?;
        let mut s = self.state()?;
        let key = barrier_key(run_id, barrier_id);
        if let Some(&sequence) = s.branch_ids.get(&result.handoff_id) {
            return Ok(BranchPut::Stored(Stored {
                sequence,
                duplicate: true,
            }));
        }
        if let Some((_, first)) = s
            .branches
            .iter()
            .find(|(k, r)| *k == key && r.key == result.key)
        {
            return Ok(BranchPut::Taken(Box::new(first.clone())));
        }
        let mut stored = result.clone();
        s.branch_seq += 1;
        stored.sequence = s.branch_seq;
        let sequence = stored.sequence;
        s.branches.push((key, stored));
        s.branch_ids.insert(result.handoff_id.clone(), sequence);
        Ok(BranchPut::Stored(Stored {
            sequence,
            duplicate: false,
        }))
    }

    async fn branch_result(
        &self,
        run_id: &str,
        barrier_id: &str,
        key: &str,
    ) -> Result<Option<pb::BranchResult>> {
        let barrier = barrier_key(run_id, barrier_id);
        Ok(self
            .state()?
            .branches
            .iter()
            .find(|(k, r)| *k == barrier && r.key == key)
            .map(|(_, r)| r.clone()))
    }

    async fn branch_results(
        &self,
        run_id: &str,
        barrier_id: &str,
    ) -> Result<Vec<pb::BranchResult>> {
        let key = barrier_key(run_id, barrier_id);
        Ok(self
            .state()?
            .branches
            .iter()
            .filter(|(k, _)| *k == key)
            .map(|(_, r)| r.clone())
            .collect())
    }

    async fn lease(&self, agent: &str, sequence: u64) -> Result<Option<(pb::Lease, u64)>> {
        self.trip("lease")?;
        Ok(self
            .state()?
            .leases
            .get(&format!("{agent}.{sequence}"))
            .cloned())
    }

    async fn put_lease(
        &self,
        agent: &str,
        sequence: u64,
        lease: &pb::Lease,
        revision: Option<u64>,
    ) -> Result<bool> {
        self.trip("put_lease")?;
        let mut s = self.state()?;
        let key = format!("{agent}.{sequence}");
        if s.leases.get(&key).map(|(_, r)| *r) != revision {
            return Ok(false);
        }
        let rev = s.next_revision();
        s.leases.insert(key, (lease.clone(), rev));
        Ok(true)
    }

    async fn contract_mode(&self, message_type: &str) -> Result<Option<(pb::ContractMode, u64)>> {
        self.trip("contract_mode")?;
        Ok(self.state()?.contract_modes.get(message_type).cloned())
    }

    async fn put_contract_mode(
        &self,
        mode: &pb::ContractMode,
        revision: Option<u64>,
    ) -> Result<bool> {
        self.trip("put_contract_mode")?;
        let mut s = self.state()?;
        if s.contract_modes.get(&mode.message_type).map(|(_, r)| *r) != revision {
            return Ok(false);
        }
        let rev = s.next_revision();
        s.contract_modes
            .insert(mode.message_type.clone(), (mode.clone(), rev));
        Ok(true)
    }

    async fn signing_keys(&self) -> Result<Option<(pb::SigningKeys, u64)>> {
        Ok(self.state()?.keys.clone())
    }

    async fn put_signing_keys(
        &self,
        keys: &pb::SigningKeys,
        revision: Option<u64>,
    ) -> Result<bool> {
        let mut s = self.state()?;
        if s.keys.as_ref().map(|(_, r)| *r) != revision {
            return Ok(false);
        }
        let rev = s.next_revision();
        s.keys = Some((keys.clone(), rev));
        Ok(true)
    }

    async fn principal(&self, name: &str) -> Result<Option<pb::Principal>> {
        Ok(self.state()?.principals.get(name).cloned())
    }

    async fn put_principal(&self, principal: &pb::Principal) -> Result<bool> {
        Ok(self
            .state()?
            .principals
            .insert(principal.name.clone(), principal.clone())
            .is_some())
    }

    async fn principals(&self) -> Result<Vec<pb::Principal>> {
        Ok(self.state()?.principals.values().cloned().collect())
    }

    async fn token(&self, id: &str) -> Result<Option<(pb::ApiToken, u64)>> {
        Ok(self.state()?.tokens.get(id).cloned())
    }

    async fn put_token(&self, token: &pb::ApiToken, revision: Option<u64>) -> Result<bool> {
        let mut s = self.state()?;
        if s.tokens.get(&token.id).map(|(_, r)| *r) != revision {
            return Ok(false);
        }
        let rev = s.next_revision();
        s.tokens.insert(token.id.clone(), (token.clone(), rev));
        Ok(true)
    }

    async fn tokens(&self) -> Result<Vec<pb::ApiToken>> {
        Ok(self
            .state()?
            .tokens
            .values()
            .map(|(t, _)| t.clone())
            .collect())
    }

    async fn put_payload(&self, name: &str, value: bytes::Bytes) -> Result<PayloadInfo> {
        self.trip("put_payload")?;
        let info = PayloadInfo {
            size: value.len() as u64,
            sha256: super::sha256_hex(&value),
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

    async fn get_payload(&self, name: &str) -> Result<Option<bytes::Bytes>> {
        self.trip("get_payload")?;
        Ok(self.state()?.payloads.get(name).map(|(v, _)| v.clone()))
    }

    async fn schedule(&self, timer: &pb::Timer, kind: TimerKind) -> Result<()> {
        self.trip("schedule")?;
        self.state()?.timers.push((timer.clone(), kind));
        Ok(())
    }
}
