//! Barriers: open one, read one, the arrival of branch results, the
//! exactly-once release, and the barrier timers (timeout, release check).
//!
//! A barrier is kept in two parts (see [`crate::rules::barrier`]): each
//! branch result is its key's record in the `HANDOFF_BRANCHES` stream
//! (deduplicated by its handoff id; the stream keeps only a key's first
//! result), and a small header (`handoff_barriers`, key
//! `<run>.<barrier>`: spec, state, one bit per counted branch, counts)
//! changed only by compare-and-set, so replicas racing on the last branch
//! agree on one release. An arrival costs the same whatever the width:
//! one record, and one header write shared with every arrival this
//! replica counts at the same time (they are counted together, in one
//! compare-and-set). A result that arrives before its barrier is opened
//! stays in the stream and is counted when the barrier opens.
//!
//! Release is exactly once: the compare-and-set that moves the barrier to
//! RELEASED (or FAILED) decides it; the winner then reads the counted
//! records back, publishes the release handoff under a deterministic id
//! (deduplicated by JetStream) and marks it published. A durable timer
//! scheduled before the compare-and-set re-publishes a release whose
//! broker died in between; the records being immutable, the release it
//! builds is the same.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, SystemTime},
};

use dashmap::DashMap;
use handoff_proto::pb;
use prost::Message as _;
use tokio::sync::oneshot;

use crate::{
    app::{access, auth::Caller, clock, now, state, status_name, Broker},
    error::{BrokerError, Reason},
    rules::{
        barrier::{self, Arrival, Decision, KeyIndex},
        grants::Action,
        names,
    },
    store::{BranchPut, TimerKind},
};

/// A spec larger than this keeps its branch keys in their own entry, out
/// of the header every arrival rewrites.
const SPEC_INLINE: usize = 2048;

/// Key indexes this replica keeps at most (a spec never changes, so any
/// can be dropped and read again).
const INDEXES: usize = 4096;

/// Queues of arrivals waiting to be counted (by hash of the barrier).
const STRIPES: usize = 64;

/// Bytes of branch records this replica keeps for the releases it may
/// publish, over every open barrier (past it, the cache starts over).
const RECORDS_BYTES: usize = 64 << 20;

/// Records a release reads one by one, rather than the whole stream, when
/// the cache lacks them.
const MISSING_READS: usize = 64;

/// What this replica keeps for barriers: the key index of each barrier it
/// met, and the arrivals waiting to be counted.
pub struct Local {
    indexes: DashMap<String, Arc<Joined>>,
    stripes: Vec<Mutex<Stripe>>,
    /// The branch records this replica stored, by barrier and key, until
    /// the barrier's release is out: a release reads them from here
    /// rather than from the stream (those stored through another
    /// replica, or dropped with the cache, are read from the stream).
    records: DashMap<String, HashMap<String, pb::BranchResult>>,
    records_bytes: std::sync::atomic::AtomicUsize,
    /// The header this replica last wrote for each open barrier, with its
    /// revision: the next count starts from it instead of reading it (a
    /// write from another replica only fails the compare-and-set).
    headers: DashMap<String, (pb::Barrier, u64)>,
}

impl Default for Local {
    fn default() -> Self {
        Local {
            indexes: DashMap::new(),
            stripes: (0..STRIPES)
                .map(|_| Mutex::new(Stripe::default()))
                .collect(),
            records: DashMap::new(),
            records_bytes: std::sync::atomic::AtomicUsize::new(0),
            headers: DashMap::new(),
        }
    }
}

impl Local {
    /// Keeps stored records of barrier `key` for its release.
    fn keep(&self, key: &str, records: &[pb::BranchResult]) {
        let size: usize = records.iter().map(|r| r.encoded_len() + 64).sum();
        if self.records_bytes.fetch_add(size, Ordering::Relaxed) + size > RECORDS_BYTES {
            // Bounded: start over (releases read what is missing from the
            // stream).
            self.records.clear();
            self.records_bytes.store(size, Ordering::Relaxed);
        }
        let mut kept = self.records.entry(key.to_string()).or_default();
        for r in records {
            kept.entry(r.key.clone()).or_insert_with(|| r.clone());
        }
    }

    /// Forgets the records of barrier `key` (its release is out).
    fn forget(&self, key: &str) {
        if let Some((_, kept)) = self.records.remove(key) {
            let size: usize = kept.values().map(|r| r.encoded_len() + 64).sum();
            let _ = self
                .records_bytes
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    Some(n.saturating_sub(size))
                });
        }
    }
}

/// A barrier's whole spec and its key index.
struct Joined {
    spec: pb::BarrierSpec,
    index: KeyIndex,
    /// Bytes the release keeps for its own fields (see [`budget`]).
    reserve: u64,
}

/// Arrivals of one stripe waiting to be counted, and whether a task is
/// counting them.
#[derive(Default)]
struct Stripe {
    queue: Vec<Pending>,
    draining: bool,
}

