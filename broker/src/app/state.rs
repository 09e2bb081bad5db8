//! The shared run state: seeded by `StartRun`, changed only by the deltas
//! handoffs carry, read by deliveries and `GetState`.
//!
//! Each revision is its own record, created once with compare-and-set
//! (`<run>.<revision>`): a delta is applied to the latest revision and
//! written as the next one (stored as what it wrote, with the whole
//! document every [`rules::SNAPSHOT_EVERY`] revisions); when another writer made that revision first,
//! the delta is checked again against it (disjoint keys merge, a replaced
//! key changed since the delta's base is ABORTED). A revision remembers the
//! handoffs that made the latest ones, so a retried handoff finds its
//! revision instead of applying its delta twice. Records never change, so
//! this replica caches them freely, within a byte budget.
//!
//! The delta is written before its handoff is stored: a refused handoff
//! (every guard runs before) changes nothing; a handoff whose store fails
//! after its delta was written answers UNAVAILABLE, and its retry finds
//! the revision it made and stores the handoff with it.

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc,
};

use dashmap::DashMap;
use handoff_proto::pb;
use prost::Message as _;

use crate::{
    app::{access, auth::Caller, clock, now, Broker},
    error::{BrokerError, Reason},
    rules::{
        names,
        state::{self as rules, Limits},
    },
    store::Decided,
};

/// How many times a delta is tried against a state that keeps changing.
const ATTEMPTS: usize = 32;

/// Records this replica keeps, within a byte budget.
#[derive(Default)]
pub struct Cache {
    /// The latest revision known, by run.
    heads: DashMap<String, Arc<pb::StateRecord>>,
    /// Past revisions read, by run and revision.
    past: DashMap<(String, u64), Arc<pb::StateRecord>>,
    bytes: AtomicUsize,
}

impl Cache {
    /// Whether `record` may be cached within `budget` bytes; past the
    /// budget the cache starts over (records are immutable: nothing is
    /// lost but a read). A budget of 0 caches nothing.
    fn admit(&self, record: &pb::StateRecord, budget: usize) -> bool {
        // A decoded record takes about three times its encoded size (maps,
        // strings and `Value`s each allocate), plus the cache's own entry.
        let size = 3 * record.encoded_len() + 256;
        if size > budget {
            return false;
        }
        if self.bytes.fetch_add(size, Ordering::Relaxed) + size > budget {
            self.heads.clear();
            self.past.clear();
            self.bytes.store(size, Ordering::Relaxed);
        }
        true
    }

    fn head(&self, run_id: &str) -> Option<Arc<pb::StateRecord>> {
        self.heads.get(run_id).map(|r| r.clone())
    }

    fn set_head(&self, record: Arc<pb::StateRecord>, budget: usize) {
        let newer = self
            .heads
            .get(&record.run_id)
            .is_none_or(|h| h.revision < record.revision);
        if newer && self.admit(&record, budget) {
            self.heads.insert(record.run_id.clone(), record);
        }
    }

    /// Forgets a run's latest revision (it ended); its past revisions
    /// leave with the budget.
    pub fn forget(&self, run_id: &str) {
        self.heads.remove(run_id);
    }
}

fn limits(broker: &Broker) -> Limits {
    Limits {
        value_bytes: broker.config().max_state_value_bytes,
        document_bytes: broker.config().max_state_bytes,
    }
}

/// The state `StartRun` seeds (revision 1), checked; `None` for a run
/// started without state.
pub fn seed(
    broker: &Broker,
    run_id: &str,
    seed: Option<&pb::StateSeed>,
) -> Result<Option<pb::StateRecord>, BrokerError> {
    match seed {
        None => Ok(None),
        Some(s) => rules::seed(run_id, s, limits(broker), now()).map(Some),
    }
}

/// Stores the seed of a run about to be created (a retried `StartRun`
/// finds it stored and changes nothing).
pub async fn store_seed(broker: &Broker, record: pb::StateRecord) -> Result<(), BrokerError> {
    if broker.store().create_state_record(&record).await? {
        broker.store().set_state_head(&record.run_id, 1).await?;
        broker
            .states()
            .set_head(Arc::new(record), broker.config().state_cache_bytes);
    }
    Ok(())
}

