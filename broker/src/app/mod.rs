//! The use cases: what the broker does for each request and each timer,
//! deciding and ordering the writes, over the [`Store`] trait.
//!
//! One module per use case: [`handoff`] (accept a handoff: validate ->
//! guard -> commit -> notify), [`fan_out`], [`barriers`] (open, arrive,
//! release, fire a barrier timer), [`deliveries`] (offer a delivery,
//! settle it, route an exhausted one), [`runs`] (start, end, read),
//! [`agents`], [`contracts`] and [`events`]. They call the rules in
//! [`crate::rules`] and never a transport: the gRPC edge (`rpc/`) and the
//! timer loop (`timers`) call them.
//!
//! [`Broker`] is the handle they share: the store, the configuration and
//! the caches (agent specs and compiled contract versions, filled from the
//! store on a miss and kept current by watches, so a registration on one
//! replica reaches every other). Runs are always read from the store and
//! changed with compare-and-set, so two replicas never both end a run.

pub mod access;
pub mod agents;
pub mod auth;
pub mod barriers;
pub mod clock;
pub mod contracts;
pub mod deliveries;
pub mod events;
pub mod fan_out;
pub mod fork;
pub mod guard;
pub mod handoff;
pub mod input;
pub mod inspect;
pub mod instances;
pub mod judge;
pub mod outbox;
pub mod payloads;
pub mod redrive;
pub mod run_index;
pub mod runs;
pub mod session;
pub mod state;

#[cfg(test)]
mod tests;

use std::{sync::Arc, time::SystemTime};

use dashmap::DashMap;
use handoff_proto::pb;
use tokio::sync::{mpsc, watch};

use crate::{
    config::Config,
    error::BrokerError,
    link::Link,
    metrics::Metrics,
    rules::contracts::{tokens::Tokenizer, Compiled, Registry},
    store::Store,
};

/// How many times `nats_timeout` a call may take in all before it is
/// abandoned as stalled.
pub const STALLED: u32 = 6;

/// How long the delivery path trusts a run it read (see
/// [`Broker::run_recent`]).
const RUN_FRESH: std::time::Duration = std::time::Duration::from_secs(1);

/// Runs the delivery path keeps at most.
const RECENT_RUNS: usize = 65_536;

/// A cheap, cloneable handle to the broker's state.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

/// How many nacked deliveries a replica remembers before it forgets the
/// old ones (see [`Broker::remember_nack`]).
const NACKS_KEPT: usize = 10_000;
/// How long a nacked delivery is remembered once [`NACKS_KEPT`] is reached.
const NACK_KEPT_FOR: std::time::Duration = std::time::Duration::from_secs(600);

struct Inner {
    config: Config,
    store: Arc<dyn Store>,
    agents: DashMap<String, pb::AgentSpec>,
    contracts: Registry,
    metrics: Arc<Metrics>,
    /// Live deliveries held by this replica's sessions, by slot: what
    /// the session holds, so that a settlement made elsewhere frees the
    /// session's slot (and is timed).
    leases: DashMap<String, Tracked>,
    /// Live subscribe sessions on this replica, by agent.
    sessions: DashMap<String, usize>,
    draining: watch::Receiver<bool>,
    auth: auth::Auth,
    outbox: std::sync::OnceLock<outbox::Outbox>,
    link: Link,
    states: state::Cache,
    barriers: barriers::Local,
    /// Runs read on the delivery path, with when: see [`Broker::run_recent`].
    recent_runs: DashMap<String, (pb::Run, std::time::Instant)>,
    /// Every stored run's summary, for `ListRuns`.
    run_index: run_index::RunIndex,
    /// Causal positions of the events this replica emits.
    clock: clock::Clock,
    /// The spans of releases and deliveries, when traces are on.
    traces: std::sync::OnceLock<crate::trace::Traces>,
    /// Deliveries this replica nacked, by agent and inbox sequence: the
    /// attempt nacked, and when.
    nacked: DashMap<(String, u64), (u32, std::time::Instant)>,
}

impl Broker {
    /// Wraps an opened store; every caller may do anything (no auth).
    pub fn new(config: Config, store: Arc<dyn Store>, draining: watch::Receiver<bool>) -> Broker {
        Broker::with_auth(config, store, draining, auth::Auth::disabled())
    }

    /// Wraps an opened store, authenticating callers as `auth` says.
    pub fn with_auth(
        config: Config,
        store: Arc<dyn Store>,
        draining: watch::Receiver<bool>,
        auth: auth::Auth,
    ) -> Broker {
        Broker::with_link(config, store, draining, auth, Link::new())
    }