/// An arrival waiting to be counted.
struct Pending {
    run: pb::Run,
    barrier_id: String,
    record: pb::BranchResult,
    done: oneshot::Sender<Result<Option<pb::Barrier>, BrokerError>>,
}

/// How long after a release its publication is checked again.
const RELEASE_CHECK: Duration = Duration::from_secs(5);

/// The id of a barrier's release handoff.
pub fn release_id(run_id: &str, barrier_id: &str) -> String {
    crate::rules::handoff::derived_id(&format!("barrier\u{0}{run_id}\u{0}{barrier_id}"))
}

/// A barrier spec refused by the rules: TOO_MANY_BRANCHES over the cap,
/// else INVALID_BARRIER_SPEC.
pub fn spec_error(e: barrier::BarrierError) -> BrokerError {
    match e {
        barrier::BarrierError::TooManyBranches { count } => BrokerError::TooManyBranches {
            count,
            limit: barrier::MAX_BRANCHES,
        },
        e => BrokerError::invalid(Reason::InvalidBarrierSpec, "barrier", e.to_string()),
    }
}

/// Opens a barrier (idempotent for the same spec), applies branch results
/// that arrived before it, and schedules its timeout.
pub async fn open(
    broker: &Broker,
    caller: &Caller,
    req: pb::OpenBarrierRequest,
) -> Result<pb::OpenBarrierResponse, BrokerError> {
    let spec = required(req.barrier)?;
    names::validate("barrier.run_id", &spec.run_id)?;
    let run = broker.store().run(&spec.run_id).await?.map(|(r, _)| r);
    access::may_act(broker, caller, &spec.run_id, run.as_ref(), None).await?;
    open_spec(broker, spec).await
}

/// The barrier spec a request must carry.
pub fn required(spec: Option<pb::BarrierSpec>) -> Result<pb::BarrierSpec, BrokerError> {
    spec.ok_or_else(|| BrokerError::malformed("barrier", "barrier is required"))
}

/// Opens a barrier from its spec (see [`open`]). A spec whose keys do not
/// fit in one NATS message (with room for the entry's framing) is refused
/// as INVALID_BARRIER_SPEC.
pub async fn open_spec(
    broker: &Broker,
    spec: pb::BarrierSpec,
) -> Result<pb::OpenBarrierResponse, BrokerError> {
    barrier::branch_keys(&spec).map_err(spec_error)?;
    let limit = max_message(broker).saturating_sub(1024);
    if spec.encoded_len() > limit {
        return Err(BrokerError::invalid(
            Reason::InvalidBarrierSpec,
            "barrier.branch_keys",
            format!(
                "the barrier's spec is {} bytes with its branch keys; at most {limit} fit in one NATS message: use shorter keys or branch_count",
                spec.encoded_len()
            ),
        ));
    }
    let (run, _) = broker.run(&spec.run_id).await?;
    let status = pb::RunStatus::try_from(run.status).unwrap_or(pb::RunStatus::Unspecified);
    if status.is_terminal() {
        return Err(BrokerError::RunClosed {
            run: run.id.clone(),
            status: status_name(run.status),
        });
    }
    broker.agent(&spec.target_agent).await?;
    let mut fresh = barrier::open(spec.clone(), now());
    if spec.encoded_len() > SPEC_INLINE {
        broker.store().create_barrier_keys(&spec).await?;
        if let Some(s) = fresh.spec.as_mut() {
            s.branch_keys.clear();
        }
        fresh.keys_apart = true;
    }
    let created = broker.store().create_barrier(&fresh).await?;
    let mut existing = None;
    if !created {
        let (current, _) = broker
            .store()
            .barrier(&spec.run_id, &spec.barrier_id)
            .await?
            .ok_or_else(|| BrokerError::Internal("barrier vanished".to_string()))?;
        let joined = joined(broker, &current).await?;
        if !barrier::same_spec(&joined.spec, &spec) {
            return Err(BrokerError::BarrierExists(format!(
                "barrier {:?} of run {:?} is already open with another spec",
                spec.barrier_id, spec.run_id
            )));
        }
        existing = Some(current);
    }
    if let Some(timeout) = spec.timeout.and_then(|d| Duration::try_from(d).ok()) {
        let due = SystemTime::now() + timeout;
        let timer = pb::Timer {
            run_id: spec.run_id.clone(),
            due: Some(due.into()),
            barrier_id: spec.barrier_id.clone(),
            ..Default::default()
        };
        broker
            .store()
            .schedule(&timer, TimerKind::BarrierTimeout)
            .await?;
    }
    let msg_id = format!("opened-{}-{}", run.id, spec.barrier_id);
    let (emitted, early) = tokio::join!(
        broker.emit(
            pb::Event {
                kind: pb::EventKind::BarrierOpened as i32,
                run_id: run.id.clone(),
                owner: run.owner.clone(),
                agent: spec.target_agent.clone(),
                barrier_id: spec.barrier_id.clone(),
                reason: describe(&spec),
                ..Default::default()
            },
            &msg_id,
        ),
        // Read after the barrier exists: a branch notes itself before it
        // looks for its barrier, so either it is noted here or it found
        // the barrier and counted itself.
        broker
            .store()
            .has_early_branch(&spec.run_id, &spec.barrier_id),
    );
    emitted?;
    let barrier = if early? {
        // Branch results that were stored before the barrier existed.
        let header = apply_stored(broker, &run, &spec.barrier_id)
            .await?
            .ok_or_else(|| BrokerError::Internal("barrier vanished".to_string()))?;
        filled(broker, header).await?
    } else {
        let mut header = existing.unwrap_or(fresh);
        header.spec = Some(spec);
        header
    };
    Ok(pb::OpenBarrierResponse {
        barrier: Some(barrier),
        created,
    })
}