/// The latest revision of a run's state (`None`: it has none): from the
/// cached or recorded head, then forward while newer revisions exist.
pub async fn latest(
    broker: &Broker,
    run_id: &str,
) -> Result<Option<Arc<pb::StateRecord>>, BrokerError> {
    let store = broker.store();
    let mut current = match broker.states().head(run_id) {
        Some(r) => Some(r),
        None => match store.state_head(run_id).await? {
            0 => None,
            n => load(broker, run_id, n).await?,
        },
    };
    loop {
        let next = current.as_ref().map_or(1, |r| r.revision + 1);
        match (store.state_record(run_id, next).await?, &current) {
            (Some(r), Some(previous)) => current = Some(Arc::new(rules::rebuild(previous, r))),
            (Some(r), None) if !r.partial => current = Some(Arc::new(r)),
            (Some(_), None) => return Err(unstored(run_id, 1)),
            (None, _) => break,
        }
    }
    if let Some(r) = &current {
        broker
            .states()
            .set_head(r.clone(), broker.config().state_cache_bytes);
    }
    Ok(current)
}

/// One revision of a run's state.
pub async fn at(
    broker: &Broker,
    run_id: &str,
    revision: u64,
) -> Result<Option<Arc<pb::StateRecord>>, BrokerError> {
    let cache = broker.states();
    if let Some(head) = cache.head(run_id).filter(|h| h.revision == revision) {
        return Ok(Some(head));
    }
    let key = (run_id.to_string(), revision);
    if let Some(r) = cache.past.get(&key) {
        return Ok(Some(r.clone()));
    }
    let record = load(broker, run_id, revision).await?;
    if let Some(r) = record
        .as_ref()
        .filter(|r| cache.admit(r, broker.config().state_cache_bytes))
    {
        cache.past.insert(key, r.clone());
    }
    Ok(record)
}

/// One revision of a run's state, whole, from the store: read as stored,
/// and, when stored as a delta, rebuilt from the snapshot before it and the
/// revisions between, all read at once.
async fn load(
    broker: &Broker,
    run_id: &str,
    revision: u64,
) -> Result<Option<Arc<pb::StateRecord>>, BrokerError> {
    let store = broker.store();
    let Some(stored) = store.state_record(run_id, revision).await? else {
        return Ok(None);
    };
    if !stored.partial {
        return Ok(Some(Arc::new(stored)));
    }
    let base = rules::snapshot_of(revision);
    let before = futures::future::try_join_all(
        (base..revision)
            .map(|r| async move { store.state_record(run_id, r).await.map(|s| (r, s)) }),
    )
    .await?;
    let mut whole: Option<pb::StateRecord> = None;
    for (r, record) in before {
        let record = record.ok_or_else(|| unstored(run_id, r))?;
        whole = Some(match whole {
            Some(previous) => rules::rebuild(&previous, record),
            None if !record.partial => record,
            None => return Err(unstored(run_id, r)),
        });
    }
    let previous = whole.ok_or_else(|| unstored(run_id, base))?;
    Ok(Some(Arc::new(rules::rebuild(&previous, stored))))
}

/// A revision a stored one is rebuilt from is missing.
fn unstored(run_id: &str, revision: u64) -> BrokerError {
    BrokerError::Internal(format!(
        "revision {revision} of run {run_id:?}'s state is not stored whole, or at all"
    ))
}

/// What a handoff did to the run state.
#[derive(Debug, Default)]
pub struct Applied {
    /// The revision it hands over (0: the run has no state).
    pub revision: u64,
    /// What its delta changed (`None`: it carried none).
    pub change: Option<pb::StateChange>,
    /// The state before its delta, for the keys it asks for.
    pub before: Option<Arc<pb::StateRecord>>,
    /// The causal position of the revision it hands over (its time):
    /// the handoff's own position follows it.
    pub position: u64,
    /// How the run ends, when its delta was stored with the run's end
    /// (see [`Hints::ends`]).
    pub decided: Option<pb::Run>,
}

/// What a handoff brings to [`apply`] besides its delta.
#[derive(Debug, Default, Clone, Copy)]
pub struct Hints<'a> {
    /// It asks for keys (`asks_for`): the state before it is read even
    /// when it carries no delta.
    pub asks: bool,
    /// The revision an earlier attempt of it recorded making (0: none).
    pub made: u64,
    /// How the run ends, for the run's final handoff: its delta is stored
    /// atomically with the run's end, and refused RUN_CLOSED, storing
    /// nothing, when the run's end was decided otherwise first.
    pub ends: Option<&'a pb::Run>,
}

