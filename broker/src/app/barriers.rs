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
    app::{access, auth::Caller, now, state, status_name, Broker},
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

/// How a branch result was taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arrived {
    /// Its sequence in the branch stream.
    pub sequence: u64,
    /// Whether it repeated a result the barrier has already.
    pub duplicate: bool,
    /// The handoff id of the result the barrier holds for the key, when it
    /// is another one than this (a second, different result).
    pub first: Option<String>,
}

/// Stores a branch result as its key's record (setting `stored`), then
/// counts it in its barrier if the barrier is open yet. `current` is the
/// barrier as the caller read it (saves a read; a stale one only costs a
/// retry). Idempotent: the same handoff id stores once and counts once.
/// Refused before anything is stored: a key the barrier does not have
/// (`UNKNOWN_BRANCH_KEY`; a result for a barrier not opened yet is held
/// until it opens), and a result that would take an open barrier's
/// release past its budget. A second, different result for a key that
/// has one is answered as a duplicate of the first (its handoff id in
/// [`Arrived::first`]) and stored nowhere.
pub async fn arrive(
    broker: &Broker,
    run: &pb::Run,
    barrier_id: &str,
    mut result: pb::BranchResult,
    current: Option<(pb::Barrier, u64)>,
    stored: &AtomicBool,
) -> Result<Arrived, BrokerError> {
    barrier::normalise(&mut result);
    if let Some(b) = current.as_ref().map(|(b, _)| b) {
        if let Some(answer) = check_arrival(broker, &run.id, barrier_id, &result, b).await? {
            return Ok(answer);
        }
    } else {
        // Not open yet (as the caller read it): note the early result
        // before storing it and looking for the barrier again (see
        // `open_spec`).
        broker
            .store()
            .mark_early_branch(&run.id, barrier_id)
            .await?;
    }
    let put = match broker
        .store()
        .put_branch_result(&run.id, barrier_id, &result)
        .await?
    {
        BranchPut::Stored(put) => put,
        BranchPut::Taken(first) => {
            // Another result for the key won the race to its record.
            let why = format!(
                "branch {} arrived already (handoff {})",
                result.key, first.handoff_id
            );
            tracing::warn!(run_id = %run.id, barrier_id, key = %result.key, reason = %why, "branch result not counted");
            if let Some((b, _)) = &current {
                let mut event = branch_event(run, b, pb::EventKind::BranchLate, &result);
                event.reason = format!("not counted: {why}");
                broker
                    .emit_unconfirmed(
                        event,
                        format!("uncounted-{}-{barrier_id}-{}", run.id, result.handoff_id),
                    )
                    .await;
            }
            return Ok(Arrived {
                sequence: first.sequence,
                duplicate: true,
                first: Some(first.handoff_id),
            });
        }
    };
    stored.store(true, Ordering::Relaxed);
    result.sequence = put.sequence;
    count(broker, run, barrier_id, vec![result]).await?;
    Ok(Arrived {
        sequence: put.sequence,
        duplicate: put.duplicate,
        first: None,
    })
}

/// What `arrive` decides from the barrier as read, before anything is
/// stored: a key the barrier does not have is refused
/// (`UNKNOWN_BRANCH_KEY`), a result that would take an open barrier's
/// release past its budget is refused (`BRANCH_TOO_LARGE`), and a second,
/// different result for a counted key is answered with the first
/// (`Some`). `None`: the result may arrive. The handoff use case asks it
/// before applying the handoff's state delta, so a refused branch changes
/// no state.
pub async fn check_arrival(
    broker: &Broker,
    run_id: &str,
    barrier_id: &str,
    result: &pb::BranchResult,
    b: &pb::Barrier,
) -> Result<Option<Arrived>, BrokerError> {
    let joined = joined(broker, b).await?;
    let Some(position) = joined.index.position(&result.key) else {
        return Err(BrokerError::invalid(
            Reason::UnknownBranchKey,
            "branch_key",
            format!(
                "branch {:?} is not a branch of barrier {barrier_id:?}",
                result.key
            ),
        ));
    };
    if barrier::is_counted(b, position) {
        let first = broker
            .store()
            .branch_result(run_id, barrier_id, &result.key)
            .await?;
        if let Some(first) = first.filter(|f| f.handoff_id != result.handoff_id) {
            return Ok(Some(Arrived {
                sequence: first.sequence,
                duplicate: true,
                first: Some(first.handoff_id),
            }));
        }
        return Ok(None);
    }
    if b.state == pb::BarrierState::Open as i32 {
        let (size, budget) = (cost(result), budget(broker, &joined));
        if b.payload_bytes.saturating_add(size) > budget {
            return Err(BrokerError::BranchTooLarge {
                barrier: barrier_id.to_string(),
                key: result.key.clone(),
                size,
                used: b.payload_bytes,
                budget,
            });
        }
    }
    Ok(None)
}

