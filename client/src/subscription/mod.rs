//! Receiving deliveries: [`Subscription`] and [`Delivery`].
//!
//! A subscription is one bidirectional stream to the broker. Deliveries
//! come down; acks, nacks, rejects and extends go up, each answered by the
//! broker so `ack().await` returns only once JetStream confirmed it.
//! The subscription remembers the handoffs this instance already finished:
//! if one is delivered again (its ack was lost in a crash), it is acked
//! again silently instead of being handed to the application twice.
//!
//! [`TypedSubscription`] decodes every payload as the agent's contract and
//! hands out [`TypedDelivery`]; a payload that does not decode is rejected.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    marker::PhantomData,
    ops::Deref,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use futures::Stream;
use tokio::sync::{mpsc, oneshot, watch};

use crate::{
    barrier::{FanOut, Join},
    error::{Error, ErrorKind, Result},
    handoff::{decode, field, type_name, Handoff, Receipt, TRACEPARENT, TRACESTATE},
    otel::SdkSpan,
    pb, Client,
};

/// How many finished handoff ids a subscription remembers.
const REMEMBERED: usize = 65_536;
/// Time allowed for the broker to confirm a settlement.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(15);

type Pending = Mutex<HashMap<u64, oneshot::Sender<pb::Settled>>>;

pub(crate) struct Shared {
    agent: String,
    commands: mpsc::Sender<pb::SubscribeRequest>,
    pending: Pending,
    next_id: AtomicU64,
    finished: Mutex<Finished>,
    client: Client,
    /// The runtime the subscription was opened on, for settlements that
    /// cannot be awaited where they are decided (in `poll_next`).
    runtime: tokio::runtime::Handle,
    /// Who to tell when a delivery's run is cancelled, by delivery id.
    cancels: Mutex<HashMap<String, watch::Sender<Option<String>>>>,
    /// Refuse deliveries whose intent digest does not match.
    verify_intent: bool,
}

impl Shared {
    /// Where delivery `id` learns that its run was cancelled. Made by the
    /// reader before it reads on, so a cancel that follows the delivery
    /// on the stream always finds it.
    fn watch_cancel(&self, id: &str) -> watch::Receiver<Option<String>> {
        let (tx, rx) = watch::channel(None);
        let mut cancels = lock(&self.cancels);
        // Deliveries no longer held by anyone are not told anything.
        cancels.retain(|_, tx| !tx.is_closed());
        cancels.insert(id.to_string(), tx);
        rx
    }

    /// Tells delivery `id` (if still held) that its run was cancelled.
    fn cancel(&self, id: &str, reason: String) {
        if let Some(tx) = lock(&self.cancels).remove(id) {
            tx.send_replace(Some(reason));
        }
    }
}

#[derive(Default)]
struct Finished {
    set: HashSet<String>,
    order: VecDeque<String>,
}

impl Finished {
    fn insert(&mut self, id: &str) {
        if self.set.insert(id.to_string()) {
            self.order.push_back(id.to_string());
            if self.order.len() > REMEMBERED {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }
}

impl Shared {
    async fn send(&self, command: pb::subscribe_request::Command) -> Result<pb::Settled> {
        let request_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(request_id, tx);
        let req = pb::SubscribeRequest {
            request_id,
            command: Some(command),
        };
        if self.commands.send(req).await.is_err() {
            lock(&self.pending).remove(&request_id);
            return Err(Error::new(ErrorKind::Closed, "the subscription is closed"));
        }
        let settled = match tokio::time::timeout(SETTLE_TIMEOUT, rx).await {
            Ok(Ok(s)) => s,
            Ok(Err(_)) => {
                return Err(Error::new(
                    ErrorKind::Closed,
                    "the subscription closed before the broker answered",
                ))
            }
            Err(_) => {
                lock(&self.pending).remove(&request_id);
                return Err(Error::new(
                    ErrorKind::Timeout,
                    "the broker did not confirm in time",
                ));
            }
        };
        if settled.code != 0 {
            let (code, message, reason) = (settled.code, settled.message, settled.reason);
            return Err(Error::from_settled(code, message, reason));
        }
        Ok(settled)
    }

    fn mark_finished(&self, handoff_id: &str) {
        lock(&self.finished).insert(handoff_id);
    }

    fn is_finished(&self, handoff_id: &str) -> bool {
        lock(&self.finished).set.contains(handoff_id)
    }
}

/// How a subscription is opened: [`SubscribeOptions::new`] and the
/// options that change it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscribeOptions {
    max_in_flight: u32,
    verify_intent: bool,
}

impl SubscribeOptions {
    /// At most `max_in_flight` unsettled deliveries; each delivery's
    /// intent digest checked.
    pub fn new(max_in_flight: u32) -> SubscribeOptions {
        SubscribeOptions {
            max_in_flight,
            verify_intent: true,
        }
    }

