//! `Subscribe`: one instance of an agent receives deliveries and settles
//! them over a bidirectional stream.
//!
//! A session pulls from the agent's durable consumer, never holding more
//! than `max_in_flight` unsettled deliveries (so other instances get the
//! rest), attaches the run's pinned context, and turns each ack, nack,
//! reject and extend into a JetStream acknowledgement. When attempts run
//! out the session routes the handoff to the agent's fallback or the dead
//! letter instead of delivering it. If the instance goes away, its
//! unsettled deliveries are returned at once; if the broker drains, they are
//! left to their leases.

use std::{collections::HashMap, sync::Arc, time::Duration};

use async_nats::jetstream::{self, AckKind};
use futures::StreamExt;
use handoff_proto::pb;
use prost::Message as _;
use tokio::sync::{mpsc, Mutex, OwnedSemaphorePermit, Semaphore};
use tonic::{Status, Streaming};
use tracing::Instrument;

use crate::{
    broker::{now, Broker, RunEnd},
    domain::{self, Offer},
    error::BrokerError,
    names,
    rpc::agents::lease_of,
    store,
};

/// What the session remembers of an unsettled delivery.
struct InFlight {
    ack_subject: String,
    handoff_id: String,
    run_id: String,
    owner: String,
    attempt: u32,
    /// The barrier branch the delivery belongs to (barrier, key, depth).
    branch: Option<(String, String, u32)>,
    /// When JetStream will offer it again unless extended: past this the
    /// slot is freed, whatever became of the delivery.
    expires: tokio::time::Instant,
    _permit: OwnedSemaphorePermit,
}

type Sender = mpsc::Sender<Result<pb::SubscribeResponse, Status>>;

struct Session {
    broker: Broker,
    agent: pb::AgentSpec,
    instance: String,
    in_flight: Mutex<HashMap<String, InFlight>>,
    tx: Sender,
    released: mpsc::UnboundedSender<String>,
}

/// Validates the opening message and returns the session's agent spec
/// and capacity.
pub async fn open(
    broker: &Broker,
    first: Option<pb::SubscribeRequest>,
) -> Result<(pb::AgentSpec, String, usize), BrokerError> {
    let open = match first.and_then(|r| r.command) {
        Some(pb::subscribe_request::Command::Open(o)) => o,
        _ => {
            return Err(BrokerError::Malformed(
                "the first Subscribe message must be `open` (agent, instance, max_in_flight)"
                    .to_string(),
            ))
        }
    };
    names::validate("agent", &open.agent)?;
    names::validate("instance", &open.instance)?;
    let cap = broker.config().max_in_flight;
    if open.max_in_flight > cap {
        return Err(BrokerError::Malformed(format!(
            "max_in_flight {} is over the broker's cap {cap}",
            open.max_in_flight
        )));
    }
    let spec = broker.agent_fresh(&open.agent).await?;
    Ok((spec, open.instance, open.max_in_flight.max(1) as usize))
}

/// Runs a session until the client leaves or the broker drains.
pub async fn run(
    broker: Broker,
    agent: pb::AgentSpec,
    instance: String,
    max_in_flight: usize,
    mut inbound: Streaming<pb::SubscribeRequest>,
    tx: Sender,
) {
    let span = tracing::info_span!("subscribe", agent = %agent.name, instance = %instance);
    async move {
        let (released, mut released_rx) = mpsc::unbounded_channel();
        let session = Arc::new(Session {
            broker: broker.clone(),
            agent,
            instance,
            in_flight: Mutex::new(HashMap::new()),
            tx,
            released,
        });
        let opened = pb::SubscribeResponse {
            message: Some(pb::subscribe_response::Message::Subscribed(
                pb::Subscribed {
                    agent: Some(session.agent.clone()),
                },
            )),
        };
        if session.tx.send(Ok(opened)).await.is_err() {
            return;
        }
        tracing::info!(max_in_flight, "instance subscribed");
        let permits = Arc::new(Semaphore::new(max_in_flight));
        let fetcher = tokio::spawn(fetch_loop(session.clone(), permits).in_current_span());
        let mut sweep = tokio::time::interval(Duration::from_millis(250));
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let drained = loop {
            tokio::select! {
                msg = inbound.message() => match msg {
                    Ok(Some(req)) => session.settle(req).await,
                    Ok(None) => break false,
                    Err(status) => {
                        tracing::debug!(%status, "subscriber stream ended");
                        break false;
                    }
                },
                Some(id) = released_rx.recv() => {
                    // Completed by a handoff that consumed it: free the slot.
                    session.in_flight.lock().await.remove(&id);
                }
                _ = sweep.tick() => session.sweep_expired().await,
                _ = broker.drained() => break true,
            }
        };
        fetcher.abort();
        for id in session.in_flight.lock().await.keys() {
            broker.untrack_delivery(id);
        }
        if drained {
            let _ = session
                .tx
                .send(Err(Status::unavailable(
                    "broker is draining; reconnect to another replica",
                )))
                .await;
            tracing::info!("session closed for drain; unsettled deliveries stay leased");
        } else {
            session.return_all().await;
            tracing::info!("instance left");
        }
    }
    .instrument(span)
    .await
}