/// What a branch result adds to its barrier's release handoff: the result
/// itself, and its warnings once more in the release's warnings.
fn cost(result: &pb::BranchResult) -> u64 {
    let warnings: usize = result
        .warnings
        .iter()
        .map(|w| w.len() + result.key.len() + 24)
        .sum();
    (result.encoded_len() + warnings + 8) as u64
}

/// How many bytes of branch results a barrier's release may carry: the
/// largest payload (`max_payload_size`, or one NATS message if larger)
/// less the release's own fields (envelope, lists of keys, placeholders
/// for missing branches and their warnings).
fn budget(broker: &Broker, joined: &Joined) -> u64 {
    // A release over one NATS message goes by reference
    // (`payloads::externalize_built`): it may be as large as any payload.
    let max = broker.config().max_payload_size.max(max_message(broker)) as u64;
    max.saturating_sub(16 * 1024 + joined.reserve)
}

/// Counts stored branch records in their barrier and releases it when it
/// is satisfied; returns the header as it then stands (`None`: the
/// barrier is not open yet, and the records wait in the stream). The
/// records go to this replica's queue of arrivals, and a task counts what
/// the queue holds for one barrier with one compare-and-set; it is not
/// cancelled with the caller, so a record it took is always counted.
async fn count(
    broker: &Broker,
    run: &pb::Run,
    barrier_id: &str,
    records: Vec<pb::BranchResult>,
) -> Result<Option<pb::Barrier>, BrokerError> {
    use std::hash::{Hash, Hasher};
    broker
        .barrier_local()
        .keep(&format!("{}.{barrier_id}", run.id), &records);
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (&run.id, barrier_id).hash(&mut hasher);
    let stripe = (hasher.finish() % STRIPES as u64) as usize;
    let mut answers = Vec::with_capacity(records.len());
    let spawn = {
        let mut queue = broker.barrier_local().stripes[stripe]
            .lock()
            .map_err(|_| BrokerError::Internal("a barrier queue is poisoned".to_string()))?;
        for record in records {
            let (done, answer) = oneshot::channel();
            answers.push(answer);
            queue.queue.push(Pending {
                run: run.clone(),
                barrier_id: barrier_id.to_string(),
                record,
                done,
            });
        }
        !std::mem::replace(&mut queue.draining, true)
    };
    if spawn {
        let broker = broker.clone();
        tokio::spawn(async move { drain(&broker, stripe).await });
    }
    let mut latest = None;
    for answer in answers {
        latest = answer
            .await
            .map_err(|_| BrokerError::Internal("a branch was not counted".to_string()))??;
    }
    Ok(latest)
}

