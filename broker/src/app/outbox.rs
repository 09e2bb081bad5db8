//! Events that observe a step already made durable (delivered, acked,
//! nacked, discarded, branch arrivals, refusals, ...) are stored with
//! confirmation without the caller waiting for it: they go to an outbox
//! that publishes them in batches (pipelined: a batch is sent, then its
//! confirmations awaited together), retries each one that was not
//! confirmed, and gives one up only after [`GIVE_UP`], counting it in
//! `handoff_events_dropped_total` with a log line. Every event carries a
//! deterministic message id, so a retry never stores it twice.

use std::{
    collections::VecDeque,
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use handoff_proto::pb;
use tokio::sync::mpsc;

use crate::app::Broker;

/// Most events published in one batch.
const BATCH: usize = 256;
/// How long an event is retried before it is given up.
pub const GIVE_UP: Duration = Duration::from_secs(120);

/// An event waiting to be stored.
#[derive(Debug)]
pub struct Pending {
    event: pb::Event,
    msg_id: String,
    since: Instant,
}

/// The sending side, kept by the broker.
#[derive(Debug)]
pub struct Outbox {
    tx: mpsc::UnboundedSender<Pending>,
    /// Events handed over and not yet stored or given up.
    waiting: AtomicUsize,
}

impl Outbox {
    /// Hands an event over; `false` when the outbox task is gone.
    pub fn send(&self, event: pb::Event, msg_id: String) -> bool {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let sent = self
            .tx
            .send(Pending {
                event,
                msg_id,
                since: Instant::now(),
            })
            .is_ok();
        if !sent {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
        }
        sent
    }

    /// Events handed over and not yet stored or given up.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    fn done(&self, n: usize) {
        self.waiting.fetch_sub(n, Ordering::SeqCst);
    }
}

/// A new outbox and the receiving end its task reads.
pub fn channel() -> (Outbox, mpsc::UnboundedReceiver<Pending>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (
        Outbox {
            tx,
            waiting: AtomicUsize::new(0),
        },
        rx,
    )
}

/// Publishes what the outbox receives until every sender is gone and
/// nothing is left to retry.
pub async fn run(broker: Broker, mut rx: mpsc::UnboundedReceiver<Pending>) {
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
