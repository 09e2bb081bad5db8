//! A live subscribe session: one instance of an agent receives deliveries
//! and settles them.
//!
//! A session pulls from the agent's inbox, never holding more than
//! `max_in_flight` unsettled deliveries (so other instances get the rest),
//! hands each offer to [`deliveries::offer`], and applies each settle
//! command with [`deliveries::settle`]. If the instance goes away, its
//! unsettled deliveries are returned at once; if the broker drains, they
//! are left to their leases. If its credentials stop allowing it to
//! receive as its agent (a revoked token, a grant taken away: see
//! [`auth::Live`]), its settlements and deliveries are refused at once,
//! the session ends with the refusal and its unsettled deliveries are
//! returned. The session knows no transport: commands come in as a
//! stream, answers go out on a channel.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::Duration,
};

use futures::{
    future::BoxFuture,
    stream::{BoxStream, FuturesOrdered, FuturesUnordered},
    FutureExt, StreamExt,
};
use handoff_proto::pb;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;

use crate::{
    app::{
        auth::{self, Caller},
        deliveries::{self, Held, Offering, Op},
        instances, now, Broker, Notice,
    },
    error::BrokerError,
    rules::{grants::Action, names},
};

/// How long one pull waits for handoffs before it asks again.
const PULL_EXPIRES: Duration = Duration::from_secs(5);

/// How often [`report_pending`] reads the backlog of the agents with a
/// live session on this replica.
pub const PENDING_POLL: Duration = Duration::from_secs(5);

/// What a session tells its instance.
#[derive(Debug)]
pub enum Out {
    /// The session is open, for this agent as registered.
    Subscribed(pb::AgentSpec),
    /// A delivery.
    Delivery(Box<pb::Delivery>),
    /// A delivery's run was cancelled.
    Cancelled(pb::Cancelled),
    /// The answer to a settle command: the new lease deadline of an
    /// extend, or why it was refused.
    Settled {
        /// The command's request id.
        request_id: u64,
        /// The delivery it named.
        delivery_id: String,
        /// Its outcome.
        result: Result<Option<prost_types::Timestamp>, BrokerError>,
    },
}

/// A session's answers, or why it ended.
pub type Outbox = mpsc::Sender<Result<Out, BrokerError>>;

/// What the opening message asked for.
#[derive(Debug, Clone)]
pub struct Opened {
    /// The agent, as registered.
    pub agent: pb::AgentSpec,
    /// The instance's name.
    pub instance: String,
    /// How many unsettled deliveries it takes at once.
    pub max_in_flight: usize,
}

/// Validates the opening message of a session.
pub async fn open(
    broker: &Broker,
    caller: &Caller,
    first: Option<pb::SubscribeRequest>,
) -> Result<Opened, BrokerError> {
    let open = match first.and_then(|r| r.command) {
        Some(pb::subscribe_request::Command::Open(o)) => o,
        _ => {
            return Err(BrokerError::malformed(
                "open",
                "the first Subscribe message must be `open` (agent, instance, max_in_flight)",
            ))
        }
    };
    names::validate("agent", &open.agent)?;
    names::validate("instance", &open.instance)?;
    auth::require(broker, caller, Action::ReceiveAs, &open.agent).await?;
    let cap = broker.config().max_in_flight;
    if open.max_in_flight > cap {
        return Err(BrokerError::malformed(
            "open.max_in_flight",
            format!(
                "max_in_flight {} is over the broker's cap {cap}",
                open.max_in_flight
            ),
        ));
    }
    let agent = broker.agent_fresh(&open.agent).await?;
    Ok(Opened {
        agent,
        instance: open.instance,
        max_in_flight: open.max_in_flight.max(1) as usize,
    })
}

/// What the session remembers of an unsettled delivery.
struct InFlight {
    held: Held,
    /// When the inbox will offer it again unless extended: past this the
    /// slot is freed, whatever became of the delivery.
    expires: tokio::time::Instant,
    _permit: OwnedSemaphorePermit,
}