/// Counts the queued arrivals of a stripe, one barrier at a time, until
/// the queue is empty.
async fn drain(broker: &Broker, stripe: usize) {
    loop {
        let batch = {
            let Ok(mut queue) = broker.barrier_local().stripes[stripe].lock() else {
                return;
            };
            if queue.queue.is_empty() {
                queue.draining = false;
                return;
            }
            std::mem::take(&mut queue.queue)
        };
        let mut groups: Vec<(String, Vec<Pending>)> = Vec::new();
        let mut at: HashMap<String, usize> = HashMap::new();
        for pending in batch {
            let key = format!("{}.{}", pending.run.id, pending.barrier_id);
            match at.get(&key) {
                Some(&i) => groups[i].1.push(pending),
                None => {
                    at.insert(key.clone(), groups.len());
                    groups.push((key, vec![pending]));
                }
            }
        }
        for (_, group) in groups {
            let Some(first) = group.first() else {
                continue;
            };
            let (run, barrier_id) = (first.run.clone(), first.barrier_id.clone());
            let (records, dones): (Vec<pb::BranchResult>, Vec<_>) =
                group.into_iter().map(|p| (p.record, p.done)).unzip();
            let outcome = commit(broker, &run, &barrier_id, &records).await;
            for done in dones {
                let answer = match &outcome {
                    Ok(b) => Ok(b.clone()),
                    Err(BrokerError::Internal(m)) => Err(BrokerError::Internal(m.clone())),
                    Err(e) => Err(BrokerError::Unavailable(e.to_string())),
                };
                let _ = done.send(answer);
            }
        }
    }
}

/// Counts `records` (stored results of one barrier) in the header with one
/// compare-and-set, retried from a fresh read when another write came
/// first; then announces each arrival and publishes the release if this
/// write decided it.
async fn commit(
    broker: &Broker,
    run: &pb::Run,
    barrier_id: &str,
    records: &[pb::BranchResult],
) -> Result<Option<pb::Barrier>, BrokerError> {
    let key = format!("{}.{barrier_id}", run.id);
    let local = broker.barrier_local();
    let mut written = local.headers.remove(&key).map(|(_, h)| h);
    loop {
        let read = match written.take() {
            Some(h) => Some(h),
            None => broker.store().barrier(&run.id, barrier_id).await?,
        };
        let Some((mut b, revision)) = read else {
            return Ok(None);
        };
        let joined = joined(broker, &b).await?;
        let arrivals: Vec<Arrival> = records
            .iter()
            .map(|r| {
                let arrival = barrier::arrive(&mut b, &joined.index, r);
                if arrival == Arrival::Counted {
                    b.payload_bytes = b.payload_bytes.saturating_add(cost(r));
                }
                arrival
            })
            .collect();
        let changed = arrivals.contains(&Arrival::Counted);
        let release = match barrier::decide(&b, false) {
            Decision::Release { failure, timed_out } if changed => {
                prepare_release(broker, run, &mut b, failure, timed_out).await?;
                true
            }
            _ => false,
        };
        if changed {
            match broker.store().update_barrier_at(&b, revision).await? {
                Some(next) if b.state == pb::BarrierState::Open as i32 => {
                    if local.headers.len() >= INDEXES {
                        local.headers.clear();
                    }
                    local.headers.insert(key.clone(), (b.clone(), next));
                }
                Some(_) => {}
                None => continue,
            }
        }
        for (record, arrival) in records.iter().zip(&arrivals) {
            announce(broker, run, &b, record, *arrival).await;
        }
        let unpublished = b.state != pb::BarrierState::Open as i32 && !b.release_published;
        if release || (unpublished && arrivals.contains(&Arrival::Duplicate)) {
            // A release decided here; or the same branch again after a
            // call that decided the release and failed before publishing
            // it (NATS lost its answer): publish now rather than at the
            // check.
            publish_release(broker, run, &mut b).await?;
        }
        return Ok(Some(b));
    }
}