/// Applies a handoff's delta (if any) to its run's state, or finds the
/// revision an earlier attempt of it made (`made`, when recorded: found
/// however many revisions followed; else among the latest revisions'
/// appliers); for a handoff without a delta, the revision it hands over is
/// the latest.
pub async fn apply(
    broker: &Broker,
    run: &pb::Run,
    handoff_id: &str,
    source_agent: &str,
    delta: Option<&pb::StateDelta>,
    hints: Hints<'_>,
) -> Result<Applied, BrokerError> {
    let Hints { asks, made, ends } = hints;
    let delta = delta.filter(|d| !rules::is_empty(d));
    if delta.is_some() && made > 0 {
        if let Some(record) = at(broker, &run.id, made).await? {
            if record.handoff_id == handoff_id {
                return again(broker, run, made).await;
            }
        }
    }
    let Some(delta) = delta else {
        if !run.has_state && !asks {
            return Ok(Applied::default());
        }
        let head = latest(broker, &run.id).await?;
        return Ok(Applied {
            revision: head.as_ref().map_or(0, |h| h.revision),
            change: None,
            position: head.as_ref().map_or(0, |h| clock::nanos(h.at.as_ref())),
            before: head,
            decided: None,
        });
    };
    let mut ended_by_it = None;
    for _ in 0..ATTEMPTS {
        let head = latest(broker, &run.id).await?;
        if run.has_state && head.is_none() {
            return Err(BrokerError::Internal(format!(
                "run {:?} has state, but none of its revisions is stored",
                run.id
            )));
        }
        if let Some(revision) = head.as_ref().and_then(|h| rules::applied(h, handoff_id)) {
            return again(broker, run, revision).await;
        }
        if let Some(before) = ended_by_it {
            // Without it: it hands over the latest revision.
            return Ok(Applied {
                revision: head.as_ref().map_or(0, |h| h.revision),
                change: None,
                position: head.as_ref().map_or(0, |h| clock::nanos(h.at.as_ref())),
                before: head,
                decided: Some(before),
            });
        }
        let next = rules::apply(
            &run.id,
            head.as_deref(),
            delta,
            handoff_id,
            source_agent,
            limits(broker),
            // After the revision it builds on.
            broker.stamp(
                head.as_ref()
                    .map_or(0, |h| clock::nanos(h.at.as_ref()).saturating_add(1)),
            ),
        )?;
        let max_payload = broker.store().max_payload();
        if max_payload > 0 && next.encoded_len() > max_payload {
            return Err(BrokerError::Refused {
                reason: Reason::StateTooLarge,
                message: format!(
                    "the run state's next revision would be {} bytes with its delta; NATS takes at most {max_payload} (max_payload): lower max_state_bytes or send a smaller delta",
                    next.encoded_len()
                ),
                metadata: vec![
                    ("key", String::new()),
                    ("size", next.encoded_len().to_string()),
                    ("limit", max_payload.to_string()),
                ],
            });
        }
        let stored = rules::stored_form(&next);
        let created = match ends {
            None => broker.store().create_state_record(&stored).await?,
            Some(how) => match broker
                .store()
                .decide_end(&run.id, run.resumed, how, Some(&stored))
                .await?
            {
                Decided::Now => true,
                Decided::RevisionTaken => false,
                Decided::Before(before) if before.result_handoff_id == handoff_id => {
                    // An earlier attempt of it decided the end: with its
                    // delta, found on the next turn.
                    ended_by_it = Some(*before);
                    false
                }
                Decided::Before(before) => {
                    let status = crate::app::status_name(before.status);
                    crate::app::runs::finish_decided(broker, &run.id, *before).await;
                    return Err(BrokerError::RunClosed {
                        run: run.id.clone(),
                        status,
                    });
                }
            },
        };
        if created {
            let revision = next.revision;
            let change = next.change.clone();
            let position = clock::nanos(next.at.as_ref());
            let (head_written, marked) =
                tokio::join!(broker.store().set_state_head(&run.id, revision), async {
                    if run.has_state {
                        Ok(())
                    } else {
                        mark_has_state(broker, &run.id).await
                    }
                });
            if let Err(e) = head_written {
                // Readers find newer revisions past the head anyway.
                tracing::debug!(error = %e, "run state head not recorded");
            }
            marked?;
            broker
                .states()
                .set_head(Arc::new(next), broker.config().state_cache_bytes);
            return Ok(Applied {
                revision,
                change,
                before: head,
                position,
                decided: ends.cloned(),
            });
        }
        // Another writer made that revision first: check against it.
        broker.states().heads.remove(&run.id);
    }
    Err(BrokerError::Unavailable(format!(
        "the state of run {:?} kept changing under {ATTEMPTS} attempts; retry",
        run.id
    )))
}

/// Whether an earlier attempt of `handoff_id` made its delta: at `made`
/// (when its claim recorded it), or among the latest revision's appliers.
pub async fn made_before(
    broker: &Broker,
    run: &pb::Run,
    handoff_id: &str,
    made: u64,
) -> Result<bool, BrokerError> {
    if made > 0 {
        if let Some(record) = at(broker, &run.id, made).await? {
            if record.handoff_id == handoff_id {
                return Ok(true);
            }
        }
    }
    Ok(latest(broker, &run.id)
        .await?
        .is_some_and(|head| rules::applied(&head, handoff_id).is_some()))
}