struct Session {
    broker: Broker,
    agent: pb::AgentSpec,
    instance: String,
    /// The unsettled deliveries. A plain mutex, held only for a few map
    /// operations and never across an await. It was an async lock once,
    /// and a settlement future the session loop polls could be granted it
    /// while the loop itself waited for it in a `select!` arm: the loop
    /// then never polled that settlement again, and the session stalled
    /// for good. The loop's arms must not await.
    in_flight: std::sync::Mutex<HashMap<String, InFlight>>,
    /// Whether the session's credentials still allow it.
    live: auth::LiveCheck,
    tx: Outbox,
    released: mpsc::UnboundedSender<Notice>,
    /// When the instance last settled a delivery, for its record.
    last_settled: std::sync::Mutex<Option<prost_types::Timestamp>>,
}

/// How a session ended.
enum Ending {
    /// The instance left: its deliveries are returned.
    Left,
    /// The broker drains: its deliveries stay leased.
    Drained,
    /// Its credentials no longer allow it: its deliveries are returned.
    Refused(BrokerError),
}

/// Runs a session until the instance leaves (`inbound` ends), the broker
/// drains, or `live` finds its credentials no longer allow it.
pub async fn run(
    broker: Broker,
    opened: Opened,
    mut live: auth::Live,
    mut inbound: BoxStream<'static, pb::SubscribeRequest>,
    tx: Outbox,
) {
    let Opened {
        agent,
        instance,
        max_in_flight,
    } = opened;
    let span = tracing::info_span!("subscribe", agent = %agent.name, instance = %instance);
    async move {
        let (released, mut released_rx) = mpsc::unbounded_channel();
        let session = Arc::new(Session {
            broker: broker.clone(),
            agent,
            instance,
            in_flight: std::sync::Mutex::new(HashMap::new()),
            live: live.checker(),
            tx,
            released,
            last_settled: std::sync::Mutex::new(None),
        });
        if session
            .tx
            .send(Ok(Out::Subscribed(session.agent.clone())))
            .await
            .is_err()
        {
            return;
        }
        tracing::info!(max_in_flight, "instance subscribed");
        let _live = Live::new(&broker, &session.agent.name);
        let probed = session.clone();
        let presence = instances::Presence::start(
            &broker,
            &session.agent.name,
            &session.instance,
            max_in_flight,
            Box::new(move || {
                let in_flight = u32::try_from(probed.book().len()).unwrap_or(u32::MAX);
                (in_flight, *probed.settled_at())
            }),
        );
        let permits = Arc::new(Semaphore::new(max_in_flight));
        let fetcher = tokio::spawn(fetch_loop(session.clone(), permits).in_current_span());
        let mut sweep = tokio::time::interval(Duration::from_millis(250));
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Settlements run concurrently (each one waits on NATS), up to the
        // session's in-flight bound; those of one delivery run in the
        // order they came (an extend, then its ack).
        let mut settling = Settling::default();
        let most = max_in_flight.max(MIN_SETTLING);
        let ending = loop {
            tokio::select! {
                msg = inbound.next(), if settling.running.len() < most => match msg {
                    Some(req) => settling.start(&session, req),
                    None => break Ending::Left,
                },
                Some(id) = settling.running.next(), if !settling.running.is_empty() => {
                    settling.finished(&session, id);
                }
                Some(notice) = released_rx.recv() => match notice {
                    Notice::Settled(id) => {
                        // Completed by a handoff that consumed it: free the slot.
                        session.book().remove(&id);
                        *session.settled_at() = Some(now());
                    }
                    Notice::Cancelled(cancelled) => {
                        // Its run was cancelled: the instance stops and
                        // settles it (the slot stays taken until then).
                        // Sent from a task of its own: the loop's arms must
                        // not await.
                        if session.book().contains_key(&cancelled.delivery_id) {
                            let tx = session.tx.clone();
                            tokio::spawn(async move {
                                let _ = tx.send(Ok(Out::Cancelled(cancelled))).await;
                            });
                        }
                    }
                },
                _ = sweep.tick() => session.sweep_expired(),
                _ = broker.drained() => break Ending::Drained,
                refused = live.ended() => break Ending::Refused(refused),
            }
        };
        // Settlements already asked for are answered, whichever way the
        // session ends.
        while let Some(id) = settling.running.next().await {
            settling.finished(&session, id);
        }
        fetcher.abort();
        presence.end().await;
        for f in session.book().values() {
            broker.untrack_delivery(&f.held.slot);
        }
        match ending {
            Ending::Drained => {
                let _ = session
                    .tx
                    .send(Err(BrokerError::Draining(
                        "broker is draining; reconnect to another replica".to_string(),
                    )))
                    .await;
                tracing::info!("session closed for drain; unsettled deliveries stay leased");
            }
            Ending::Left => {
                session.return_all().await;
                tracing::info!("instance left");
            }
            Ending::Refused(refused) => {
                let _ = session.tx.send(Err(refused)).await;
                session.return_all().await;
                tracing::info!("session ended: its credentials no longer allow it");
            }
        }
    }
    .instrument(span)
    .await
}