    /// Wraps an opened store whose NATS connection reports to `link`.
    pub fn with_link(
        config: Config,
        store: Arc<dyn Store>,
        draining: watch::Receiver<bool>,
        auth: auth::Auth,
        link: Link,
    ) -> Broker {
        Broker {
            inner: Arc::new(Inner {
                config,
                store,
                agents: DashMap::new(),
                contracts: Registry::default(),
                metrics: Arc::new(Metrics::default()),
                leases: DashMap::new(),
                sessions: DashMap::new(),
                draining,
                auth,
                outbox: std::sync::OnceLock::new(),
                link,
                states: state::Cache::default(),
                barriers: barriers::Local::default(),
                recent_runs: DashMap::new(),
                run_index: run_index::RunIndex::default(),
                clock: clock::Clock::default(),
                traces: std::sync::OnceLock::new(),
                nacked: DashMap::new(),
            }),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// How callers are authenticated, and the caches of it.
    pub fn auth(&self) -> &auth::Auth {
        &self.inner.auth
    }

    /// The run-state revisions this replica has read or written.
    pub fn states(&self) -> &state::Cache {
        &self.inner.states
    }

    /// What this replica keeps for barriers (key indexes, arrivals being
    /// counted).
    pub fn barrier_local(&self) -> &barriers::Local {
        &self.inner.barriers
    }

    /// Every stored run's summary, kept current by watches.
    pub fn run_index(&self) -> &run_index::RunIndex {
        &self.inner.run_index
    }

    /// The state of the link to NATS.
    pub fn link(&self) -> &Link {
        &self.inner.link
    }

    /// Runs `call`, unless NATS stays unreachable for `nats_timeout` while
    /// it runs, or the call as a whole outlasts [`STALLED`] times
    /// `nats_timeout` (each of its NATS requests is bounded by
    /// `nats_timeout`, so only NATS stalling mid-way, as while streams
    /// elect leaders, makes a call that long): then it is abandoned (every
    /// use case is safe to stop between two steps, as a crash would) and
    /// answers UNAVAILABLE. A call never hangs.
    pub async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, BrokerError>>,
    ) -> Result<T, BrokerError> {
        let bound = self.inner.config.nats_timeout;
        let stalled = bound.saturating_mul(STALLED);
        tokio::select! {
            biased;
            done = call => done,
            _ = self.inner.link.outage(bound) => Err(BrokerError::Unavailable(format!(
                "NATS has been unreachable for {}",
                humantime::format_duration(bound)
            ))),
            _ = tokio::time::sleep(stalled) => {
                tracing::warn!(after = ?stalled, "call abandoned: NATS stalled it");
                Err(BrokerError::Unavailable(format!(
                    "NATS did not complete the call within {}",
                    humantime::format_duration(stalled)
                )))
            }
        }
    }

    /// The store.
    pub fn store(&self) -> &dyn Store {
        self.inner.store.as_ref()
    }

    /// Compiled contract versions known to this replica.
    pub fn contracts(&self) -> &Registry {
        &self.inner.contracts
    }

    /// The tokenizer of token budgets and counts. Its encoding is loaded
    /// on first use, on the blocking pool (~100 ms, tens of MiB of
    /// tables), so a broker that never checks a payload against a
    /// contract never holds it.
    pub async fn tokenizer(&self) -> Result<Tokenizer, BrokerError> {
        let name = &self.inner.config.tokenizer;
        let loaded = match Tokenizer::loaded(name) {
            Some(loaded) => loaded,
            None => {
                let name = name.clone();
                tokio::task::spawn_blocking(move || Tokenizer::new(&name))
                    .await
                    .map_err(|e| BrokerError::Internal(format!("loading the tokenizer: {e}")))?
            }
        };
        loaded.map_err(BrokerError::Internal)
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// Every version of a contract, oldest first: from the registry, or
    /// read from the bucket when this replica has not seen the type yet.
    /// Empty when the type is not a registered contract.
    pub async fn contract_versions(
        &self,
        message_type: &str,
    ) -> Result<Vec<Arc<Compiled>>, BrokerError> {
        if let Some(v) = self.contracts().versions(message_type) {
            return Ok(v);
        }
        let mut out = Vec::new();
        // Versions are created consecutively from 1.
        for version in 1.. {
            match self.store().contract(message_type, version).await? {
                Some(c) => {
                    let compiled = Arc::new(Compiled::new(c)?);
                    self.contracts().insert(compiled.clone());
                    out.push(compiled);
                }
                None => break,
            }
        }
        Ok(out)
    }

    /// Loads every stored contract version into the registry (at start,
    /// before serving), so that a type missing from the registry is not a
    /// contract without asking the store on every handoff. Returns how
    /// many were loaded.
    pub async fn load_contracts(&self) -> Result<usize, BrokerError> {
        let mut n = 0;
        for (message_type, version) in self.store().contract_versions().await? {
            if let Some(c) = self.store().contract(&message_type, version).await? {
                match Compiled::new(c) {
                    Ok(c) => {
                        self.contracts().insert(Arc::new(c));
                        n += 1;
                    }
                    Err(e) => {
                        tracing::warn!(message_type, version, error = %e, "stored contract skipped")
                    }
                }
            }
        }
        Ok(n)
    }

    /// Records that a session holds a delivery; `release` is told its
    /// delivery id when the delivery is settled outside the session (a
    /// complete-and-handoff, or a settlement through another session or
    /// replica).
    pub fn track_delivery(&self, held: &deliveries::Held, release: mpsc::UnboundedSender<Notice>) {
        let tracked = Tracked {
            delivery_id: held.delivery_id.clone(),
            run_id: held.run_id.clone(),
            agent: held.agent.clone(),
            delivered_at: held.delivered_at,
            release,
        };
        if self
            .inner
            .leases
            .insert(held.slot.clone(), tracked)
            .is_none()
        {
            self.metrics().in_flight_inc(&held.agent);
        }
    }

    /// Remembers a run just read, for [`Broker::run_recent`] (a handoff
    /// stored into it is about to be delivered).
    pub fn remember_run(&self, run: &pb::Run) {
        if self.inner.recent_runs.len() >= RECENT_RUNS {
            self.inner.recent_runs.clear();
        }
        self.inner
            .recent_runs
            .insert(run.id.clone(), (run.clone(), std::time::Instant::now()));
    }

    /// Forgets a delivery the session settled itself, or gave up on (by
    /// its slot).
    pub fn untrack_delivery(&self, slot: &str) {
        if let Some((_, t)) = self.inner.leases.remove(slot) {
            self.metrics().in_flight_dec(&t.agent);
        }
    }

    /// Frees the slot of the session holding the delivery `token` names,
    /// on this replica or, told through the store, on any other.
    pub async fn release_delivery(&self, token: &pb::DeliveryToken) {
        let slot = deliveries::slot(&token.agent, token.stream_sequence, token.attempt);
        if !self.release_slot(&slot) {
            self.inner.store.announce_settled(&token.agent, &slot).await;
        }
    }

    /// Frees the slot of the session on this replica holding the delivery
    /// `slot` names (it was settled outside that session: its processing
    /// time ends here); `false` when no session here holds it.
    pub fn release_slot(&self, slot: &str) -> bool {
        match self.inner.leases.remove(slot) {
            Some((_, t)) => {
                self.metrics().in_flight_dec(&t.agent);
                self.metrics()
                    .processing(&t.agent, t.delivered_at.elapsed());
                let _ = t.release.send(Notice::Settled(t.delivery_id));
                true
            }
            None => false,
        }
    }

    /// Tells the sessions on this replica holding deliveries of run
    /// `run_id` that it was cancelled (`reason`); the run is no longer
    /// trusted from memory. Returns how many deliveries were told.
    pub fn cancel_deliveries(&self, run_id: &str, reason: &str) -> usize {
        self.forget_run(run_id);
        let mut told = 0;
        for t in self.inner.leases.iter() {
            if t.run_id == run_id {
                let notice = Notice::Cancelled(pb::Cancelled {
                    delivery_id: t.delivery_id.clone(),
                    run_id: run_id.to_string(),
                    reason: reason.to_string(),
                });
                told += usize::from(t.release.send(notice).is_ok());
            }
        }
        told
    }

    /// Counts a live subscribe session of `agent` on this replica.
    pub fn session_opened(&self, agent: &str) {
        *self.inner.sessions.entry(agent.to_string()).or_default() += 1;
    }

    /// Counts a session of `agent` that ended; the agent's backlog is no
    /// longer reported by this replica once its last session ends.
    pub fn session_closed(&self, agent: &str) {
        let last = match self.inner.sessions.get_mut(agent) {
            Some(mut n) => {
                *n = n.saturating_sub(1);
                *n == 0
            }
            None => false,
        };
        if last {
            self.inner.sessions.remove_if(agent, |_, n| *n == 0);
            self.metrics().forget_pending(agent);
        }
    }

    /// Agents with a live session on this replica.
    pub fn session_agents(&self) -> Vec<String> {
        self.inner
            .sessions
            .iter()
            .filter(|e| *e.value() > 0)
            .map(|e| e.key().clone())
            .collect()
    }

    /// Whether the broker is draining.
    pub fn draining(&self) -> bool {
        *self.inner.draining.borrow()
    }

    /// Resolves once the broker starts draining.
    pub async fn drained(&self) {
        let mut rx = self.inner.draining.clone();
        let _ = rx.wait_for(|d| *d).await;
    }

    /// An agent's spec, from the cache or the bucket.
    pub async fn agent(&self, name: &str) -> Result<pb::AgentSpec, BrokerError> {
        if let Some(a) = self.inner.agents.get(name) {
            return Ok(a.clone());
        }
        match self.store().agent(name).await? {
            Some(spec) => {
                self.inner.agents.insert(name.to_string(), spec.clone());
                Ok(spec)
            }
            None => Err(BrokerError::AgentNotFound(name.to_string())),
        }
    }

    /// An agent's spec read fresh from the bucket (and cached).
    pub async fn agent_fresh(&self, name: &str) -> Result<pb::AgentSpec, BrokerError> {
        self.inner.agents.remove(name);
        self.agent(name).await
    }

    /// Forgets a cached agent spec (deleted from the bucket).
    pub fn forget_agent(&self, name: &str) {
        self.inner.agents.remove(name);
    }

    /// Remembers an agent spec just stored.
    pub fn cache_agent(&self, spec: pb::AgentSpec) {
        self.inner.agents.insert(spec.name.clone(), spec);
    }

    /// A run and its revision; NOT_FOUND if it does not exist.
    pub async fn run(&self, run_id: &str) -> Result<(pb::Run, u64), BrokerError> {
        self.store()
            .run(run_id)
            .await?
            .ok_or_else(|| BrokerError::RunNotFound(run_id.to_string()))
    }

    /// A run as read at most [`RUN_FRESH`] ago, for the delivery path: a
    /// run's fields other than its status never change, and a run this
    /// replica ends is forgotten at once ([`Broker::forget_run`]), so the
    /// only staleness is a run ended on another replica within that time,
    /// whose handoff may then be delivered (the agent's next handoff is
    /// refused RUN_CLOSED) rather than discarded. Ended runs are not kept.
    pub async fn run_recent(&self, run_id: &str) -> Result<pb::Run, BrokerError> {
        if let Some(found) = self.inner.recent_runs.get(run_id) {
            if found.1.elapsed() < RUN_FRESH {
                return Ok(found.0.clone());
            }
        }
        let (run, _) = self.run(run_id).await?;
        let ended = pb::RunStatus::try_from(run.status).is_ok_and(|s| s.is_terminal());
        if ended {
            self.inner.recent_runs.remove(run_id);
        } else {
            self.remember_run(&run);
        }
        Ok(run)
    }

    /// Drops a run from [`Broker::run_recent`]'s memory (this replica
    /// changed it).
    pub fn forget_run(&self, run_id: &str) {
        self.inner.recent_runs.remove(run_id);
    }

    /// A causal position not less than `floor` (see [`clock`]).
    pub fn position(&self, floor: u64) -> u64 {
        self.inner.clock.after(floor)
    }

    /// Remembers that attempt `attempt` of `agent`'s inbox message
    /// `sequence` was nacked here, so its redelivery is offered as a later
    /// attempt even if JetStream counts it from 1 again. Bounded: at
    /// [`NACKS_KEPT`] entries, those older than [`NACK_KEPT_FOR`] go, and
    /// if that frees nothing, all do (forgetting costs only the attempt
    /// number of such a redelivery; its settlement does not depend on it).
    pub fn remember_nack(&self, agent: &str, sequence: u64, attempt: u32) {
        let now = std::time::Instant::now();
        let nacked = &self.inner.nacked;
        if nacked.len() >= NACKS_KEPT {
            nacked.retain(|_, (_, at)| now.duration_since(*at) < NACK_KEPT_FOR);
            if nacked.len() >= NACKS_KEPT {
                nacked.clear();
            }
        }
        nacked.insert((agent.to_string(), sequence), (attempt, now));
    }

    /// The attempt of `agent`'s inbox message `sequence` this replica
    /// nacked last, if any.
    pub fn nacked_attempt(&self, agent: &str, sequence: u64) -> Option<u32> {
        self.inner
            .nacked
            .get(&(agent.to_string(), sequence))
            .map(|e| e.value().0)
    }

    /// Forgets a nacked attempt once its redelivery went out.
    pub fn forget_nack(&self, agent: &str, sequence: u64) {
        self.inner.nacked.remove(&(agent.to_string(), sequence));
    }

    /// Makes the spans of releases and deliveries with `traces` (set once,
    /// when the server starts with traces on).
    pub fn set_traces(&self, traces: crate::trace::Traces) {
        let _ = self.inner.traces.set(traces);
    }

    /// The spans of releases and deliveries, when traces are on.
    pub fn traces(&self) -> Option<&crate::trace::Traces> {
        self.inner.traces.get()
    }

    /// A creation time that is also a causal position not less than
    /// `floor`: the event announcing what was created takes it as its
    /// position, and what reads the creation takes it as its floor.
    pub fn stamp(&self, floor: u64) -> prost_types::Timestamp {
        clock::timestamp(self.position(floor))
    }

    /// Publishes an event, deduplicated by `msg_id`; the time and, unless
    /// the caller set one, the causal position are filled in.
    pub async fn emit(&self, mut event: pb::Event, msg_id: &str) -> Result<u64, BrokerError> {
        if event.at.is_none() {
            event.at = Some(now());
        }
        if event.position == 0 {
            event.position = self.position(0);
        }
        self.store().publish_event(&event, msg_id).await
    }

    /// Emits an event without waiting for JetStream's confirmation (a
    /// plain publish, still deduplicated by `msg_id`): for events that
    /// observe a step already made durable (delivered, acked, ...), so
    /// they cost the caller no round trip and the server no reply. A
    /// failure to hand it to the connection is logged.
    pub async fn emit_unconfirmed(&self, mut event: pb::Event, msg_id: String) {
        if event.at.is_none() {
            event.at = Some(now());
        }
        if event.position == 0 {
            event.position = self.position(0);
        }
        if let Some(outbox) = self.outbox() {
            match outbox.send(event.clone(), msg_id.clone()).await {
                outbox::Sent::Taken => return,
                outbox::Sent::Full => {
                    self.metrics().event_dropped();
                    tracing::warn!(
                        msg_id,
                        "event dropped: the outbox stayed full (outbox_capacity)"
                    );
                    return;
                }
                outbox::Sent::Closed => {}
            }
        }
        // No outbox (a broker without its tasks, in tests): stored now.
        if let Err(e) = self.store().publish_event(&event, &msg_id).await {
            self.metrics().event_dropped();
            tracing::error!(error = %e, msg_id, "event not stored");
        }
    }

    /// Opens the outbox that stores events with confirmation and retries
    /// (see [`outbox`]); returns the task that empties it, to be spawned.
    pub fn outbox_task(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let (outbox, rx) = outbox::channel(self.config().outbox_capacity);
        let _ = self.inner.outbox.set(outbox);
        outbox::run(self.clone(), rx)
    }

    /// The outbox, once started.
    pub fn outbox(&self) -> Option<&outbox::Outbox> {
        self.inner.outbox.get()
    }

    /// Waits (at most `limit`) until every event handed to the outbox is
    /// stored or given up.
    pub async fn flush_events(&self, limit: std::time::Duration) {
        let Some(outbox) = self.outbox() else { return };
        let deadline = tokio::time::Instant::now() + limit;
        while outbox.waiting() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        if outbox.waiting() > 0 {
            tracing::warn!(events = outbox.waiting(), "events not stored before exit");
        }
    }
}

/// A delivery held by a session on this replica.
struct Tracked {
    delivery_id: String,
    agent: String,
    delivered_at: std::time::Instant,
    run_id: String,
    release: mpsc::UnboundedSender<Notice>,
}

/// What a session holding a delivery is told from outside it.
#[derive(Debug)]
pub enum Notice {
    /// The delivery (by id) was settled elsewhere: its slot is free.
    Settled(String),
    /// The delivery's run was cancelled.
    Cancelled(pb::Cancelled),
}

/// The current time as a protobuf timestamp.
pub fn now() -> prost_types::Timestamp {
    prost_types::Timestamp::from(SystemTime::now())
}

/// Name of a run status for messages.
pub fn status_name(status: i32) -> &'static str {
    match pb::RunStatus::try_from(status) {
        Ok(pb::RunStatus::Running) => "running",
        Ok(pb::RunStatus::Completed) => "completed",
        Ok(pb::RunStatus::Failed) => "failed",
        Ok(pb::RunStatus::TimedOut) => "timed out",
        Ok(pb::RunStatus::Cancelled) => "cancelled",
        Ok(pb::RunStatus::WaitingInput) => "waiting for input",
        _ => "unknown",
    }
}