/// The NATS message limit (1 MiB when the server does not say).
fn max_message(broker: &Broker) -> usize {
    match broker.store().max_payload() {
        0 => 1 << 20,
        n => n,
    }
}

/// "ALL of 4", "QUORUM 2 of 3, fail fast, timeout 20s (release partial)".
fn describe(spec: &pb::BarrierSpec) -> String {
    let n = KeyIndex::of(spec).len();
    let mut text = if spec.mode == pb::BarrierMode::Quorum as i32 {
        format!("QUORUM {} of {n}", spec.quorum)
    } else {
        format!("ALL of {n}")
    };
    if spec.fail_fast {
        text.push_str(", fail fast");
    }
    if let Some(t) = spec.timeout.and_then(|d| Duration::try_from(d).ok()) {
        let policy = if spec.on_timeout == pb::OnTimeout::ReleasePartial as i32 {
            "release partial"
        } else {
            "fail"
        };
        text.push_str(&format!(
            ", timeout {} ({policy})",
            humantime::format_duration(t)
        ));
    }
    text
}

/// The whole spec and key index of a barrier, from this replica's cache,
/// else from its header or (keys apart) its keys entry.
async fn joined(broker: &Broker, header: &pb::Barrier) -> Result<Arc<Joined>, BrokerError> {
    let spec = header.spec.clone().unwrap_or_default();
    let key = format!("{}.{}", spec.run_id, spec.barrier_id);
    let local = broker.barrier_local();
    if let Some(found) = local.indexes.get(&key) {
        return Ok(found.clone());
    }
    let spec = if header.keys_apart {
        broker
            .store()
            .barrier_keys(&spec.run_id, &spec.barrier_id)
            .await?
            .ok_or_else(|| {
                BrokerError::Internal(format!("the branch keys of barrier {key} are not stored"))
            })?
    } else {
        spec
    };
    let index = KeyIndex::of(&spec);
    // Key lengths, once: what the release's lists of keys take.
    let reserve = index.keys().map(|k| 3 * k.len() as u64 + 112).sum();
    let found = Arc::new(Joined {
        spec,
        index,
        reserve,
    });
    if local.indexes.len() >= INDEXES {
        local.indexes.clear();
    }
    local.indexes.insert(key, found.clone());
    Ok(found)
}

/// A barrier header with what is read from its records: the whole spec,
/// the counted branches (without payloads), the late keys and, once
/// released, the whole release (without payloads).
async fn filled(broker: &Broker, mut header: pb::Barrier) -> Result<pb::Barrier, BrokerError> {
    let joined = joined(broker, &header).await?;
    let spec = joined.spec.clone();
    let records = broker
        .store()
        .branch_results(&spec.run_id, &spec.barrier_id)
        .await?;
    header.late = barrier::late_keys(&header, &joined.index, &records);
    let mut counted = barrier::counted_branches(&header, &joined.index, records);
    for r in &mut counted {
        r.payload = None;
    }
    if header.state != pb::BarrierState::Open as i32 {
        let release =
            barrier::release_payload(&header, &joined.index, counted.clone(), false, false);
        header.release = Some(release);
    }
    header.branches = counted;
    header.spec = Some(spec);
    Ok(header)
}

/// A barrier's state.
pub async fn get(
    broker: &Broker,
    caller: &Caller,
    req: pb::GetBarrierRequest,
) -> Result<pb::GetBarrierResponse, BrokerError> {
    names::validate("run_id", &req.run_id)?;
    names::validate("barrier_id", &req.barrier_id)?;
    if !caller.may(Action::Read, "") {
        access::read(broker, caller, &req.run_id, "").await?;
    }
    let (header, _) = broker
        .store()
        .barrier(&req.run_id, &req.barrier_id)
        .await?
        .ok_or_else(|| {
            BrokerError::BarrierNotFound(format!(
                "barrier {:?} of run {:?} not found",
                req.barrier_id, req.run_id
            ))
        })?;
    Ok(pb::GetBarrierResponse {
        barrier: Some(filled(broker, header).await?),
    })
}

mod arrive;
mod release;

pub use arrive::*;
pub use release::*;