/// Settlements always allowed to run at once, whatever `max_in_flight`.
const MIN_SETTLING: usize = 16;

/// The settle commands of a session being applied, and those waiting for
/// an earlier command on the same delivery.
#[derive(Default)]
struct Settling {
    running: FuturesUnordered<BoxFuture<'static, String>>,
    waiting: HashMap<String, VecDeque<pb::SubscribeRequest>>,
}

impl Settling {
    /// Starts `req`, or queues it behind a command on the same delivery.
    fn start(&mut self, session: &Arc<Session>, req: pb::SubscribeRequest) {
        let id = delivery_of(&req);
        if let Some(queue) = self.waiting.get_mut(&id) {
            queue.push_back(req);
            return;
        }
        self.waiting.insert(id.clone(), VecDeque::new());
        self.spawn(session, req, id);
    }

    /// A command on delivery `id` finished: starts the next one queued.
    fn finished(&mut self, session: &Arc<Session>, id: String) {
        match self.waiting.get_mut(&id).and_then(VecDeque::pop_front) {
            Some(next) => self.spawn(session, next, id),
            None => {
                self.waiting.remove(&id);
            }
        }
    }

    /// Runs `req` as a future of the session loop (polled by its
    /// `select!`, whose arms never await).
    fn spawn(&mut self, session: &Arc<Session>, req: pb::SubscribeRequest, id: String) {
        let session = session.clone();
        self.running.push(
            async move {
                session.command(req).await;
                id
            }
            .in_current_span()
            .boxed(),
        );
    }
}

/// The delivery a settle command names ("" for one that names none).
fn delivery_of(req: &pb::SubscribeRequest) -> String {
    use pb::subscribe_request::Command;
    match &req.command {
        Some(Command::Ack(a)) => a.delivery_id.clone(),
        Some(Command::Nack(n)) => n.delivery_id.clone(),
        Some(Command::Reject(r)) => r.delivery_id.clone(),
        Some(Command::Extend(e)) => e.delivery_id.clone(),
        _ => String::new(),
    }
}

/// Counts a live session of an agent on this replica while it lives
/// (whichever way the session ends, or is dropped).
struct Live {
    broker: Broker,
    agent: String,
}

impl Live {
    fn new(broker: &Broker, agent: &str) -> Live {
        broker.session_opened(agent);
        Live {
            broker: broker.clone(),
            agent: agent.to_string(),
        }
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.broker.session_closed(&self.agent);
    }
}

/// Keeps `handoff_pending` current: every [`PENDING_POLL`], the number of
/// handoffs waiting in the inbox of each agent with a live session on
/// this replica, as its JetStream consumer counts them (one consumer-info
/// request per agent; agents without a session here are not reported by
/// this replica). Runs until the task is dropped; started only when the
/// metrics endpoint is.
pub async fn report_pending(broker: Broker) {
    let mut tick = tokio::time::interval(PENDING_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for agent in broker.session_agents() {
            match broker.store().inbox_pending(&agent).await {
                Ok(n) => broker.metrics().set_pending(&agent, n),
                Err(e) => {
                    tracing::debug!(agent, error = %e, "inbox backlog not read");
                }
            }
        }
    }
}

