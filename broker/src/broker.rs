//! Shared broker state: the store, the configuration, in-memory caches and
//! the run transitions every RPC relies on.
//!
//! The caches are agent specs and compiled contract versions: filled from
//! their buckets on a miss and kept current by a watch on each bucket, so a
//! registration on one replica reaches every other. Runs are always read from the bucket and changed
//! with compare-and-set, so two replicas never both end a run.

use std::{sync::Arc, time::SystemTime};

use dashmap::DashMap;
use handoff_proto::pb;
use tokio::sync::{mpsc, watch};

use crate::{
    config::Config,
    contracts::{tokens::Tokenizer, Compiled, Registry},
    error::BrokerError,
    metrics::Metrics,
    store::Store,
};

/// A cheap, cloneable handle to the broker's state.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    store: Store,
    agents: DashMap<String, pb::AgentSpec>,
    contracts: Registry,
    metrics: Arc<Metrics>,
    /// Live deliveries (by delivery id) and the session that holds each, so
    /// that a complete-and-handoff frees the session's slot.
    leases: DashMap<String, mpsc::UnboundedSender<String>>,
    draining: watch::Receiver<bool>,
}

/// How a run ends.
#[derive(Debug, Clone)]
pub enum RunEnd {
    /// A final handoff completed it.
    Completed {
        /// The final handoff.
        handoff_id: String,
        /// Its payload.
        result: Option<prost_types::Any>,
    },
    /// A delivery was rejected or dead-lettered.
    Failed(String),
    /// Its deadline passed.
    TimedOut(String),
}

impl Broker {
    /// Wraps an opened store.
    pub fn new(config: Config, store: Store, draining: watch::Receiver<bool>) -> Broker {
        Broker {
            inner: Arc::new(Inner {
                config,
                store,
                agents: DashMap::new(),
                contracts: Registry::default(),
                metrics: Arc::new(Metrics::default()),
                leases: DashMap::new(),
                draining,
            }),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The JetStream store.
    pub fn store(&self) -> &Store {
        &self.inner.store
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

    /// The counters.
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
    /// contract without asking the bucket on every handoff. Returns how
    /// many were loaded and the bucket revision to watch from, so the watch
    /// does not load them all again.
    pub async fn load_contracts(&self) -> Result<(usize, u64), BrokerError> {
        let revision = self.store().contracts_revision().await?;
        let keys = self.store().contract_keys().await?;
        let mut n = 0;
        for key in keys {
            let Some((message_type, version)) = crate::store::parse_contract_key(&key) else {
                continue;
            };
            if let Some(c) = self.store().contract(message_type, version).await? {
                match Compiled::new(c) {
                    Ok(c) => {
                        self.contracts().insert(Arc::new(c));
                        n += 1;
                    }
                    Err(e) => tracing::warn!(key, error = %e, "stored contract skipped"),
                }
            }
        }
        Ok((n, revision + 1))
    }

    /// Records that a session holds `delivery_id`; `release` is told when
    /// the delivery is settled outside the session (complete-and-handoff).
    pub fn track_delivery(&self, delivery_id: &str, release: mpsc::UnboundedSender<String>) {
        self.inner.leases.insert(delivery_id.to_string(), release);
    }

    /// Forgets a delivery the session settled itself.
    pub fn untrack_delivery(&self, delivery_id: &str) {
        self.inner.leases.remove(delivery_id);
    }

    /// Tells the session holding `delivery_id` (on this replica) that it
    /// was settled by a complete-and-handoff.
    pub fn release_delivery(&self, delivery_id: &str) {
        if let Some((id, tx)) = self.inner.leases.remove(delivery_id) {
            let _ = tx.send(id);
        }
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

    /// Publishes an event, deduplicated by `msg_id`; the owner and time
    /// are filled in.
    pub async fn emit(&self, mut event: pb::Event, msg_id: &str) -> Result<u64, BrokerError> {
        if event.at.is_none() {
            event.at = Some(now());
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
        if let Err(e) = self
            .store()
            .publish_event_unconfirmed(&event, &msg_id)
            .await
        {
            tracing::warn!(error = %e, msg_id, "event not published");
        }
    }

    /// Ends a run (compare-and-set, retried on conflict) and tells its
    /// owner. Returns the run as it ended; if it had already ended, returns
    /// it unchanged; the end event is re-published (deduplicated) while
    /// within the dedupe window, so a crash between the two steps cannot
    /// leave an ended run unannounced.
    pub async fn end_run(&self, run_id: &str, end: RunEnd) -> Result<pb::Run, BrokerError> {
        loop {
            let (mut run, rev) = self.run(run_id).await?;
            let status = pb::RunStatus::try_from(run.status).unwrap_or(pb::RunStatus::Unspecified);
            if status.is_terminal() {
                // Re-announce only while JetStream still deduplicates the
                // end event; past that window the announcement was made.
                let recent = run
                    .ended_at
                    .and_then(|t| SystemTime::try_from(t).ok())
                    .and_then(|t| SystemTime::now().duration_since(t).ok())
                    .is_some_and(|age| age < self.config().dedupe_window);
                if recent {
                    self.announce_end(&run).await?;
                }
                return Ok(run);
            }
            run.ended_at = Some(now());
            match &end {
                RunEnd::Completed { handoff_id, result } => {
                    run.status = pb::RunStatus::Completed as i32;
                    run.result = result.clone();
                    run.result_handoff_id = handoff_id.clone();
                }
                RunEnd::Failed(reason) => {
                    run.status = pb::RunStatus::Failed as i32;
                    run.failure = reason.clone();
                }
                RunEnd::TimedOut(reason) => {
                    run.status = pb::RunStatus::TimedOut as i32;
                    run.failure = reason.clone();
                }
            }
            if self.store().update_run(&run, rev).await? {
                self.announce_end(&run).await?;
                return Ok(run);
            }
        }
    }

    /// Publishes the event that tells a run's owner how it ended.
    pub async fn announce_end(&self, run: &pb::Run) -> Result<(), BrokerError> {
        let status = pb::RunStatus::try_from(run.status).unwrap_or(pb::RunStatus::Unspecified);
        let kind = match status {
            pb::RunStatus::Completed => pb::EventKind::RunCompleted,
            pb::RunStatus::Failed => pb::EventKind::RunFailed,
            pb::RunStatus::TimedOut => pb::EventKind::RunTimedOut,
            _ => return Ok(()),
        };
        let event = pb::Event {
            kind: kind as i32,
            at: run.ended_at,
            run_id: run.id.clone(),
            owner: run.owner.clone(),
            handoff_id: run.result_handoff_id.clone(),
            reason: run.failure.clone(),
            run_status: run.status,
            ..Default::default()
        };
        self.emit(event, &format!("end-{}", run.id))
            .await
            .map(|_| ())
    }
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
        _ => "unknown",
    }
}