/// What a retried handoff did: its delta made `revision` already.
async fn again(broker: &Broker, run: &pb::Run, revision: u64) -> Result<Applied, BrokerError> {
    let made = at(broker, &run.id, revision).await?;
    let before = match revision {
        1 => None,
        n => at(broker, &run.id, n - 1).await?,
    };
    Ok(Applied {
        revision,
        position: made.as_ref().map_or(0, |m| clock::nanos(m.at.as_ref())),
        change: made.and_then(|m| m.change.clone()),
        before,
        decided: None,
    })
}

/// Records on the run that it has state (its first delta), so handoffs
/// without a delta hand over its latest revision.
async fn mark_has_state(broker: &Broker, run_id: &str) -> Result<(), BrokerError> {
    for _ in 0..ATTEMPTS {
        let (mut run, revision) = broker.run(run_id).await?;
        if run.has_state {
            return Ok(());
        }
        run.has_state = true;
        if broker.store().update_run(&run, revision).await? {
            broker.forget_run(&run.id);
            return Ok(());
        }
    }
    Err(BrokerError::Unavailable(format!(
        "run {run_id:?} kept changing; retry"
    )))
}

/// The state a delivery of `envelope` carries, for an agent that reads
/// `reads` (empty: everything), and the intent digest of the run.
/// A revision that cannot be read fails the offer (the delivery waits for
/// its next one): no delivery goes out without the state it hands over.
pub async fn for_delivery(
    broker: &Broker,
    run: &pb::Run,
    envelope: &pb::HandoffEnvelope,
    reads: &[String],
) -> Result<(Option<pb::RunState>, String), BrokerError> {
    let state = match envelope.state_revision {
        0 => None,
        revision => match at(broker, &run.id, revision).await? {
            Some(record) => Some(rules::view(&record, reads)),
            None => {
                return Err(BrokerError::Internal(format!(
                    "revision {revision} of run {:?}'s state is not stored",
                    run.id
                )))
            }
        },
    };
    let digest = handoff_proto::digest::intent_digest(run.pinned.as_ref(), state.as_ref());
    Ok((state, digest))
}

/// `GetState`: a run's state at a revision (0: the latest).
pub async fn get(
    broker: &Broker,
    caller: &Caller,
    req: pb::GetStateRequest,
) -> Result<pb::GetStateResponse, BrokerError> {
    names::validate("run_id", &req.run_id)?;
    let run = access::read(broker, caller, &req.run_id, &req.delivery_id).await?;
    let latest = latest(broker, &run.id).await?;
    let latest_revision = latest.as_ref().map_or(0, |l| l.revision);
    let record = match req.revision {
        0 => latest,
        n if n <= latest_revision => at(broker, &run.id, n).await?,
        _ => None,
    };
    let Some(record) = record else {
        return Err(BrokerError::Refused {
            reason: Reason::StateRevisionNotFound,
            message: if latest_revision == 0 {
                format!("run {:?} has no state", run.id)
            } else {
                format!(
                    "run {:?} has no state revision {}; its latest is {latest_revision}",
                    run.id, req.revision
                )
            },
            metadata: vec![
                ("run_id", run.id.clone()),
                ("revision", req.revision.to_string()),
                ("latest_revision", latest_revision.to_string()),
            ],
        });
    };
    Ok(pb::GetStateResponse {
        state: Some(rules::view(&record, &[])),
        handoff_id: record.handoff_id.clone(),
        source_agent: record.source_agent.clone(),
        at: record.at,
        delta: record.delta.clone(),
        change: record.change.clone(),
        latest_revision,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(run: &str, revision: u64) -> Arc<pb::StateRecord> {
        Arc::new(pb::StateRecord {
            run_id: run.to_string(),
            revision,
            ..Default::default()
        })
    }

    #[test]
    fn the_cache_keeps_the_newest_head_within_its_budget_and_nothing_at_zero() {
        let cache = Cache::default();
        cache.set_head(record("r", 1), 0);
        assert!(cache.head("r").is_none(), "a budget of 0 caches nothing");
        let budget = 4 * (3 * record("r", 1).encoded_len() + 256);
        cache.set_head(record("r", 2), budget);
        cache.set_head(record("r", 1), budget);
        assert_eq!(cache.head("r").map(|h| h.revision), Some(2), "never older");
        for run in ["a", "b", "c", "d"] {
            cache.set_head(record(run, 1), budget);
        }
        // Past the budget it started over: the first entries are gone.
        assert!(cache.head("r").is_none());
        assert!(cache.head("d").is_some());
        cache.forget("d");
        assert!(cache.head("d").is_none());
    }
}