    /// Hand on deliveries whose intent digest does not match their pinned
    /// context (with a warning) instead of rejecting them.
    pub fn trust_intent(mut self) -> SubscribeOptions {
        self.verify_intent = false;
        self
    }
}

/// The reason a delivery whose intent digest does not match is rejected
/// with.
pub const INTENT_MISMATCH: &str = "INTENT_MISMATCH";

/// Rejects (in the background) a delivery whose intent digest does not
/// match its pinned context, unless the subscription trusts them; whether
/// it did.
fn refuse_broken_intent(shared: &Arc<Shared>, delivery: &Delivery) -> bool {
    if !shared.verify_intent || delivery.intent_intact() {
        return false;
    }
    let delivery = delivery.clone();
    tokio::spawn(async move {
        let reason = format!(
            "{INTENT_MISMATCH}: the delivery's pinned context does not match its intent digest"
        );
        if let Err(e) = delivery.reject(reason).await {
            tracing::warn!(handoff_id = %delivery.handoff_id(), error = %e, "a delivery with a broken intent digest could not be rejected");
        }
    });
    true
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A stream of [`Delivery`] for one agent instance. Dropping it ends the
/// subscription; the broker then returns its unsettled deliveries to the
/// agent's other instances at once.
pub struct Subscription {
    shared: Arc<Shared>,
    deliveries: mpsc::Receiver<Result<Delivery>>,
    agent_spec: pb::AgentSpec,
    /// Dropped with the subscription: ends the stream to the broker even
    /// while deliveries are still held.
    _close: oneshot::Sender<()>,
}

impl Subscription {
    pub(crate) async fn open(
        client: Client,
        agent: &str,
        instance: &str,
        options: SubscribeOptions,
    ) -> Result<Subscription> {
        let max_in_flight = options.max_in_flight;
        let (cmd_tx, cmd_rx) = mpsc::channel::<pb::SubscribeRequest>(256);
        let open = pb::SubscribeRequest {
            request_id: 0,
            command: Some(pb::subscribe_request::Command::Open(pb::SubscribeOpen {
                agent: agent.to_string(),
                instance: instance.to_string(),
                max_in_flight,
            })),
        };
        cmd_tx
            .send(open)
            .await
            .map_err(|_| Error::new(ErrorKind::Closed, "subscription closed"))?;
        let (close_tx, close_rx) = oneshot::channel::<()>();
        let outbound = futures::StreamExt::take_until(
            tokio_stream::wrappers::ReceiverStream::new(cmd_rx),
            close_rx,
        );
        let mut inbound = client.raw().subscribe(outbound).await?.into_inner();
        let agent_spec = match inbound.message().await? {
            Some(pb::SubscribeResponse {
                message: Some(pb::subscribe_response::Message::Subscribed(s)),
            }) => s.agent.unwrap_or_default(),
            _ => {
                return Err(Error::new(
                    ErrorKind::Other,
                    "the broker did not confirm the subscription",
                ))
            }
        };
        let shared = Arc::new(Shared {
            agent: agent.to_string(),
            commands: cmd_tx,
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            finished: Mutex::new(Finished::default()),
            client,
            runtime: tokio::runtime::Handle::current(),
            cancels: Mutex::new(HashMap::new()),
            verify_intent: options.verify_intent,
        });
        let (tx, rx) = mpsc::channel(max_in_flight.max(1) as usize + 8);
        let reader = shared.clone();
        tokio::spawn(async move {
            loop {
                let next = match inbound.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(status) => {
                        let _ = tx.send(Err(Error::from(status))).await;
                        break;
                    }
                };
                match next.message {
                    Some(pb::subscribe_response::Message::Delivery(d))
                        if crate::payload::has_references(&d) =>
                    {
                        // A payload by reference: fetched (and checked)
                        // apart, so this reader goes on carrying answers.
                        let (shared, tx) = (reader.clone(), tx.clone());
                        let cancel = reader.watch_cancel(&d.delivery_id);
                        tokio::spawn(async move {
                            let mut d = d;
                            let finished = d
                                .handoff
                                .as_ref()
                                .is_some_and(|h| shared.is_finished(&h.id));
                            if finished {
                                // As below: acked again, quietly, unread.
                                let _ = Delivery::new(d, shared.clone(), cancel).ack().await;
                                return;
                            }
                            let failed =
                                crate::payload::resolve(&shared.client, &mut d).await.err();
                            let mut delivery = Delivery::new(d, shared.clone(), cancel);
                            if refuse_broken_intent(&shared, &delivery) {
                                return;
                            }
                            if let Some(e) = failed {
                                tracing::warn!(handoff_id = %delivery.handoff_id(), error = %e, "a payload by reference could not be fetched");
                                delivery.unresolved = Some(Arc::new(e));
                            }
                            let _ = tx.send(Ok(delivery)).await;
                        });
                    }
                    Some(pb::subscribe_response::Message::Delivery(d)) => {
                        let cancel = reader.watch_cancel(&d.delivery_id);
                        let delivery = Delivery::new(d, reader.clone(), cancel);
                        if reader.is_finished(delivery.handoff_id()) {
                            // Finished here already: its ack was lost. Ack it
                            // again, quietly, without holding up this reader
                            // (which is what carries the broker's answers).
                            tokio::spawn(async move {
                                let _ = delivery.ack().await;
                            });
                            continue;
                        }
                        if refuse_broken_intent(&reader, &delivery) {
                            continue;
                        }
                        if tx.send(Ok(delivery)).await.is_err() {
                            break;
                        }
                    }
                    Some(pb::subscribe_response::Message::Cancelled(c)) => {
                        tracing::info!(run_id = %c.run_id, reason = %c.reason, "a delivery's run was cancelled");
                        reader.cancel(&c.delivery_id, c.reason);
                    }
                    Some(pb::subscribe_response::Message::Settled(s)) => {
                        if let Some(waiter) = lock(&reader.pending).remove(&s.request_id) {
                            let _ = waiter.send(s);
                        }
                    }
                    _ => {}
                }
            }
            lock(&reader.pending).clear();
        });
        Ok(Subscription {
            shared,
            deliveries: rx,
            agent_spec,
            _close: close_tx,
        })
    }

    /// The agent as the broker knows it (lease, attempts, fallback).
    pub fn agent(&self) -> &pb::AgentSpec {
        &self.agent_spec
    }

    /// The next delivery; `None` once the subscription has ended.
    pub async fn next_delivery(&mut self) -> Option<Result<Delivery>> {
        self.deliveries.recv().await
    }

    /// The next delivery with its payload decoded as `M`. A payload that
    /// does not decode is an error of kind [`ErrorKind::Decode`] and its
    /// delivery is left unsettled (it is redelivered when the lease ends);
    /// [`Subscription::typed`] rejects such deliveries instead.
    pub async fn next_typed<M: prost::Message + prost::Name + Default>(
        &mut self,
    ) -> Option<Result<(Delivery, M)>> {
        let d = match self.deliveries.recv().await? {
            Ok(d) => d,
            Err(e) => return Some(Err(e)),
        };
        Some(d.payload::<M>().map(|m| (d, m)))
    }

    /// This subscription with every payload decoded as `T`; see
    /// [`TypedSubscription`].
    pub fn typed<T: prost::Message + prost::Name + Default>(self) -> TypedSubscription<T> {
        TypedSubscription {
            inner: self,
            _payload: PhantomData,
        }
    }

    /// Acks a delivery by id, for one received in another session.
    ///
    /// This is how to finish an ack whose answer was lost: when
    /// [`Delivery::ack`] fails because the broker went away, the ack may or
    /// may not have been applied. Repeat it here, on a new subscription;
    /// acking an already acked delivery again is confirmed and changes
    /// nothing.
    pub async fn ack_id(&self, delivery_id: &str) -> Result<()> {
        self.shared
            .send(pb::subscribe_request::Command::Ack(pb::Ack {
                delivery_id: delivery_id.to_string(),
            }))
            .await
            .map(|_| ())
    }
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("agent", &self.shared.agent)
            .finish()
    }
}

impl Stream for Subscription {
    type Item = Result<Delivery>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.deliveries.poll_recv(cx)
    }
}

mod delivery;
mod typed;

pub use delivery::{retry_delay, Delivery};
pub use typed::{TypedDelivery, TypedSubscription};
