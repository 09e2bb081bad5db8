//! The arrival of branch results: recorded, counted together per
//! replica in one compare-and-set of the header, and answered.

use super::*;

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
    /// When that first result arrived.
    pub first_at: Option<prost_types::Timestamp>,
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
                first_at: first.arrived_at,
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
        first_at: None,
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
                first_at: first.arrived_at,
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
pub(super) fn cost(result: &pb::BranchResult) -> u64 {
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
pub(super) fn budget(broker: &Broker, joined: &Joined) -> u64 {
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
pub(super) async fn count(
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
pub(super) async fn drain(broker: &Broker, stripe: usize) {
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
pub(super) async fn commit(
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
pub(super) async fn announce(
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
pub(super) async fn apply_stored(
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