/// The event of one arrival: counted, late, or not counted (never
/// silently).
async fn announce(
    broker: &Broker,
    run: &pb::Run,
    b: &pb::Barrier,
    record: &pb::BranchResult,
    arrival: Arrival,
) {
    let barrier_id = b
        .spec
        .as_ref()
        .map(|s| s.barrier_id.as_str())
        .unwrap_or_default();
    let key = &record.key;
    match arrival {
        Arrival::Counted => {
            broker
                .emit_unconfirmed(
                    branch_event(run, b, pb::EventKind::BranchArrived, record),
                    format!("arrived-{}-{barrier_id}-{key}", run.id),
                )
                .await
        }
        Arrival::Late => {
            broker
                .emit_unconfirmed(
                    branch_event(run, b, pb::EventKind::BranchLate, record),
                    format!("late-{}-{barrier_id}-{key}", run.id),
                )
                .await
        }
        Arrival::UnknownKey => {
            // Stored before the barrier could refuse it (it was not open
            // yet).
            tracing::warn!(run_id = %run.id, barrier_id, key, "branch result not counted: not a branch of this barrier");
            let mut event = branch_event(run, b, pb::EventKind::BranchLate, record);
            event.reason = "not counted: not a branch of this barrier".to_string();
            broker
                .emit_unconfirmed(
                    event,
                    format!("uncounted-{}-{barrier_id}-{}", run.id, record.handoff_id),
                )
                .await
        }
        Arrival::Duplicate => {}
    }
}

/// Counts every stored record of a barrier not counted yet (those that
/// arrived before it was opened, or whose broker died between storing and
/// counting them). Returns the header as it then stands.
async fn apply_stored(
    broker: &Broker,
    run: &pb::Run,
    barrier_id: &str,
) -> Result<Option<pb::Barrier>, BrokerError> {
    let Some((latest, _)) = broker.store().barrier(&run.id, barrier_id).await? else {
        return Ok(None);
    };
    if latest.state != pb::BarrierState::Open as i32 {
        return Ok(Some(latest));
    }
    let joined = joined(broker, &latest).await?;
    let waiting: Vec<pb::BranchResult> = broker
        .store()
        .branch_results(&run.id, barrier_id)
        .await?
        .into_iter()
        .filter(|r| {
            joined
                .index
                .position(&r.key)
                .is_none_or(|p| !barrier::is_counted(&latest, p))
        })
        .collect();
    if waiting.is_empty() {
        return Ok(Some(latest));
    }
    Ok(count(broker, run, barrier_id, waiting)
        .await?
        .or(Some(latest)))
}

/// Which durable barrier timer fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timer {
    /// The barrier's timeout: an open barrier releases (partial or failure).
    Timeout,
    /// The check scheduled with a release: re-publish it if its broker died
    /// before publishing.
    ReleaseCheck,
}

/// The agent a barrier releases to.
pub fn target_of(b: &pb::Barrier) -> String {
    b.spec
        .as_ref()
        .map(|s| s.target_agent.clone())
        .unwrap_or_default()
}

/// Fires a barrier timer. A barrier whose release is out needs nothing
/// (the usual case of the release check: it costs one read). Otherwise
/// either kind first counts branch results that were stored but not
/// counted (their broker died in between) and re-publishes a release not
/// yet published; a timeout then releases a barrier that is still open.
pub async fn fire(
    broker: &Broker,
    run_id: &str,
    barrier_id: &str,
    timer: Timer,
) -> Result<(), BrokerError> {
    let run = match broker.run(run_id).await {
        Ok((run, _)) => run,
        Err(BrokerError::RunNotFound(_)) => return Ok(()),
        Err(e) => return Err(e),
    };
    match broker.store().barrier(run_id, barrier_id).await? {
        None => return Ok(()),
        Some((b, _)) if b.state != pb::BarrierState::Open as i32 && b.release_published => {
            return Ok(())
        }
        Some(_) => {}
    }
    let Some(current) = apply_stored(broker, &run, barrier_id).await? else {
        return Ok(());
    };
    if current.state != pb::BarrierState::Open as i32 {
        if !current.release_published {
            let mut b = current;
            publish_release(broker, &run, &mut b).await?;
        }
        return Ok(());
    }
    if timer != Timer::Timeout {
        return Ok(());
    }
    loop {
        let Some((mut b, revision)) = broker.store().barrier(run_id, barrier_id).await? else {
            return Ok(());
        };
        if b.state != pb::BarrierState::Open as i32 {
            if !b.release_published {
                publish_release(broker, &run, &mut b).await?;
            }
            return Ok(());
        }
        let Decision::Release { failure, timed_out } = barrier::decide(&b, true) else {
            return Ok(());
        };
        prepare_release(broker, &run, &mut b, failure, timed_out).await?;
        if !broker.store().update_barrier(&b, revision).await? {
            continue;
        }
        let joined = joined(broker, &b).await?;
        let missing: Vec<String> = (0..joined.index.len())
            .filter(|&p| !barrier::is_counted(&b, p))
            .map(|p| joined.index.key(p))
            .collect();
        broker
            .emit_unconfirmed(
                pb::Event {
                    kind: pb::EventKind::BarrierTimedOut as i32,
                    run_id: run.id.clone(),
                    owner: run.owner.clone(),
                    agent: target_of(&b),
                    barrier_id: barrier_id.to_string(),
                    reason: format!("missing at timeout: {}", missing.join(", ")),
                    ..Default::default()
                },
                format!("timedout-{run_id}-{barrier_id}"),
            )
            .await;
        publish_release(broker, &run, &mut b).await?;
        return Ok(());
    }
}

