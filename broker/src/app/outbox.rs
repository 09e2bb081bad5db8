//! Events that observe a step already made durable (delivered, acked,
//! nacked, discarded, branch arrivals, refusals, ...) are stored with
//! confirmation without the caller waiting for it: they go to an outbox
//! that publishes them in batches (pipelined: a batch is sent, then its
//! confirmations awaited together), retries each one that was not
//! confirmed, and gives one up only after [`GIVE_UP`], counting it in
//! `handoff_events_dropped_total` with a log line. Every event carries a
//! deterministic message id, so a retry never stores it twice.
//!
//! The outbox is bounded (`outbox_capacity` events, those waiting for a
//! retry included): when it is full, a step that emits an event waits up
//! to [`FULL_WAIT`] for room (backpressure), then the event is dropped and
//! counted the same way.

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use handoff_proto::pb;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::app::Broker;

/// Most events published in one batch.
const BATCH: usize = 256;
/// How long an event is retried before it is given up.
pub const GIVE_UP: Duration = Duration::from_secs(120);
/// How long an emitter waits for room in a full outbox.
pub const FULL_WAIT: Duration = Duration::from_secs(1);

/// An event waiting to be stored.
#[derive(Debug)]
pub struct Pending {
    event: pb::Event,
    msg_id: String,
    since: Instant,
    /// Its room in the outbox, given back once it is stored or given up.
    _room: OwnedSemaphorePermit,
}

/// The sending side, kept by the broker.
#[derive(Debug)]
pub struct Outbox {
    tx: mpsc::Sender<Pending>,
    /// Room for events handed over and not yet stored or given up.
    room: Arc<Semaphore>,
    /// Events handed over and not yet stored or given up.
    waiting: AtomicUsize,
}

/// What became of an event handed to the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// Taken: it will be stored (or given up after retries).
    Taken,
    /// The outbox stayed full for [`FULL_WAIT`]: dropped.
    Full,
    /// The outbox task is gone.
    Closed,
}

impl Outbox {
    /// Hands an event over, waiting up to [`FULL_WAIT`] for room.
    pub async fn send(&self, event: pb::Event, msg_id: String) -> Sent {
        let permit = match self.room.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(tokio::sync::TryAcquireError::Closed) => return Sent::Closed,
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                match tokio::time::timeout(FULL_WAIT, self.room.clone().acquire_owned()).await {
                    Ok(Ok(p)) => p,
                    Ok(Err(_)) => return Sent::Closed,
                    Err(_) => return Sent::Full,
                }
            }
        };
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let pending = Pending {
            event,
            msg_id,
            since: Instant::now(),
            _room: permit,
        };
        // Never waits: every pending event holds a permit, and the channel
        // has room for as many as there are permits.
        if self.tx.try_send(pending).is_err() {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Sent::Closed;
        }
        Sent::Taken
    }

    /// Events handed over and not yet stored or given up.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    fn done(&self, n: usize) {
        self.waiting.fetch_sub(n, Ordering::SeqCst);
    }
}

/// A new outbox holding at most `capacity` events, and the receiving end
/// its task reads.
pub fn channel(capacity: usize) -> (Outbox, mpsc::Receiver<Pending>) {
    let capacity = capacity.clamp(1, Semaphore::MAX_PERMITS);
    let (tx, rx) = mpsc::channel(capacity);
    (
        Outbox {
            tx,
            room: Arc::new(Semaphore::new(capacity)),
            waiting: AtomicUsize::new(0),
        },
        rx,
    )
}

/// Publishes what the outbox receives until every sender is gone and
/// nothing is left to retry.
pub async fn run(broker: Broker, mut rx: mpsc::Receiver<Pending>) {
    let mut retry: VecDeque<Pending> = VecDeque::new();
    let mut backoff = Duration::from_millis(50);
    loop {
        let mut batch: Vec<Pending> = Vec::new();
        if retry.is_empty() {
            match rx.recv().await {
                Some(p) => batch.push(p),
                None => return,
            }
        } else {
            tokio::time::sleep(backoff).await;
            let take = retry.len().min(BATCH);
            batch.extend(retry.drain(..take));
        }
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let events: Vec<(pb::Event, String)> = batch
            .iter()
            .map(|p| (p.event.clone(), p.msg_id.clone()))
            .collect();
        let results = broker.store().publish_events(&events).await;
        let mut stored = 0;
        let mut failed = false;
        for (pending, result) in batch.into_iter().zip(results) {
            match result {
                Ok(_) => stored += 1,
                Err(e) if pending.since.elapsed() >= GIVE_UP => {
                    broker.metrics().event_dropped();
                    tracing::error!(msg_id = %pending.msg_id, error = %e, "event given up after {GIVE_UP:?} of retries");
                    stored += 1;
                }
                Err(e) => {
                    tracing::debug!(msg_id = %pending.msg_id, error = %e, "event not stored yet; retrying");
                    failed = true;
                    retry.push_back(pending);
                }
            }
        }
        if let Some(outbox) = broker.outbox() {
            outbox.done(stored);
        }
        backoff = if failed {
            (backoff * 2).min(Duration::from_secs(2))
        } else {
            Duration::from_millis(50)
        };
    }
}