async fn fetch_loop(session: Arc<Session>, permits: Arc<Semaphore>) {
    let mut backoff = Duration::from_millis(100);
    let mut consumer = None;
    loop {
        if consumer.is_none() {
            match session
                .broker
                .store()
                .agent_consumer(&session.agent.name)
                .await
            {
                Ok(c) => consumer = Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot open the agent's consumer; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            }
        }
        let Some(c) = consumer.as_ref() else { continue };
        match session.fetch_once(c, &permits).await {
            Ok(true) => backoff = Duration::from_millis(100),
            Ok(false) => return,
            Err(e) => {
                consumer = None;
                tracing::warn!(error = %e, "fetch failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

impl Session {
    /// Pulls as many messages as there is room for, and handles them.
    /// `Ok(false)` when the client is gone.
    async fn fetch_once(
        &self,
        consumer: &async_nats::jetstream::consumer::PullConsumer,
        permits: &Arc<Semaphore>,
    ) -> Result<bool, BrokerError> {
        let Ok(first) = permits.clone().acquire_owned().await else {
            return Ok(false);
        };
        let mut held = vec![first];
        while let Ok(p) = permits.clone().try_acquire_owned() {
            held.push(p);
        }
        let mut batch = consumer
            .batch()
            .max_messages(held.len())
            .expires(Duration::from_secs(5))
            .messages()
            .await
            .map_err(|e| BrokerError::nats("pulling deliveries", e))?;
        while let Some(msg) = batch.next().await {
            let msg = msg.map_err(|e| BrokerError::nats("pulling deliveries", e))?;
            let Some(permit) = held.pop() else {
                // More than asked for: leave it to its lease.
                continue;
            };
            if !self.offer(msg, permit).await {
                return Ok(false);
            }
            if held.is_empty() {
                break;
            }
        }
        Ok(!self.tx.is_closed())
    }

    /// Handles one message JetStream offers. `false` when the client is gone.
    async fn offer(&self, msg: jetstream::Message, permit: OwnedSemaphorePermit) -> bool {
        let (seq, delivered) = match msg.info() {
            Ok(i) => (i.stream_sequence, i.delivered),
            Err(e) => {
                tracing::warn!(error = %e, "message without JetStream metadata ignored");
                return true;
            }
        };
        let Some(ack_subject) = msg.reply.as_ref().map(|s| s.to_string()) else {
            return true;
        };
        let envelope = match pb::HandoffEnvelope::decode(msg.payload.clone()) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(seq, error = %e, "inbox message is not a handoff; terminated");
                let _ = self
                    .broker
                    .store()
                    .settle(&ack_subject, AckKind::Term)
                    .await;
                return true;
            }
        };
        let span = tracing::info_span!("delivery", run_id = %envelope.run_id, handoff_id = %envelope.id, attempt = delivered);
        async {
            // Re-read the spec so a re-registered lease or attempt count applies.
            let spec = self.broker.agent(&self.agent.name).await.unwrap_or_else(|_| self.agent.clone());
            let attempt = match domain::offer(delivered, spec.max_attempts) {
                Offer::Deliver(n) => n,
                Offer::Exhausted => {
                    if let Err(e) = exhaust(&self.broker, &spec, &envelope, &ack_subject, delivered).await {
                        tracing::warn!(error = %e, "routing an exhausted handoff failed; it will be offered again");
                    }
                    return true;
                }
            };
            let run = match self.broker.run(&envelope.run_id).await {
                Ok((run, _)) => run,
                Err(BrokerError::RunNotFound(_)) => {
                    let _ = self.broker.store().settle(&ack_subject, AckKind::Term).await;
                    return true;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "run lookup failed; delivery left to its lease");
                    return true;
                }
            };
            if pb::RunStatus::try_from(run.status).is_ok_and(|s| s.is_terminal()) {
                if self.broker.store().settle(&ack_subject, AckKind::Term).await.is_ok() {
                    self.broker.emit_unconfirmed(
                        pb::Event {
                            kind: pb::EventKind::Discarded as i32,
                            run_id: run.id.clone(),
                            owner: run.owner.clone(),
                            agent: spec.name.clone(),
                            handoff_id: envelope.id.clone(),
                            reason: format!("run is {}", crate::broker::status_name(run.status)),
                            ..Default::default()
                        },
                        format!("discarded-{}", envelope.id),
                    ).await;
                }
                return true;
            }
            let lease = lease_of(&spec, self.broker.config().default_lease);
            let token = domain::encode_token(&pb::DeliveryToken {
                agent: spec.name.clone(),
                stream_sequence: seq,
                ack_subject: ack_subject.clone(),
                handoff_id: envelope.id.clone(),
            });
            let delivery = pb::Delivery {
                delivery_id: token.clone(),
                attempt,
                max_attempts: spec.max_attempts,
                lease_deadline: Some(prost_types::Timestamp::from(std::time::SystemTime::now() + lease)),
                pinned: run.pinned.clone(),
                sequence: seq,
                handoff: Some(envelope.clone()),
            };
            self.broker.track_delivery(&token, self.released.clone());
            let mut in_flight = self.in_flight.lock().await;
            // A redelivery to this session supersedes its expired lease.
            in_flight.retain(|_, f| f.handoff_id != envelope.id);
            in_flight.insert(
                token.clone(),
                InFlight {
                    ack_subject: ack_subject.clone(),
                    handoff_id: envelope.id.clone(),
                    run_id: run.id.clone(),
                    owner: run.owner.clone(),
                    attempt,
                    branch: branch_of(&envelope),
                    expires: tokio::time::Instant::now() + lease,
                    _permit: permit,
                },
            );
            drop(in_flight);
            let response = pb::SubscribeResponse {
                message: Some(pb::subscribe_response::Message::Delivery(delivery)),
            };
            if self.tx.send(Ok(response)).await.is_err() {
                return false;
            }
            let kind = if attempt > 1 { pb::EventKind::Redelivered } else { pb::EventKind::Delivered };
            self.broker.emit_unconfirmed(
                pb::Event {
                    kind: kind as i32,
                    run_id: run.id.clone(),
                    owner: run.owner.clone(),
                    agent: spec.name.clone(),
                    instance: self.instance.clone(),
                    handoff_id: envelope.id.clone(),
                    source_agent: envelope.source_agent.clone(),
                    attempt,
                    depth: envelope.depth,
                    ..Default::default()
                },
                format!("{}-{}-{attempt}", kind.token(), envelope.id),
            ).await;
            true
        }
        .instrument(span)
        .await
    }

    /// Applies one settle command and answers it.
    async fn settle(&self, req: pb::SubscribeRequest) {
        use pb::subscribe_request::Command;
        let request_id = req.request_id;
        let (delivery_id, result) = match req.command {
            Some(Command::Ack(a)) => {
                let r = self.apply(&a.delivery_id, Settle::Ack).await;
                (a.delivery_id, r)
            }
            Some(Command::Nack(n)) => {
                let delay = n.delay.and_then(|d| Duration::try_from(d).ok());
                let r = self.apply(&n.delivery_id, Settle::Nack(delay)).await;
                (n.delivery_id, r)
            }
            Some(Command::Reject(r)) => {
                let res = self
                    .apply(&r.delivery_id, Settle::Reject(r.reason.clone()))
                    .await;
                (r.delivery_id, res)
            }
            Some(Command::Extend(e)) => {
                let r = self.apply(&e.delivery_id, Settle::Extend).await;
                (e.delivery_id, r)
            }
            Some(Command::Open(_)) => (
                String::new(),
                Err(BrokerError::Malformed(
                    "the stream is already open".to_string(),
                )),
            ),
            None => (
                String::new(),
                Err(BrokerError::Malformed("empty command".to_string())),
            ),
        };
        let (code, message, lease_deadline) = match result {
            Ok(deadline) => (0, String::new(), deadline),
            Err(e) => (e.code() as i32, e.to_string(), None),
        };
        let settled = pb::SubscribeResponse {
            message: Some(pb::subscribe_response::Message::Settled(pb::Settled {
                request_id,
                delivery_id,
                code,
                message,
                lease_deadline,
            })),
        };
        let _ = self.tx.send(Ok(settled)).await;
    }

    async fn apply(
        &self,
        delivery_id: &str,
        op: Settle,
    ) -> Result<Option<prost_types::Timestamp>, BrokerError> {
        let token = domain::decode_token(delivery_id)?;
        if token.agent != self.agent.name {
            return Err(BrokerError::Malformed(format!(
                "the delivery belongs to agent {:?}, not {:?}",
                token.agent, self.agent.name
            )));
        }
        let known = {
            let map = self.in_flight.lock().await;
            map.get(delivery_id).map(|f| {
                (
                    f.run_id.clone(),
                    f.owner.clone(),
                    f.attempt,
                    f.branch.clone(),
                )
            })
        };
        let (run_id, owner, attempt, branch) = match known {
            Some(k) => k,
            None => {
                // Settled through another session (after a reconnect): the
                // stored handoff says which run it belongs to.
                let msg = self
                    .broker
                    .store()
                    .inbox_message(token.stream_sequence)
                    .await?
                    .ok_or_else(|| {
                        BrokerError::DeliveryGone(
                            "the delivery's handoff is no longer stored".to_string(),
                        )
                    })?;
                let env = pb::HandoffEnvelope::decode(msg.payload).map_err(|e| {
                    BrokerError::Internal(format!("stored handoff does not decode: {e}"))
                })?;
                let (run, _) = self.broker.run(&env.run_id).await?;
                (run.id, run.owner, 0, branch_of(&env))
            }
        };
        let event = |kind: pb::EventKind, reason: String| pb::Event {
            kind: kind as i32,
            run_id: run_id.clone(),
            owner: owner.clone(),
            agent: self.agent.name.clone(),
            instance: self.instance.clone(),
            handoff_id: token.handoff_id.clone(),
            attempt,
            reason,
            ..Default::default()
        };
        let kind = match &op {
            Settle::Ack => AckKind::Ack,
            Settle::Nack(d) => AckKind::Nak(*d),
            Settle::Reject(_) => AckKind::Term,
            Settle::Extend => AckKind::Progress,
        };
        if let Settle::Reject(reason) = &op {
            // Fail the run before terminating the delivery: a crash in
            // between redelivers it (and the ended run discards it), where
            // the other order could leave a terminated delivery and a run
            // that never ends.
            let reason = if reason.is_empty() {
                "rejected"
            } else {
                reason.as_str()
            };
            let rejected = event(pb::EventKind::Rejected, reason.to_string());
            self.broker
                .emit(rejected, &format!("rejected-{}", token.handoff_id))
                .await?;
            let why = format!(
                "agent {} rejected handoff {}: {reason}",
                self.agent.name, token.handoff_id
            );
            match &branch {
                // A rejected branch fails that branch; its barrier decides.
                Some((barrier_id, key, depth)) => {
                    fail_branch(
                        &self.broker,
                        &run_id,
                        barrier_id,
                        key,
                        *depth,
                        &token.handoff_id,
                        &self.agent.name,
                        why,
                    )
                    .await?;
                }
                None => {
                    self.broker.end_run(&run_id, RunEnd::Failed(why)).await?;
                }
            }
        }
        self.broker.store().settle(&token.ack_subject, kind).await?;
        if !matches!(op, Settle::Extend) {
            self.broker.untrack_delivery(delivery_id);
        }
        match op {
            Settle::Extend => {
                let spec = self
                    .broker
                    .agent(&self.agent.name)
                    .await
                    .unwrap_or_else(|_| self.agent.clone());
                let lease = lease_of(&spec, self.broker.config().default_lease);
                if let Some(f) = self.in_flight.lock().await.get_mut(delivery_id) {
                    f.expires = tokio::time::Instant::now() + lease;
                }
                return Ok(Some(prost_types::Timestamp::from(
                    std::time::SystemTime::now() + lease,
                )));
            }
            Settle::Ack => {
                self.in_flight.lock().await.remove(delivery_id);
                self.broker
                    .emit_unconfirmed(
                        event(pb::EventKind::Acked, String::new()),
                        format!("acked-{}", token.handoff_id),
                    )
                    .await;
            }
            Settle::Nack(delay) => {
                self.in_flight.lock().await.remove(delivery_id);
                let reason = delay.map(|d| format!("retry in {d:?}")).unwrap_or_default();
                self.broker
                    .emit_unconfirmed(
                        event(pb::EventKind::Nacked, reason),
                        format!(
                            "nacked-{}-{attempt}-{}",
                            token.handoff_id,
                            uuid::Uuid::now_v7()
                        ),
                    )
                    .await;
            }
            Settle::Reject(_) => {
                self.in_flight.lock().await.remove(delivery_id);
            }
        }
        Ok(None)
    }

    /// Frees the slots of deliveries whose lease has passed: JetStream
    /// offers them again (maybe to this very session), and a delivery
    /// completed through another replica never comes back to be settled.
    async fn sweep_expired(&self) {
        let now = tokio::time::Instant::now();
        let grace = Duration::from_millis(100);
        let mut in_flight = self.in_flight.lock().await;
        let expired: Vec<String> = in_flight
            .iter()
            .filter(|(_, f)| f.expires + grace < now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            in_flight.remove(&id);
            self.broker.untrack_delivery(&id);
        }
    }

    /// Returns every unsettled delivery for immediate redelivery.
    async fn return_all(&self) {
        let drained: Vec<InFlight> = self
            .in_flight
            .lock()
            .await
            .drain()
            .map(|(_, f)| f)
            .collect();
        for f in drained {
            if let Err(e) = self
                .broker
                .store()
                .settle(&f.ack_subject, AckKind::Nak(None))
                .await
            {
                tracing::warn!(handoff_id = %f.handoff_id, error = %e, "could not return a delivery; it waits for its lease");
            }
        }
    }
}

enum Settle {
    Ack,
    Nack(Option<Duration>),
    Reject(String),
    Extend,
}

/// Routes a handoff whose attempts are used up: to the agent's fallback if
/// it has a registered one, else to the dead letter (and the run fails).
/// Every step is idempotent, so a crash here is repaired when JetStream
/// offers the message again.
async fn exhaust(
    broker: &Broker,
    spec: &pb::AgentSpec,
    envelope: &pb::HandoffEnvelope,
    ack_subject: &str,
    delivered: i64,
) -> Result<(), BrokerError> {
    let attempts = u32::try_from(delivered - 1).unwrap_or(u32::MAX);
    let owner = broker
        .run(&envelope.run_id)
        .await
        .map(|(r, _)| r.owner)
        .unwrap_or_default();
    let reason = format!(
        "not settled by agent {} after {attempts} attempts",
        spec.name
    );
    let fallback = if spec.fallback_agent.is_empty() {
        None
    } else {
        match broker.agent(&spec.fallback_agent).await {
            Ok(fb) => Some(fb),
            Err(BrokerError::AgentNotFound(_)) => None,
            // Unknown is not absent: retry when the message is offered again.
            Err(e) => return Err(e),
        }
    };
    match fallback {
        Some(fb) => {
            let mut copy = envelope.clone();
            copy.id = domain::fallback_id(&envelope.id, &fb.name);
            copy.target_agent = fb.name.clone();
            copy.fallback_from = spec.name.clone();
            copy.parent_ids = vec![envelope.id.clone()];
            broker
                .store()
                .publish(
                    store::inbox_subject(&fb.name),
                    &copy.id,
                    copy.encode_to_vec().into(),
                )
                .await?;
            broker
                .emit(
                    pb::Event {
                        kind: pb::EventKind::RoutedToFallback as i32,
                        run_id: envelope.run_id.clone(),
                        owner,
                        agent: spec.name.clone(),
                        handoff_id: envelope.id.clone(),
                        fallback_agent: fb.name.clone(),
                        attempt: attempts,
                        depth: envelope.depth,
                        reason,
                        ..Default::default()
                    },
                    &format!("fallback-{}", envelope.id),
                )
                .await?;
            tracing::warn!(fallback = %fb.name, attempts, "handoff routed to fallback agent");
        }
        None => {
            let letter = pb::DeadLetter {
                handoff: Some(envelope.clone()),
                agent: spec.name.clone(),
                attempts,
                reason: reason.clone(),
                at: Some(now()),
                sequence: 0,
            };
            broker
                .store()
                .publish(
                    store::dead_subject(&spec.name),
                    &format!("dead-{}", envelope.id),
                    letter.encode_to_vec().into(),
                )
                .await?;
            broker
                .emit(
                    pb::Event {
                        kind: pb::EventKind::DeadLettered as i32,
                        run_id: envelope.run_id.clone(),
                        owner,
                        agent: spec.name.clone(),
                        handoff_id: envelope.id.clone(),
                        attempt: attempts,
                        depth: envelope.depth,
                        reason: reason.clone(),
                        ..Default::default()
                    },
                    &format!("dead-{}", envelope.id),
                )
                .await?;
            let why = format!("handoff {} dead-lettered: {reason}", envelope.id);
            let ended = match branch_of(envelope) {
                Some((barrier_id, key, depth)) => {
                    fail_branch(
                        broker,
                        &envelope.run_id,
                        &barrier_id,
                        &key,
                        depth,
                        &envelope.id,
                        &spec.name,
                        why,
                    )
                    .await
                }
                None => broker
                    .end_run(&envelope.run_id, RunEnd::Failed(why))
                    .await
                    .map(|_| ()),
            };
            match ended {
                Ok(()) | Err(BrokerError::RunNotFound(_)) => {}
                Err(e) => return Err(e),
            }
            tracing::warn!(attempts, "handoff dead-lettered");
        }
    }
    broker.store().settle(ack_subject, AckKind::Ack).await
}

/// The barrier branch a handoff belongs to: (barrier, key, depth).
fn branch_of(envelope: &pb::HandoffEnvelope) -> Option<(String, String, u32)> {
    (!envelope.barrier_id.is_empty() && !envelope.branch_key.is_empty()).then(|| {
        (
            envelope.barrier_id.clone(),
            envelope.branch_key.clone(),
            envelope.depth,
        )
    })
}

/// Records a branch whose delivery was rejected or dead-lettered as failed
/// at its barrier (once: its id is derived from the failed handoff).
#[allow(clippy::too_many_arguments)]
async fn fail_branch(
    broker: &Broker,
    run_id: &str,
    barrier_id: &str,
    key: &str,
    depth: u32,
    handoff_id: &str,
    agent: &str,
    why: String,
) -> Result<(), BrokerError> {
    let (run, _) = broker.run(run_id).await?;
    let result = pb::BranchResult {
        key: key.to_string(),
        status: pb::BranchStatus::Failed as i32,
        handoff_id: domain::derived_id(&format!("failed\u{0}{handoff_id}")),
        source_agent: agent.to_string(),
        warnings: vec![why],
        depth,
        arrived_at: Some(now()),
        ..Default::default()
    };
    let stored = std::sync::atomic::AtomicBool::new(false);
    crate::rpc::barriers::arrive(broker, &run, barrier_id, result, None, &stored)
        .await
        .map(|_| ())
}