/// Moves the barrier to its released state in memory (the caller writes
/// it with compare-and-set), after scheduling the durable check that
/// re-publishes the release if this broker dies before publishing it.
async fn prepare_release(
    broker: &Broker,
    run: &pb::Run,
    b: &mut pb::Barrier,
    failure: bool,
    timed_out: bool,
) -> Result<(), BrokerError> {
    let barrier_id = b
        .spec
        .as_ref()
        .map(|s| s.barrier_id.clone())
        .unwrap_or_default();
    let check = pb::Timer {
        run_id: run.id.clone(),
        due: Some((SystemTime::now() + RELEASE_CHECK).into()),
        barrier_id: barrier_id.clone(),
        ..Default::default()
    };
    broker
        .store()
        .schedule(&check, TimerKind::ReleaseCheck)
        .await?;
    barrier::release(
        b,
        failure,
        timed_out,
        release_id(&run.id, &barrier_id),
        now(),
    );
    Ok(())
}

/// Builds the release handoff from the counted records, publishes it
/// (deduplicated by its id), announces it and marks it published.
async fn publish_release(
    broker: &Broker,
    run: &pb::Run,
    b: &mut pb::Barrier,
) -> Result<(), BrokerError> {
    let joined = joined(broker, b).await?;
    let spec = &joined.spec;
    // The aggregator sees the state every branch's delta made.
    let (records, state) = tokio::join!(
        counted_records(broker, run, b, &joined),
        state::latest(broker, &run.id)
    );
    let (records, state_revision) = (records?, state?.map_or(0, |r| r.revision));
    let counted = barrier::counted_branches(b, &joined.index, records);
    let release = barrier::release_payload(b, &joined.index, counted, false, false);
    let payload = prost_types::Any::from_msg(&release)
        .map_err(|e| BrokerError::Internal(format!("encoding the release: {e}")))?;
    let depth = release.branches.iter().map(|r| r.depth).max().unwrap_or(0) + 1;
    let mut envelope = pb::HandoffEnvelope {
        id: b.release_handoff_id.clone(),
        run_id: run.id.clone(),
        target_agent: spec.target_agent.clone(),
        payload: Some(payload),
        confidence: release.confidence,
        warnings: release.warnings.clone(),
        parent_ids: release
            .branches
            .iter()
            .filter(|r| !r.handoff_id.is_empty())
            .map(|r| r.handoff_id.clone())
            .collect(),
        depth,
        created_at: b.released_at,
        barrier_id: spec.barrier_id.clone(),
        state_revision,
        ..Default::default()
    };
    // Inline up to one NATS message; a larger release goes by reference.
    crate::app::payloads::externalize_built(broker, &mut envelope).await?;
    broker.store().put_handoff(&envelope).await?;
    let stored_at = SystemTime::now();
    broker
        .emit(
            pb::Event {
                kind: pb::EventKind::BarrierReleased as i32,
                run_id: run.id.clone(),
                owner: run.owner.clone(),
                agent: spec.target_agent.clone(),
                handoff_id: envelope.id.clone(),
                barrier_id: spec.barrier_id.clone(),
                depth,
                reason: if release.failure {
                    format!("failure: {}", release.warnings.join("; "))
                } else {
                    release.warnings.join("; ")
                },
                ..Default::default()
            },
            &format!("released-{}-{}", run.id, spec.barrier_id),
        )
        .await?;
    // Record that the release is out; a lost race here only means the
    // durable check re-publishes (deduplicated).
    loop {
        let Some((mut current, revision)) =
            broker.store().barrier(&run.id, &spec.barrier_id).await?
        else {
            return Ok(());
        };
        if current.release_published {
            break;
        }
        current.release_published = true;
        if broker.store().update_barrier(&current, revision).await? {
            observe_release(broker, &current, stored_at);
            *b = current;
            break;
        }
    }
    broker
        .barrier_local()
        .forget(&format!("{}.{}", run.id, spec.barrier_id));
    Ok(())
}