async fn fetch_loop(session: Arc<Session>, permits: Arc<Semaphore>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match session.fetch_once(&permits).await {
            Ok(true) => backoff = Duration::from_millis(100),
            Ok(false) => return,
            Err(e) => {
                tracing::warn!(error = %e, "fetch failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

impl Session {
    /// When the instance last settled a delivery.
    fn settled_at(&self) -> std::sync::MutexGuard<'_, Option<prost_types::Timestamp>> {
        self.last_settled
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The book of unsettled deliveries (see [`Session::in_flight`]).
    fn book(&self) -> std::sync::MutexGuard<'_, HashMap<String, InFlight>> {
        self.in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Pulls as many handoffs as there is room for, and offers each.
    /// `Ok(false)` when the instance is gone.
    async fn fetch_once(self: &Arc<Self>, permits: &Arc<Semaphore>) -> Result<bool, BrokerError> {
        let Ok(first) = permits.clone().acquire_owned().await else {
            return Ok(false);
        };
        let mut held = vec![first];
        while let Ok(p) = permits.clone().try_acquire_owned() {
            held.push(p);
        }
        let link = self.broker.link().clone();
        let connections = link.connections();
        let mut offers = self
            .broker
            .store()
            .pull(&self.agent.name, held.len(), PULL_EXPIRES)
            .await?;
        // Each offer is prepared (run read, lease, token) as soon as it is
        // pulled, concurrently with the others, and delivered in the order
        // the inbox gave them.
        let mut prepared = FuturesOrdered::new();
        let mut pulling = true;
        while pulling || !prepared.is_empty() {
            tokio::select! {
                next = offers.next(), if pulling => match next {
                    Some(offered) => {
                        let offered = offered?;
                        // More than asked for: left to its lease.
                        if let Some(permit) = held.pop() {
                            prepared.push_back(self.prepare(offered, permit));
                        }
                        pulling = !held.is_empty();
                    }
                    None => pulling = false,
                },
                Some((offering, permit, span)) = prepared.next(), if !prepared.is_empty() => {
                    if !self.deliver(offering, permit).instrument(span).await {
                        // The offers prepared behind it go back to the
                        // inbox rather than wait out their leases.
                        while let Some((rest, _, _)) = prepared.next().await {
                            if let Offering::Deliver(_, held) = rest {
                                deliveries::give_back(&self.broker, &held).await;
                            }
                        }
                        return Ok(false);
                    }
                }
                // A reconnection may have lost the pull with the old
                // connection's server: pull again rather than wait it out.
                _ = link.reconnected_since(connections), if pulling => pulling = false,
            }
        }
        Ok(!self.tx.is_closed())
    }

    /// Prepares the offer of one handoff to the instance (see
    /// [`deliveries::offer`]) on a task of its own: it makes progress
    /// while the fetcher waits to deliver an earlier one, and nothing it
    /// holds waits on the fetcher polling it.
    fn prepare(
        self: &Arc<Self>,
        offered: crate::store::Offered,
        permit: OwnedSemaphorePermit,
    ) -> impl std::future::Future<Output = (Offering, OwnedSemaphorePermit, tracing::Span)> + 'static
    {
        let span = tracing::info_span!(
            "delivery",
            agent = %self.agent.name,
            sequence = offered.sequence,
            attempt = offered.delivered,
            run_id = tracing::field::Empty,
            handoff_id = tracing::field::Empty,
        );
        let session = self.clone();
        let task = tokio::spawn(
            async move {
                deliveries::offer(&session.broker, &session.agent, &session.instance, offered).await
            }
            .instrument(span.clone()),
        );
        async move {
            let offering = task.await.unwrap_or_else(|e| {
                tracing::error!(parent: &span, error = %e, "an offer was not prepared; left to its lease");
                Offering::Skip
            });
            (offering, permit, span)
        }
    }

    /// Delivers one prepared offer to the instance. `false` when it is
    /// gone.
    async fn deliver(&self, offering: Offering, permit: OwnedSemaphorePermit) -> bool {
        let (delivery, held) = match offering {
            Offering::Deliver(d, h) => (d, *h),
            Offering::Skip => return true,
        };
        if self.live.check().is_err() {
            // Not for an instance whose credentials no longer allow it:
            // back to the inbox, for another one.
            deliveries::give_back(&self.broker, &held).await;
            return false;
        }
        let span = tracing::Span::current();
        span.record("run_id", held.run_id.as_str());
        span.record("handoff_id", held.handoff_id.as_str());
        let id = held.delivery_id.clone();
        self.broker.track_delivery(&held, self.released.clone());
        {
            let mut in_flight = self.book();
            // A redelivery to this session supersedes its expired lease.
            in_flight.retain(|_, f| {
                let superseded = f.held.handoff_id == held.handoff_id;
                if superseded {
                    self.broker.untrack_delivery(&f.held.slot);
                }
                !superseded
            });
            in_flight.insert(
                id,
                InFlight {
                    held: held.clone(),
                    expires: tokio::time::Instant::now() + held.lease,
                    _permit: permit,
                },
            );
        }
        if self.tx.send(Ok(Out::Delivery(delivery))).await.is_err() {
            return false;
        }
        deliveries::announce_delivered(&self.broker, &self.agent.name, &self.instance, &held).await;
        true
    }

    /// Applies one settle command and answers it.
    async fn command(&self, req: pb::SubscribeRequest) {
        use pb::subscribe_request::Command;
        let request_id = req.request_id;
        let extend = matches!(req.command, Some(Command::Extend(_)));
        let (delivery_id, op) = match req.command {
            Some(Command::Ack(a)) => (a.delivery_id, Ok(Op::Ack)),
            Some(Command::Nack(n)) => {
                let delay = n.delay.and_then(|d| Duration::try_from(d).ok());
                (n.delivery_id, Ok(Op::Nack(delay)))
            }
            Some(Command::Reject(r)) => (r.delivery_id, Ok(Op::Reject(r.reason))),
            Some(Command::Extend(e)) => (e.delivery_id, Ok(Op::Extend)),
            Some(Command::Open(_)) => (
                String::new(),
                Err(BrokerError::malformed("open", "the stream is already open")),
            ),
            None => (
                String::new(),
                Err(BrokerError::malformed("command", "empty command")),
            ),
        };
        let result = match op.and_then(|op| self.live.check().map(|()| op)) {
            // Bounded like a unary call: a settlement while NATS is down
            // answers UNAVAILABLE within nats_timeout (repeating it is safe).
            Ok(op) => self.broker.bounded(self.apply(&delivery_id, &op)).await,
            Err(e) => Err(e),
        };
        if result.is_ok() && !extend {
            *self.settled_at() = Some(now());
        }
        let settled = Out::Settled {
            request_id,
            delivery_id,
            result,
        };
        let _ = self.tx.send(Ok(settled)).await;
    }

    /// Settles one delivery and keeps the session's book of it.
    async fn apply(
        &self,
        delivery_id: &str,
        op: &Op,
    ) -> Result<Option<prost_types::Timestamp>, BrokerError> {
        let held = { self.book().get(delivery_id).map(|f| f.held.clone()) };
        let span = tracing::info_span!(
            "settle",
            agent = %self.agent.name,
            run_id = held.as_ref().map(|h| h.run_id.as_str()).unwrap_or(""),
            handoff_id = held.as_ref().map(|h| h.handoff_id.as_str()).unwrap_or(""),
        );
        let extended = deliveries::settle(
            &self.broker,
            &self.agent,
            &self.instance,
            delivery_id,
            held.as_ref(),
            op,
        )
        .instrument(span)
        .await?;
        if let Some(lease) = extended {
            if let Some(f) = self.book().get_mut(delivery_id) {
                f.expires = tokio::time::Instant::now() + lease;
            }
            return Ok(Some(prost_types::Timestamp::from(
                std::time::SystemTime::now() + lease,
            )));
        }
        if let Some(h) = &held {
            self.broker.untrack_delivery(&h.slot);
        }
        self.book().remove(delivery_id);
        Ok(None)
    }

    /// Frees the slots of deliveries whose lease has passed: the inbox
    /// offers them again (maybe to this very session), and a delivery
    /// completed through another replica never comes back to be settled.
    fn sweep_expired(&self) {
        let now = tokio::time::Instant::now();
        let grace = Duration::from_millis(100);
        let mut in_flight = self.book();
        let expired: Vec<String> = in_flight
            .iter()
            .filter(|(_, f)| f.expires + grace < now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            if let Some(f) = in_flight.remove(&id) {
                self.broker.untrack_delivery(&f.held.slot);
            }
        }
    }

    /// Returns every unsettled delivery for immediate redelivery.
    async fn return_all(&self) {
        let drained: Vec<InFlight> = self.book().drain().map(|(_, f)| f).collect();
        for f in drained {
            deliveries::give_back(&self.broker, &f.held).await;
        }
    }
}
