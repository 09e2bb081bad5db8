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
    Backlog, BranchPut, Claim, InboxMessage, Offered, PayloadInfo, Result, Settlement, Stored,
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
    dead_ids: std::collections::HashSet<String>,
    runs: HashMap<String, (pb::Run, u64)>,
    agents: BTreeMap<String, pb::AgentSpec>,
    contracts: BTreeMap<(String, u32), pb::Contract>,
    contract_modes: HashMap<String, (pb::ContractMode, u64)>,
    claims: HashMap<String, (pb::ConsumeClaim, u64)>,
    barriers: HashMap<String, (pb::Barrier, u64)>,
    run_states: HashMap<(String, u64), pb::StateRecord>,
    state_heads: HashMap<String, u64>,
    /// How runs ended, by run and life (`resumed`).
    run_ends: HashMap<(String, u32), pb::Run>,
    early: HashSet<String>,
    branches: Vec<(String, pb::BranchResult)>,
    /// The last branch record sequence given.
    branch_seq: u64,
    branch_ids: HashMap<String, u64>,
    barrier_keys: HashMap<String, pb::BarrierSpec>,
    timers: Vec<(pb::Timer, TimerKind)>,
    leases: HashMap<String, (pb::Lease, u64)>,
    /// Live session records, by `<agent>.<session>`, with when they expire.
    instances: HashMap<String, (pb::Instance, std::time::Instant)>,
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

/// The reference of one delivery (the `delivered`-th) of an inbox message:
/// each delivery's is its own, as JetStream's ack subjects are.
fn reference(agent: &str, sequence: u64, delivered: i64) -> String {
    format!("mem.{agent}.{sequence}#{delivered}")
}

fn parse_reference(reference: &str) -> Option<(&str, u64)> {
    let rest = reference.strip_prefix("mem.")?;
    let rest = rest.split_once('#').map_or(rest, |(r, _)| r);
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

    /// The claim under `key` (on a consumed delivery, or a keyed
    /// handoff's), if any.
    pub fn claimed(&self, key: &crate::store::ClaimKey) -> Option<pb::ConsumeClaim> {
        self.state()
            .ok()?
            .claims
            .get(&claims::at(key))
            .map(|(c, _)| c.clone())
    }
}

mod barriers;
mod claims;
mod events;
mod inboxes;
mod instances;
mod leases;
mod payloads;
mod registry;
mod runs;
mod secrets;
mod state;
mod timers;