/// The records of the branches a barrier counted: those this replica
/// keeps, and the others read from the stream (one by one when few are
/// missing, else all of them).
async fn counted_records(
    broker: &Broker,
    run: &pb::Run,
    b: &pb::Barrier,
    joined: &Joined,
) -> Result<Vec<pb::BranchResult>, BrokerError> {
    let barrier_id = &joined.spec.barrier_id;
    let key = format!("{}.{barrier_id}", run.id);
    let (mut found, missing) = {
        let kept = broker.barrier_local().records.get(&key);
        let mut found = Vec::new();
        let mut missing = Vec::new();
        for position in (0..joined.index.len()).filter(|&p| barrier::is_counted(b, p)) {
            let branch = joined.index.key(position);
            match kept.as_ref().and_then(|k| k.get(&branch)) {
                Some(r) => found.push(r.clone()),
                None => missing.push(branch),
            }
        }
        (found, missing)
    };
    if missing.is_empty() {
        return Ok(found);
    }
    if missing.len() > MISSING_READS {
        return broker.store().branch_results(&run.id, barrier_id).await;
    }
    let read = futures::future::try_join_all(
        missing
            .iter()
            .map(|branch| broker.store().branch_result(&run.id, barrier_id, branch)),
    )
    .await?;
    found.extend(read.into_iter().flatten());
    Ok(found)
}

/// Records a barrier's release once, by the broker that marked it
/// published: how long it stayed open, and (unless it timed out) the time
/// from its last branch arrival to the release handoff stored.
fn observe_release(broker: &Broker, b: &pb::Barrier, stored_at: SystemTime) {
    let at = |t: Option<prost_types::Timestamp>| t.and_then(|t| SystemTime::try_from(t).ok());
    let target = target_of(b);
    if let (Some(opened), Some(released)) = (at(b.opened_at), at(b.released_at)) {
        if let Ok(open) = released.duration_since(opened) {
            broker.metrics().barrier_wait(&target, open);
        }
    }
    let timed_out = b.release.as_ref().is_some_and(|r| r.timed_out);
    if let (false, Some(last)) = (timed_out, at(b.last_arrival_at)) {
        if let Ok(took) = stored_at.duration_since(last) {
            broker.metrics().barrier_release(&target, took);
        }
    }
}

fn branch_event(
    run: &pb::Run,
    b: &pb::Barrier,
    kind: pb::EventKind,
    result: &pb::BranchResult,
) -> pb::Event {
    pb::Event {
        kind: kind as i32,
        run_id: run.id.clone(),
        owner: run.owner.clone(),
        agent: target_of(b),
        source_agent: result.source_agent.clone(),
        handoff_id: result.handoff_id.clone(),
        barrier_id: b
            .spec
            .as_ref()
            .map(|s| s.barrier_id.clone())
            .unwrap_or_default(),
        branch_key: result.key.clone(),
        depth: result.depth,
        reason: result.warnings.join("; "),
        ..Default::default()
    }
}
