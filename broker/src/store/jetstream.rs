//! The JetStream implementation of [`Store`]: streams, consumers and
//! key/value buckets.
//!
//! Nothing authoritative lives in broker memory. Handoffs wait in the inbox
//! stream (one durable pull consumer per agent: explicit ack, ack wait =
//! lease), events go to the events stream, dead letters to their own
//! stream, run deadlines to a timer stream, and agents and runs are
//! key/value entries changed with compare-and-set. Every publish carries a
//! deterministic message id, so a retried step is recognised by JetStream
//! instead of stored twice.

use std::{future::IntoFuture, time::Duration};

use async_nats::{
    header::{HeaderMap, NATS_MESSAGE_ID},
    jetstream::{self, consumer::pull, kv, stream, AckKind},
};
use bytes::Bytes;
use dashmap::DashMap;
use futures::{stream::BoxStream, StreamExt, TryStreamExt};
use handoff_proto::pb;
use prost::Message as _;

use super::{
    BranchPut, Claim, InboxMessage, Offered, PayloadInfo, Result, Settlement, Store, Stored,
    TimerKind,
};
use crate::{config::Config, error::BrokerError};

/// Stream of agent inboxes, `handoff.v1.inbox.<agent>`.
pub const INBOX_STREAM: &str = "HANDOFF_INBOX";
/// Stream of events, `handoff.v1.events.<run_id>.<kind>`.
pub const EVENTS_STREAM: &str = "HANDOFF_EVENTS";
/// Stream of dead letters, `handoff.v1.dead.<agent>`.
pub const DEAD_STREAM: &str = "HANDOFF_DEAD";
/// Work-queue stream of durable timers, `handoff.v1.timers.<kind>.<id>`.
pub const TIMERS_STREAM: &str = "HANDOFF_TIMERS";
/// Bucket of agent specs.
pub const AGENTS_BUCKET: &str = "handoff_agents";
/// Bucket of runs.
pub const RUNS_BUCKET: &str = "handoff_runs";
/// Stream of barrier branch results, `handoff.v1.branches.<run>.<barrier>.<key>`.
pub const BRANCHES_STREAM: &str = "HANDOFF_BRANCHES";
/// Key/value bucket of barriers, keyed `<run>.<barrier>`.
pub const BARRIERS_BUCKET: &str = "handoff_barriers";
/// Key/value bucket of contract versions, keyed `<message type>.<version>`.
pub const CONTRACTS_BUCKET: &str = "handoff_contracts";
/// Key/value bucket of contracts' compatibility modes as changed by
/// `SetCompatibility`, keyed by message type.
pub const CONTRACT_MODES_BUCKET: &str = "handoff_contract_modes";
/// Key/value bucket of consumed deliveries: the first handoff made from
/// each, keyed by the consumed handoff's id.
pub const CONSUMED_BUCKET: &str = "handoff_consumed";

/// Key/value bucket of run states: each revision under `<run>.<revision>`
/// (created once, never changed), and the latest known under `<run>.head`.
pub const STATE_BUCKET: &str = "handoff_state";

/// Key/value bucket of delivery leases, keyed `<agent>.<sequence>`.
pub const LEASES_BUCKET: &str = "handoff_leases";
/// Key/value bucket of the delivery-token signing keys (key `delivery`).
pub const KEYS_BUCKET: &str = "handoff_keys";
/// Key/value bucket of principals and their grants.
pub const PRINCIPALS_BUCKET: &str = "handoff_principals";
/// Key/value bucket of API tokens (secrets as SHA-256 digests).
pub const TOKENS_BUCKET: &str = "handoff_tokens";
/// Object store of payloads kept by reference (`<run_id>/<sha256>`).
pub const PAYLOADS_BUCKET: &str = "handoff_payloads";
/// Chunk size of stored payloads (each chunk is one NATS message).
const PAYLOAD_CHUNK: usize = 512 * 1024;
/// The lease bucket's age limit: longer than any record lives (the
/// longest lease, 24 h, and LEASE_RECORD_GRACE), so it only bounds a
/// record written without its own expiry.
const LEASE_RECORD_AGE: Duration = Duration::from_secs(48 * 3600);

/// How long a lease record outlives its lease's deadline. JetStream
/// offers an unsettled delivery again one lease after it last offered it,
/// so by then the delivery is settled in JetStream or offered again, and
/// what the record still answers is a settlement repeated because its
/// answer was lost. The one case it does not cover: an ack recorded by a
/// replica that stopped before JetStream confirmed it, on an agent that
/// no instance pulls from for longer than this after the lease: that
/// handoff is offered once more (a complete-and-handoff redone then is
/// still recognised by its claim).
const LEASE_RECORD_GRACE: Duration = Duration::from_secs(60);

/// Durable consumer of the timer stream, shared by every broker replica.
pub const TIMERS_CONSUMER: &str = "handoff_timers";
/// Durable consumer of the run purges in the timer stream, in order.
pub const PURGES_CONSUMER: &str = "handoff_purges";
/// The timers `TIMERS_CONSUMER` fires: every kind but the purges.
const TIMER_SUBJECTS: [&str; 3] = [
    "handoff.v1.timers.run.>",
    "handoff.v1.timers.barrier.>",
    "handoff.v1.timers.queue.>",
];
/// The purge timers, fired by `PURGES_CONSUMER`.
const PURGE_SUBJECTS: &str = "handoff.v1.timers.purge.>";
/// How many purges are out at once. Purges fall due in the order they
/// were scheduled (a run's end plus the same `retention`), so however
/// many wait, only these few are held by JetStream, each until it is due.
const PURGES_IN_FLIGHT: i64 = 16;

/// Subject of an agent's inbox.
pub fn inbox_subject(agent: &str) -> String {
    format!("handoff.v1.inbox.{agent}")
}

/// Subject of an event.
pub fn event_subject(run_id: &str, kind: pb::EventKind) -> String {
    format!("handoff.v1.events.{run_id}.{}", kind.token())
}

/// Key of a contract version in its bucket.
pub fn contract_key(message_type: &str, version: u32) -> String {
    format!("{message_type}.{version}")
}

/// Splits a contracts-bucket key into message type and version.
pub fn parse_contract_key(key: &str) -> Option<(&str, u32)> {
    let (name, version) = key.rsplit_once('.')?;
    Some((name, version.parse().ok()?))
}

/// Subject of a barrier branch's result.
pub fn branch_subject(run_id: &str, barrier_id: &str, key: &str) -> String {
    format!("handoff.v1.branches.{run_id}.{barrier_id}.{key}")
}

/// Key of a barrier in its bucket.
pub fn barrier_key(run_id: &str, barrier_id: &str) -> String {
    format!("{run_id}.{barrier_id}")
}

/// Key of a barrier's whole spec, when its header leaves the keys out.
fn barrier_keys_key(run_id: &str, barrier_id: &str) -> String {
    format!("{run_id}.{barrier_id}.keys")
}

/// Key of the note that a branch result reached a barrier before it was
/// opened (names hold no `.`, so it cannot be a barrier's key).
fn early_key(run_id: &str, barrier_id: &str) -> String {
    format!("{run_id}.{barrier_id}.early")
}

/// Subject on which replicas announce settled deliveries of an agent.
pub fn settled_subject(agent: &str) -> String {
    format!("handoff.v1.settled.{agent}")
}

/// Subject of an agent's dead letters.
pub fn dead_subject(agent: &str) -> String {
    format!("handoff.v1.dead.{agent}")
}

/// Handles to everything the broker keeps in JetStream.
#[derive(Clone)]
pub struct JetStream {
    /// The NATS connection.
    pub client: async_nats::Client,
    /// JetStream context.
    pub js: jetstream::Context,
    /// Inbox stream.
    pub inbox: stream::Stream,
    /// Events stream.
    pub events: stream::Stream,
    /// Dead-letter stream.
    pub dead: stream::Stream,
    /// Timer stream.
    pub timers: stream::Stream,
    /// Barrier branch results.
    pub branches: stream::Stream,
    /// Barriers.
    pub barriers: kv::Store,
    /// Run states.
    pub state: kv::Store,
    /// Agent specs.
    pub agents: kv::Store,
    /// Runs.
    pub runs: kv::Store,
    /// Contract versions.
    pub contracts: kv::Store,
    /// Contracts' compatibility modes, once changed.
    pub contract_modes: kv::Store,
    /// Consumed deliveries.
    pub consumed: kv::Store,
    /// Delivery leases.
    pub leases: kv::Store,
    /// Signing keys.
    pub keys: kv::Store,
    /// Principals.
    pub principals: kv::Store,
    /// API tokens.
    pub tokens: kv::Store,
    /// Payloads kept by reference.
    pub payloads: async_nats::jetstream::object_store::ObjectStore,
    /// How long payloads (and handoffs) are kept.
    retention: Duration,
    ack_timeout: Duration,
    /// Pull consumers of agents' inboxes, opened once.
    consumers: DashMap<String, jetstream::consumer::PullConsumer>,
}

impl JetStream {
    /// Creates or updates the streams, buckets and timer consumer; safe to
    /// call from every replica at every start.
    pub async fn open(client: async_nats::Client, cfg: &Config) -> Result<JetStream, BrokerError> {
        let mut js = jetstream::new(client.clone());
        js.set_timeout(cfg.nats_timeout);
        check_jetstream(&client).await?;
        let replicas = cfg.replicas;
        let base =
            |name: &str, subjects: &str, retention: stream::RetentionPolicy| stream::Config {
                name: name.to_string(),
                subjects: vec![subjects.to_string()],
                retention,
                storage: stream::StorageType::File,
                num_replicas: replicas,
                duplicate_window: cfg.dedupe_window,
                max_age: if retention == stream::RetentionPolicy::WorkQueue {
                    Duration::ZERO
                } else {
                    cfg.retention
                },
                allow_direct: true,
                // Bounded: nothing stored is discarded to make room (a
                // write past the limit is refused), except events below.
                max_bytes: cfg.stream_max_bytes,
                discard: stream::DiscardPolicy::New,
                ..Default::default()
            };
        // A handoff leaves its inbox once its agent's consumer acked it
        // (interest retention): what a settled handoff must still answer
        // is kept elsewhere (its events, the claim on it, its lease record
        // for a short while). Every agent's consumer is created when the
        // agent is registered, before anything can be handed to it.
        let inbox = ensure_stream(
            &js,
            base(
                INBOX_STREAM,
                "handoff.v1.inbox.>",
                stream::RetentionPolicy::Interest,
            ),
        )
        .await?;
        // Events are the record of what happened, not the work: past their
        // limit the oldest go, so a flood of events never stops handoffs.
        let events = ensure_stream(
            &js,
            stream::Config {
                max_bytes: cfg.events_max_bytes,
                discard: stream::DiscardPolicy::Old,
                ..base(
                    EVENTS_STREAM,
                    "handoff.v1.events.>",
                    stream::RetentionPolicy::Limits,
                )
            },
        )
        .await?;
        let dead = ensure_stream(
            &js,
            base(
                DEAD_STREAM,
                "handoff.v1.dead.>",
                stream::RetentionPolicy::Limits,
            ),
        )
        .await?;
        let timers = ensure_stream(
            &js,
            base(
                TIMERS_STREAM,
                "handoff.v1.timers.>",
                stream::RetentionPolicy::WorkQueue,
            ),
        )
        .await?;
        let branches = ensure_stream(
            &js,
            base(
                BRANCHES_STREAM,
                "handoff.v1.branches.>",
                stream::RetentionPolicy::Limits,
            ),
        )
        .await?;
        let bucket = |name: &str, max_age: Duration| kv::Config {
            bucket: name.to_string(),
            history: 1,
            max_age,
            max_bytes: cfg.stream_max_bytes,
            storage: stream::StorageType::File,
            num_replicas: replicas,
            ..Default::default()
        };
        let agents = ensure_bucket(&js, bucket(AGENTS_BUCKET, Duration::ZERO)).await?;
        let runs = ensure_bucket(&js, bucket(RUNS_BUCKET, Duration::ZERO)).await?;
        let contracts = ensure_bucket(&js, bucket(CONTRACTS_BUCKET, Duration::ZERO)).await?;
        let contract_modes =
            ensure_bucket(&js, bucket(CONTRACT_MODES_BUCKET, Duration::ZERO)).await?;
        let barriers = ensure_bucket(&js, bucket(BARRIERS_BUCKET, cfg.retention)).await?;
        // Kept as long as runs are: a run may outlive any retention.
        let state = ensure_bucket(&js, bucket(STATE_BUCKET, Duration::ZERO)).await?;
        // A claim matters as long as the consumed handoff can be consumed,
        // that is while the inbox keeps it.
        let consumed = ensure_bucket(&js, bucket(CONSUMED_BUCKET, cfg.retention)).await?;
        // Each lease record expires on its own (see `put_lease`); the
        // bucket's age limit only bounds a record written without one.
        let leases = ensure_bucket_with(&js, bucket(LEASES_BUCKET, LEASE_RECORD_AGE), true).await?;
        let keys = ensure_bucket(&js, bucket(KEYS_BUCKET, Duration::ZERO)).await?;
        let principals = ensure_bucket(&js, bucket(PRINCIPALS_BUCKET, Duration::ZERO)).await?;
        let tokens = ensure_bucket(&js, bucket(TOKENS_BUCKET, Duration::ZERO)).await?;
        // Payloads by reference expire with the handoffs that name them
        // (`retention`). The stream is made the way object store clients
        // expect it (created here, as the buckets are, so that it works on
        // nats-server 2.9).
        ensure_stream(
            &js,
            stream::Config {
                name: format!("OBJ_{PAYLOADS_BUCKET}"),
                subjects: vec![
                    format!("$O.{PAYLOADS_BUCKET}.C.>"),
                    format!("$O.{PAYLOADS_BUCKET}.M.>"),
                ],
                max_age: cfg.retention,
                max_bytes: cfg.stream_max_bytes,
                storage: stream::StorageType::File,
                num_replicas: replicas,
                discard: stream::DiscardPolicy::New,
                allow_rollup: true,
                allow_direct: replicas == 1,
                duplicate_window: dedupe_window_within(cfg.retention),
                ..Default::default()
            },
        )
        .await?;
        let payloads = js
            .get_object_store(PAYLOADS_BUCKET)
            .await
            .map_err(|e| BrokerError::nats("opening the payload object store", e))?;
        // Timers not yet due wait as pending (negatively acknowledged with a
        // delay), so the consumer must allow any number of them pending.
        let timer_consumer = pull::Config {
            durable_name: Some(TIMERS_CONSUMER.to_string()),
            filter_subjects: TIMER_SUBJECTS.iter().map(|s| s.to_string()).collect(),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            max_deliver: -1,
            max_ack_pending: -1,
            ..Default::default()
        };
        // The purges have a consumer of their own, which holds only the
        // next few (see PURGES_IN_FLIGHT); the timer consumer leaves them
        // to it (a work queue's consumers may not overlap), so it is
        // narrowed first.
        let purge_consumer = pull::Config {
            durable_name: Some(PURGES_CONSUMER.to_string()),
            filter_subject: PURGE_SUBJECTS.to_string(),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            max_deliver: -1,
            max_ack_pending: PURGES_IN_FLIGHT,
            ..Default::default()
        };
        for (name, config) in [
            (TIMERS_CONSUMER, timer_consumer),
            (PURGES_CONSUMER, purge_consumer),
        ] {
            match timers.consumer_info(name).await {
                Ok(info)
                    if info.config.max_ack_pending == config.max_ack_pending
                        && info.config.filter_subject == config.filter_subject
                        && info.config.filter_subjects == config.filter_subjects => {}
                Ok(_) => {
                    timers
                        .update_consumer(config)
                        .await
                        .map_err(|e| BrokerError::nats("updating a timer consumer", e))?;
                }
                Err(_) => {
                    if let Err(e) = timers.create_consumer(config).await {
                        // Another replica may have created it meanwhile.
                        if timers.consumer_info(name).await.is_err() {
                            return Err(BrokerError::nats("creating a timer consumer", e));
                        }
                    }
                }
            }
        }
        Ok(JetStream {
            client,
            js,
            inbox,
            events,
            dead,
            timers,
            agents,
            runs,
            contracts,
            contract_modes,
            consumed,
            leases,
            keys,
            principals,
            tokens,
            branches,
            state,
            barriers,
            payloads,
            retention: cfg.retention,
            ack_timeout: cfg.nats_timeout,
            consumers: DashMap::new(),
        })
    }

    /// Publishes `payload` to a stream subject with a message id and waits
    /// for JetStream to store it.
    pub async fn publish(
        &self,
        subject: String,
        msg_id: &str,
        payload: Bytes,
    ) -> Result<jetstream::publish::PublishAck, BrokerError> {
        let mut headers = HeaderMap::new();
        headers.insert(NATS_MESSAGE_ID, msg_id);
        let ack = self
            .js
            .publish_with_headers(subject, headers, payload)
            .await
            .map_err(|e| BrokerError::nats("publishing", e))?;
        ack.await.map_err(|e| BrokerError::nats("storing", e))
    }

    /// What every stream and bucket of the broker holds: (name, bytes,
    /// messages, byte limit), from one listing of JetStream's streams.
    pub async fn usage(&self) -> Result<Vec<(String, u64, u64, i64)>, BrokerError> {
        let mut streams = self.js.streams();
        let mut out = Vec::new();
        while let Some(info) = streams.next().await {
            let info = info.map_err(|e| BrokerError::nats("listing streams", e))?;
            let name = &info.config.name;
            let ours = name.starts_with("HANDOFF_")
                || name.starts_with("KV_handoff_")
                || name.starts_with("OBJ_handoff_");
            if ours {
                out.push((
                    name.clone(),
                    info.state.bytes,
                    info.state.messages,
                    info.config.max_bytes,
                ));
            }
        }
        Ok(out)
    }

    /// The latest revision of the contracts bucket (0 when empty).
    pub async fn contracts_revision(&self) -> Result<u64, BrokerError> {
        let stream = self
            .js
            .get_stream(format!("KV_{CONTRACTS_BUCKET}"))
            .await
            .map_err(|e| BrokerError::nats("reading the contracts bucket", e))?;
        Ok(stream.cached_info().state.last_sequence)
    }

    /// Reads an inbox message by sequence; `None` if it is gone.
    async fn inbox_message(
        &self,
        seq: u64,
    ) -> Result<Option<jetstream::message::StreamMessage>, BrokerError> {
        // A direct get (answered by any replica, without the stream API);
        // a replica that has not caught up with `seq` answers not found,
        // so that answer is asked of the leader again.
        match self.inbox.direct_get(seq).await {
            Ok(m) => return Ok(Some(m)),
            Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => {}
            Err(e) => return Err(BrokerError::nats("reading the inbox", e)),
        }
        match self.inbox.get_raw_message(seq).await {
            Ok(m) => Ok(Some(m)),
            Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(BrokerError::nats("reading the inbox", e)),
        }
    }

    /// Writes `value` under `key`: creates it when `revision` is `None`
    /// (`false` if it exists), else compare-and-set (`false` when another
    /// writer came first).
    async fn write(
        &self,
        bucket: &kv::Store,
        key: &str,
        value: Bytes,
        revision: Option<u64>,
    ) -> Result<bool, BrokerError> {
        match revision {
            None => match bucket.create(key, value).await {
                Ok(_) => Ok(true),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
                Err(e) => Err(BrokerError::nats("writing to the store", e)),
            },
            Some(rev) => match bucket.update(key, value, rev).await {
                Ok(_) => Ok(true),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(false),
                Err(e) => Err(BrokerError::nats("writing to the store", e)),
            },
        }
    }

    /// Every value of a bucket that decodes as `T`.
    async fn all<T: prost::Message + Default>(bucket: &kv::Store) -> Result<Vec<T>, BrokerError> {
        let keys: Vec<String> = match bucket.keys().await {
            Ok(k) => k
                .try_collect()
                .await
                .map_err(|e| BrokerError::nats("listing", e))?,
            Err(e) => return Err(BrokerError::nats("listing", e)),
        };
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            if let Some((v, _)) = read::<T>(bucket, &k).await? {
                out.push(v);
            }
        }
        Ok(out)
    }

    /// The pull consumer of an agent, opened once and kept.
    async fn agent_consumer(
        &self,
        agent: &str,
    ) -> Result<jetstream::consumer::PullConsumer, BrokerError> {
        if let Some(c) = self.consumers.get(agent) {
            return Ok(c.clone());
        }
        let consumer = self
            .inbox
            .get_consumer(agent)
            .await
            .map_err(|e| BrokerError::nats("opening the agent's consumer", e))?;
        self.consumers.insert(agent.to_string(), consumer.clone());
        Ok(consumer)
    }
}

#[async_trait::async_trait]
impl Store for JetStream {
    fn max_payload(&self) -> usize {
        self.client.server_info().max_payload
    }

    fn reference_matches(&self, token: &pb::DeliveryToken) -> bool {
        ack_subject_matches(&token.ack_subject, &token.agent, token.stream_sequence)
    }

    async fn put_handoff(&self, envelope: &pb::HandoffEnvelope) -> Result<Stored, BrokerError> {
        let ack = self
            .publish(
                inbox_subject(&envelope.target_agent),
                &envelope.id,
                envelope.encode_to_vec().into(),
            )
            .await?;
        Ok(Stored {
            sequence: ack.sequence,
            duplicate: ack.duplicate,
        })
    }

    async fn handoff_at(&self, sequence: u64) -> Result<Option<InboxMessage>, BrokerError> {
        let Some(msg) = self.inbox_message(sequence).await? else {
            return Ok(None);
        };
        let envelope = pb::HandoffEnvelope::decode(msg.payload)
            .map_err(|e| BrokerError::Internal(format!("stored handoff does not decode: {e}")))?;
        let agent = msg
            .subject
            .as_str()
            .strip_prefix("handoff.v1.inbox.")
            .unwrap_or_default()
            .to_string();
        Ok(Some(InboxMessage { agent, envelope }))
    }

    /// Creates the agent's durable pull consumer, or updates its lease.
    async fn prepare_inbox(
        &self,
        agent: &str,
        lease: Duration,
        max_ack_pending: i64,
    ) -> Result<(), BrokerError> {
        self.consumers.remove(agent);
        let config = pull::Config {
            durable_name: Some(agent.to_string()),
            filter_subject: inbox_subject(agent),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: lease,
            // Attempts are counted by the broker, which routes a handoff to
            // the fallback or the dead letter itself; JetStream must keep
            // offering it until then.
            max_deliver: -1,
            max_ack_pending,
            ..Default::default()
        };
        match self.inbox.consumer_info(agent).await {
            Ok(info)
                if info.config.ack_wait == lease
                    && info.config.max_ack_pending == max_ack_pending =>
            {
                Ok(())
            }
            Ok(_) => self
                .inbox
                .update_consumer(config)
                .await
                .map(|_| ())
                .map_err(|e| BrokerError::nats("updating the agent's consumer", e)),
            Err(_) => self
                .inbox
                .create_consumer(config)
                .await
                .map(|_| ())
                .map_err(|e| BrokerError::nats("creating the agent's consumer", e)),
        }
    }

    async fn was_delivered(&self, agent: &str, sequence: u64) -> Result<bool, BrokerError> {
        // The consumer delivers in stream order: what it delivered last
        // bounds what it delivered at all.
        let mut consumer = self.agent_consumer(agent).await?;
        let info = consumer
            .info()
            .await
            .map_err(|e| BrokerError::nats("reading the agent's consumer", e))?;
        Ok(info.delivered.stream_sequence >= sequence)
    }

    async fn inbox_pending(&self, agent: &str) -> Result<u64, BrokerError> {
        let mut consumer = self.agent_consumer(agent).await?;
        let info = consumer
            .info()
            .await
            .map_err(|e| BrokerError::nats("reading the agent's consumer", e))?;
        Ok(info.num_pending)
    }

    async fn withdraw_handoff(&self, sequence: u64) -> Result<(), BrokerError> {
        use jetstream::stream::DeleteMessageErrorKind;
        match self.inbox.delete_message(sequence).await {
            Ok(_) => Ok(()),
            Err(e) => match e.kind() {
                DeleteMessageErrorKind::JetStream(js)
                    if js.error_code() == jetstream::ErrorCode::NO_MESSAGE_FOUND =>
                {
                    Ok(())
                }
                _ => Err(BrokerError::nats("withdrawing a handoff", e)),
            },
        }
    }

    async fn pull(
        &self,
        agent: &str,
        max: usize,
        expires: Duration,
    ) -> Result<BoxStream<'static, Result<Offered, BrokerError>>, BrokerError> {
        let consumer = self.agent_consumer(agent).await?;
        let batch = consumer
            .batch()
            .max_messages(max)
            .expires(expires)
            .messages()
            .await;
        let batch = match batch {
            Ok(b) => b,
            Err(e) => {
                // The consumer may be gone (deleted, or the stream lost):
                // open it afresh next time.
                self.consumers.remove(agent);
                return Err(BrokerError::nats("pulling deliveries", e));
            }
        };
        Ok(batch
            .filter_map(|msg| async move {
                let msg = match msg {
                    Ok(m) => m,
                    Err(e) => return Some(Err(BrokerError::nats("pulling deliveries", e))),
                };
                let (sequence, delivered) = match msg.info() {
                    Ok(i) => (i.stream_sequence, i.delivered),
                    Err(e) => {
                        tracing::warn!(error = %e, "message without JetStream metadata ignored");
                        return None;
                    }
                };
                let reference = msg.reply.as_ref()?.to_string();
                Some(Ok(Offered {
                    sequence,
                    delivered,
                    reference,
                    payload: msg.payload.clone(),
                }))
            })
            .boxed())
    }

    /// Settles a delivery by its ack subject (`+ACK`, `-NAK`, `+TERM`,
    /// `+WPI`) and waits for JetStream's confirmation.
    async fn settle(&self, reference: &str, how: Settlement) -> Result<(), BrokerError> {
        let kind = match how {
            Settlement::Ack => AckKind::Ack,
            Settlement::Nack(delay) => AckKind::Nak(delay),
            Settlement::Term => AckKind::Term,
            Settlement::Progress => AckKind::Progress,
        };
        let body: Bytes = kind.into();
        let request = self.client.request(reference.to_string(), body);
        match tokio::time::timeout(self.ack_timeout, request).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(BrokerError::nats("settling the delivery", e)),
            Err(_) => Err(BrokerError::Unavailable(
                "JetStream did not confirm the settlement in time".to_string(),
            )),
        }
    }

    /// A plain NATS publish on `handoff.v1.settled.<agent>` (kept by no
    /// stream): every replica listens.
    async fn announce_settled(&self, agent: &str, slot: &str) {
        let subject = settled_subject(agent);
        if let Err(e) = self
            .client
            .publish(subject, Bytes::copy_from_slice(slot.as_bytes()))
            .await
        {
            tracing::debug!(slot, error = %e, "settlement not announced; the slot frees at its lease");
        }
    }

    async fn settled_announcements(&self) -> Result<BoxStream<'static, String>> {
        let subscription = self
            .client
            .subscribe(settled_subject("*"))
            .await
            .map_err(|e| BrokerError::nats("listening for settlements", e))?;
        Ok(subscription
            .filter_map(|msg| async move { String::from_utf8(msg.payload.to_vec()).ok() })
            .boxed())
    }

    async fn put_dead_letter(&self, letter: &pb::DeadLetter) -> Result<(), BrokerError> {
        let id = letter
            .handoff
            .as_ref()
            .map(|h| h.id.as_str())
            .unwrap_or_default();
        self.publish(
            dead_subject(&letter.agent),
            &format!("dead-{id}"),
            letter.encode_to_vec().into(),
        )
        .await
        .map(|_| ())
    }

    async fn dead_letters(
        &self,
        agent: Option<&str>,
        limit: usize,
    ) -> Result<Vec<pb::DeadLetter>, BrokerError> {
        let filter = format!("handoff.v1.dead.{}", agent.unwrap_or("*"));
        let mut out = Vec::new();
        for (seq, payload) in read_stream(&self.dead, &filter, limit).await? {
            if let Ok(mut d) = pb::DeadLetter::decode(payload) {
                d.sequence = seq;
                out.push(d);
            }
        }
        Ok(out)
    }

    /// Publishes an event (deduplicated by `msg_id`) and returns its sequence.
    async fn publish_event(&self, event: &pb::Event, msg_id: &str) -> Result<u64> {
        let kind = pb::EventKind::try_from(event.kind).unwrap_or(pb::EventKind::Unspecified);
        let ack = self
            .publish(
                event_subject(&event.run_id, kind),
                msg_id,
                event.encode_to_vec().into(),
            )
            .await?;
        Ok(ack.sequence)
    }

    async fn publish_events(&self, events: &[(pb::Event, String)]) -> Vec<Result<u64>> {
        // Send every one, then await the confirmations together.
        let mut acks = Vec::with_capacity(events.len());
        for (event, msg_id) in events {
            let kind = pb::EventKind::try_from(event.kind).unwrap_or(pb::EventKind::Unspecified);
            let mut headers = HeaderMap::new();
            headers.insert(NATS_MESSAGE_ID, msg_id.as_str());
            acks.push(
                self.js
                    .publish_with_headers(
                        event_subject(&event.run_id, kind),
                        headers,
                        event.encode_to_vec().into(),
                    )
                    .await,
            );
        }
        let confirm = acks.into_iter().map(|sent| async move {
            match sent {
                Ok(ack) => ack
                    .await
                    .map(|a| a.sequence)
                    .map_err(|e| BrokerError::nats("storing an event", e)),
                Err(e) => Err(BrokerError::nats("publishing an event", e)),
            }
        });
        futures::future::join_all(confirm).await
    }

    async fn run_events(&self, run_id: &str) -> Result<Vec<pb::Event>, BrokerError> {
        let filter = format!("handoff.v1.events.{run_id}.>");
        let mut out = Vec::new();
        for (seq, payload) in read_stream(&self.events, &filter, usize::MAX).await? {
            match pb::Event::decode(payload) {
                Ok(mut e) => {
                    e.sequence = seq;
                    out.push(e);
                }
                Err(e) => tracing::warn!(seq, error = %e, "undecodable event skipped"),
            }
        }
        Ok(out)
    }

    async fn watch_events(
        &self,
        run_id: Option<&str>,
        kind: Option<pb::EventKind>,
        from_sequence: u64,
    ) -> Result<BoxStream<'static, Result<pb::Event, BrokerError>>, BrokerError> {
        use jetstream::consumer::DeliverPolicy;
        let filter = format!(
            "handoff.v1.events.{}.{}",
            run_id.unwrap_or("*"),
            kind.map_or("*", |k| k.token())
        );
        let deliver_policy = if from_sequence > 0 {
            DeliverPolicy::ByStartSequence {
                start_sequence: from_sequence,
            }
        } else {
            DeliverPolicy::New
        };
        let consumer = self
            .events
            .create_consumer(pull::OrderedConfig {
                filter_subject: filter,
                deliver_policy,
                ..Default::default()
            })
            .await
            .map_err(|e| BrokerError::nats("watching", e))?;
        let messages = consumer
            .messages()
            .await
            .map_err(|e| BrokerError::nats("watching", e))?;
        Ok(messages
            .filter_map(|msg| async move {
                let msg = match msg {
                    Ok(m) => m,
                    Err(e) => return Some(Err(BrokerError::nats("watching", e))),
                };
                let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
                match pb::Event::decode(msg.payload.clone()) {
                    Ok(mut event) => {
                        event.sequence = seq;
                        Some(Ok(event))
                    }
                    Err(_) => {
                        tracing::warn!(seq, "undecodable event skipped");
                        None
                    }
                }
            })
            .boxed())
    }

    /// Reads a run and its revision.
    async fn run(&self, run_id: &str) -> Result<Option<(pb::Run, u64)>> {
        let entry = self
            .runs
            .entry(run_id)
            .await
            .map_err(|e| BrokerError::nats("reading the run", e))?;
        match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                let run = pb::Run::decode(e.value).map_err(|err| {
                    BrokerError::Internal(format!("stored run {run_id} does not decode: {err}"))
                })?;
                Ok(Some((run, e.revision)))
            }
            _ => Ok(None),
        }
    }

    /// Creates a run; `Ok(false)` if one with that id exists.
    async fn create_run(&self, run: &pb::Run) -> Result<bool> {
        match self.runs.create(&run.id, run.encode_to_vec().into()).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(BrokerError::nats("creating the run", e)),
        }
    }

    /// Writes a run if its revision is still `revision`; `Ok(false)` when
    /// another writer got there first.
    async fn update_run(&self, run: &pb::Run, revision: u64) -> Result<bool> {
        match self
            .runs
            .update(&run.id, run.encode_to_vec().into(), revision)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(false),
            Err(e) => Err(BrokerError::nats("updating the run", e)),
        }
    }

    /// Reads an agent spec.
    async fn purge_run(&self, run_id: &str, keep_events_from: u64) -> Result<()> {
        let state = self.js.get_stream_no_info(format!("KV_{STATE_BUCKET}"));
        let barriers = self.js.get_stream_no_info(format!("KV_{BARRIERS_BUCKET}"));
        let runs = self.js.get_stream_no_info(format!("KV_{RUNS_BUCKET}"));
        let (state, barriers, runs) = tokio::try_join!(state, barriers, runs)
            .map_err(|e| BrokerError::nats("opening the run's buckets", e))?;
        let failed = |e| BrokerError::nats("purging a run", e);
        let events = self
            .events
            .purge()
            .filter(format!("handoff.v1.events.{run_id}.>"))
            .sequence(keep_events_from);
        let branches = self
            .branches
            .purge()
            .filter(format!("handoff.v1.branches.{run_id}.>"));
        let state = state
            .purge()
            .filter(format!("$KV.{STATE_BUCKET}.{run_id}.>"));
        let barriers = barriers
            .purge()
            .filter(format!("$KV.{BARRIERS_BUCKET}.{run_id}.>"));
        // Its deadline and barrier timers, when they have not fired.
        let deadline = self
            .timers
            .purge()
            .filter(format!("handoff.v1.timers.run.{run_id}"));
        let barrier_timers = self
            .timers
            .purge()
            .filter(format!("handoff.v1.timers.barrier.{run_id}.>"));
        tokio::try_join!(
            events.into_future(),
            branches.into_future(),
            state.into_future(),
            barriers.into_future(),
            deadline.into_future(),
            barrier_timers.into_future(),
        )
        .map_err(failed)?;
        // The run record last: while it is there, the purge is not done.
        runs.purge()
            .filter(format!("$KV.{RUNS_BUCKET}.{run_id}"))
            .await
            .map_err(failed)?;
        Ok(())
    }

    async fn agent(&self, name: &str) -> Result<Option<pb::AgentSpec>> {
        let value = self
            .agents
            .get(name)
            .await
            .map_err(|e| BrokerError::nats("reading the agent", e))?;
        value
            .map(|v| {
                pb::AgentSpec::decode(v).map_err(|e| {
                    BrokerError::Internal(format!("stored agent {name} does not decode: {e}"))
                })
            })
            .transpose()
    }

    /// Stores an agent spec; returns whether it existed before.
    async fn put_agent(&self, spec: &pb::AgentSpec) -> Result<bool> {
        let existed = self.agent(&spec.name).await?.is_some();
        self.agents
            .put(&spec.name, spec.encode_to_vec().into())
            .await
            .map_err(|e| BrokerError::nats("storing the agent", e))?;
        Ok(existed)
    }

    /// Every registered agent, by name.
    async fn agents(&self) -> Result<Vec<pb::AgentSpec>> {
        let keys: Vec<String> = match self.agents.keys().await {
            Ok(k) => k
                .try_collect()
                .await
                .map_err(|e| BrokerError::nats("listing agents", e))?,
            Err(e) => return Err(BrokerError::nats("listing agents", e)),
        };
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            if let Some(a) = self.agent(&k).await? {
                out.push(a);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Reads one contract version.
    async fn contract(&self, message_type: &str, version: u32) -> Result<Option<pb::Contract>> {
        let key = contract_key(message_type, version);
        let value = self
            .contracts
            .get(&key)
            .await
            .map_err(|e| BrokerError::nats("reading the contract", e))?;
        value
            .map(|v| {
                pb::Contract::decode(v).map_err(|e| {
                    BrokerError::Internal(format!("stored contract {key} does not decode: {e}"))
                })
            })
            .transpose()
    }

    /// Stores a new contract version unless that version exists; returns
    /// whether it was created (compare-and-set on the version's key).
    async fn create_contract(&self, contract: &pb::Contract) -> Result<bool> {
        let key = contract_key(&contract.message_type, contract.version);
        match self
            .contracts
            .create(&key, contract.encode_to_vec().into())
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(BrokerError::nats("storing the contract", e)),
        }
    }

    async fn contract_versions(&self) -> Result<Vec<(String, u32)>, BrokerError> {
        let keys: Vec<String> = match self.contracts.keys().await {
            Ok(k) => k
                .try_collect()
                .await
                .map_err(|e| BrokerError::nats("listing contracts", e))?,
            Err(e) => return Err(BrokerError::nats("listing contracts", e)),
        };
        Ok(keys
            .iter()
            .filter_map(|k| parse_contract_key(k))
            .map(|(t, v)| (t.to_string(), v))
            .collect())
    }

    async fn contract_mode(&self, message_type: &str) -> Result<Option<(pb::ContractMode, u64)>> {
        read(&self.contract_modes, message_type).await
    }

    async fn put_contract_mode(
        &self,
        mode: &pb::ContractMode,
        revision: Option<u64>,
    ) -> Result<bool> {
        self.write(
            &self.contract_modes,
            &mode.message_type,
            mode.encode_to_vec().into(),
            revision,
        )
        .await
    }

    /// Records the first handoff made from a consumed delivery, or returns
    /// the one recorded before.
    async fn claim_consumed(
        &self,
        consumed_handoff: &str,
        claim: &pb::ConsumeClaim,
    ) -> Result<Claim> {
        let created = self
            .consumed
            .create(consumed_handoff, claim.encode_to_vec().into())
            .await;
        match created {
            Ok(revision) => Ok(Claim::Made(revision)),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                match self.claim(consumed_handoff).await? {
                    Some((held, revision)) => Ok(Claim::Held(held, revision)),
                    // Withdrawn or expired between the two calls: try again.
                    None => Box::pin(self.claim_consumed(consumed_handoff, claim)).await,
                }
            }
            Err(e) => Err(BrokerError::nats("recording the consumed delivery", e)),
        }
    }

    /// Withdraws a claim this broker made for a handoff it did not store
    /// (only if nothing changed it since). A failure is logged: the claim
    /// then only refuses other targets for that delivery.
    async fn claim(
        &self,
        consumed_handoff: &str,
    ) -> Result<Option<(pb::ConsumeClaim, u64)>, BrokerError> {
        read(&self.consumed, consumed_handoff).await
    }

    async fn update_claim(
        &self,
        consumed_handoff: &str,
        claim: &pb::ConsumeClaim,
        revision: u64,
    ) -> Result<Option<u64>, BrokerError> {
        match self
            .consumed
            .update(consumed_handoff, claim.encode_to_vec().into(), revision)
            .await
        {
            Ok(next) => Ok(Some(next)),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(None),
            Err(e) => Err(BrokerError::nats("updating the claim", e)),
        }
    }

    async fn release_claim(&self, consumed_handoff: &str, revision: u64) {
        if let Err(e) = self
            .consumed
            .delete_expect_revision(consumed_handoff, Some(revision))
            .await
        {
            tracing::warn!(consumed_handoff, error = %e, "claim on a consumed delivery not withdrawn");
        }
    }

    /// A barrier and its revision.
    async fn barrier(&self, run_id: &str, barrier_id: &str) -> Result<Option<(pb::Barrier, u64)>> {
        let key = barrier_key(run_id, barrier_id);
        let entry = self
            .barriers
            .entry(&key)
            .await
            .map_err(|e| BrokerError::nats("reading the barrier", e))?;
        match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                let barrier = pb::Barrier::decode(e.value).map_err(|err| {
                    BrokerError::Internal(format!("stored barrier {key} does not decode: {err}"))
                })?;
                Ok(Some((barrier, e.revision)))
            }
            _ => Ok(None),
        }
    }

    async fn state_record(&self, run_id: &str, revision: u64) -> Result<Option<pb::StateRecord>> {
        let key = format!("{run_id}.{revision}");
        let entry = self
            .state
            .entry(&key)
            .await
            .map_err(|e| BrokerError::nats("reading the run state", e))?;
        match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                let record = pb::StateRecord::decode(e.value).map_err(|err| {
                    BrokerError::Internal(format!("stored run state {key} does not decode: {err}"))
                })?;
                Ok(Some(record))
            }
            _ => Ok(None),
        }
    }

    async fn create_state_record(&self, record: &pb::StateRecord) -> Result<bool> {
        let key = format!("{}.{}", record.run_id, record.revision);
        match self
            .state
            .create(key.as_str(), record.encode_to_vec().into())
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(BrokerError::nats("storing the run state", e)),
        }
    }

    async fn state_head(&self, run_id: &str) -> Result<u64> {
        let key = format!("{run_id}.head");
        let entry = self
            .state
            .entry(&key)
            .await
            .map_err(|e| BrokerError::nats("reading the run state's head", e))?;
        Ok(match entry {
            Some(e) if e.operation == kv::Operation::Put => std::str::from_utf8(&e.value)
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0),
            _ => 0,
        })
    }

    async fn set_state_head(&self, run_id: &str, revision: u64) -> Result<()> {
        self.state
            .put(
                format!("{run_id}.head"),
                revision.to_string().into_bytes().into(),
            )
            .await
            .map(|_| ())
            .map_err(|e| BrokerError::nats("recording the run state's head", e))
    }

    /// Creates a barrier unless it exists; returns whether it was created.
    async fn create_barrier(&self, barrier: &pb::Barrier) -> Result<bool> {
        let spec = barrier.spec.clone().unwrap_or_default();
        let key = barrier_key(&spec.run_id, &spec.barrier_id);
        match self
            .barriers
            .create(key.as_str(), barrier.encode_to_vec().into())
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(BrokerError::nats("storing the barrier", e)),
        }
    }

    async fn create_barrier_keys(&self, spec: &pb::BarrierSpec) -> Result<()> {
        let key = barrier_keys_key(&spec.run_id, &spec.barrier_id);
        match self
            .barriers
            .create(key.as_str(), spec.encode_to_vec().into())
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(BrokerError::nats("storing the barrier's keys", e)),
        }
    }

    async fn barrier_keys(
        &self,
        run_id: &str,
        barrier_id: &str,
    ) -> Result<Option<pb::BarrierSpec>> {
        read(&self.barriers, &barrier_keys_key(run_id, barrier_id))
            .await
            .map(|found| found.map(|(spec, _)| spec))
    }

    /// Compare-and-set of a barrier; false when another write came first.
    async fn update_barrier_at(&self, barrier: &pb::Barrier, revision: u64) -> Result<Option<u64>> {
        let spec = barrier.spec.clone().unwrap_or_default();
        let key = barrier_key(&spec.run_id, &spec.barrier_id);
        match self
            .barriers
            .update(key.as_str(), barrier.encode_to_vec().into(), revision)
            .await
        {
            Ok(written) => Ok(Some(written)),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(None),
            Err(e) => Err(BrokerError::nats("updating the barrier", e)),
        }
    }

    /// Notes that a branch result reached a barrier not yet opened, so
    /// that opening it looks for stored results (idempotent).
    async fn mark_early_branch(&self, run_id: &str, barrier_id: &str) -> Result<()> {
        self.barriers
            .put(early_key(run_id, barrier_id), Bytes::new())
            .await
            .map(|_| ())
            .map_err(|e| BrokerError::nats("noting an early branch", e))
    }

    /// Whether a branch result reached this barrier before it was opened.
    async fn has_early_branch(&self, run_id: &str, barrier_id: &str) -> Result<bool> {
        self.barriers
            .entry(early_key(run_id, barrier_id))
            .await
            .map(|e| e.is_some_and(|e| e.operation == kv::Operation::Put))
            .map_err(|e| BrokerError::nats("reading the barrier", e))
    }

    /// Published with the handoff id as message id (a retry is
    /// deduplicated) and an expected last sequence of 0 on the key's
    /// subject, so the stream itself keeps only a key's first result.
    async fn put_branch_result(
        &self,
        run_id: &str,
        barrier_id: &str,
        result: &pb::BranchResult,
    ) -> Result<BranchPut, BrokerError> {
        let subject = branch_subject(run_id, barrier_id, &result.key);
        let message = jetstream::message::PublishMessage::build()
            .payload(result.encode_to_vec().into())
            .message_id(&result.handoff_id)
            .expected_last_subject_sequence(0);
        let sent = self
            .js
            .send_publish(subject.clone(), message)
            .await
            .map_err(|e| BrokerError::nats("publishing a branch result", e))?;
        match sent.await {
            Ok(ack) => Ok(BranchPut::Stored(Stored {
                sequence: ack.sequence,
                duplicate: ack.duplicate,
            })),
            Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => {
                let first = self
                    .branch_result(run_id, barrier_id, &result.key)
                    .await?
                    .ok_or_else(|| {
                        BrokerError::Unavailable(format!(
                            "branch {} has a result that cannot be read back yet",
                            result.key
                        ))
                    })?;
                if first.handoff_id == result.handoff_id {
                    Ok(BranchPut::Stored(Stored {
                        sequence: first.sequence,
                        duplicate: true,
                    }))
                } else {
                    Ok(BranchPut::Taken(Box::new(first)))
                }
            }
            Err(e) => Err(BrokerError::nats("storing a branch result", e)),
        }
    }

    async fn branch_result(
        &self,
        run_id: &str,
        barrier_id: &str,
        key: &str,
    ) -> Result<Option<pb::BranchResult>, BrokerError> {
        let subject = branch_subject(run_id, barrier_id, key);
        let msg = match self
            .branches
            .get_last_raw_message_by_subject(&subject)
            .await
        {
            Ok(m) => m,
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {
                return Ok(None)
            }
            Err(e) => return Err(BrokerError::nats("reading a branch result", e)),
        };
        let mut result = pb::BranchResult::decode(msg.payload).map_err(|e| {
            BrokerError::Internal(format!(
                "stored branch result {subject} does not decode: {e}"
            ))
        })?;
        result.sequence = msg.sequence;
        Ok(Some(result))
    }

    /// Every branch result stored for a barrier, in stream order, each
    /// with its stream sequence (a retried or late branch may appear more
    /// than once under its key).
    async fn branch_results(
        &self,
        run_id: &str,
        barrier_id: &str,
    ) -> Result<Vec<pb::BranchResult>> {
        let filter = format!("handoff.v1.branches.{run_id}.{barrier_id}.>");
        let consumer = self
            .branches
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                filter_subject: filter,
                deliver_policy: jetstream::consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .map_err(|e| BrokerError::nats("reading branch results", e))?;
        let mut pending = consumer.cached_info().num_pending;
        let mut out = Vec::new();
        if pending == 0 {
            return Ok(out);
        }
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| BrokerError::nats("reading branch results", e))?;
        while pending > 0 {
            let next = tokio::time::timeout(self.ack_timeout, messages.next())
                .await
                .map_err(|_| {
                    BrokerError::Unavailable("reading branch results timed out".to_string())
                })?;
            let Some(msg) = next else {
                break;
            };
            let msg = msg.map_err(|e| BrokerError::nats("reading branch results", e))?;
            let (left, sequence) = msg
                .info()
                .map(|i| (i.pending, i.stream_sequence))
                .unwrap_or((0, 0));
            pending = left;
            match pb::BranchResult::decode(msg.payload.clone()) {
                Ok(mut r) => {
                    r.sequence = sequence;
                    out.push(r);
                }
                Err(e) => tracing::warn!(error = %e, "undecodable branch result skipped"),
            }
        }
        Ok(out)
    }

    async fn lease(&self, agent: &str, sequence: u64) -> Result<Option<(pb::Lease, u64)>> {
        read(&self.leases, &format!("{agent}.{sequence}")).await
    }

    async fn put_lease(
        &self,
        agent: &str,
        sequence: u64,
        lease: &pb::Lease,
        revision: Option<u64>,
    ) -> Result<bool> {
        // The record lives until its lease's deadline and LEASE_RECORD_GRACE
        // after it (see the constant), then expires by itself.
        let left = lease
            .deadline
            .and_then(|t| std::time::SystemTime::try_from(t).ok())
            .and_then(|t| t.duration_since(std::time::SystemTime::now()).ok())
            .unwrap_or_default();
        let ttl = Duration::from_secs((left + LEASE_RECORD_GRACE).as_secs_f64().ceil() as u64);
        let message = jetstream::message::PublishMessage::build()
            .payload(lease.encode_to_vec().into())
            .expected_last_subject_sequence(revision.unwrap_or(0))
            .ttl(ttl);
        let sent = self
            .js
            .send_publish(format!("$KV.{LEASES_BUCKET}.{agent}.{sequence}"), message)
            .await
            .map_err(|e| BrokerError::nats("recording a lease", e))?;
        match sent.await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => {
                Ok(false)
            }
            Err(e) => Err(BrokerError::nats("recording a lease", e)),
        }
    }

    async fn signing_keys(&self) -> Result<Option<(pb::SigningKeys, u64)>> {
        read(&self.keys, "delivery").await
    }

    async fn put_signing_keys(
        &self,
        keys: &pb::SigningKeys,
        revision: Option<u64>,
    ) -> Result<bool> {
        self.write(
            &self.keys,
            "delivery",
            keys.encode_to_vec().into(),
            revision,
        )
        .await
    }

    async fn principal(&self, name: &str) -> Result<Option<pb::Principal>> {
        Ok(read(&self.principals, name).await?.map(|(p, _)| p))
    }

    async fn put_principal(&self, principal: &pb::Principal) -> Result<bool> {
        let existed = self.principal(&principal.name).await?.is_some();
        self.principals
            .put(&principal.name, principal.encode_to_vec().into())
            .await
            .map_err(|e| BrokerError::nats("storing the principal", e))?;
        Ok(existed)
    }

    async fn principals(&self) -> Result<Vec<pb::Principal>> {
        let mut out: Vec<pb::Principal> = Self::all(&self.principals).await?;
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn token(&self, id: &str) -> Result<Option<(pb::ApiToken, u64)>> {
        read(&self.tokens, id).await
    }

    async fn put_token(&self, token: &pb::ApiToken, revision: Option<u64>) -> Result<bool> {
        self.write(
            &self.tokens,
            &token.id,
            token.encode_to_vec().into(),
            revision,
        )
        .await
    }

    async fn tokens(&self) -> Result<Vec<pb::ApiToken>> {
        let mut out: Vec<pb::ApiToken> = Self::all(&self.tokens).await?;
        out.sort_by(|a, b| {
            a.created_at
                .map(|t| (t.seconds, t.nanos))
                .cmp(&b.created_at.map(|t| (t.seconds, t.nanos)))
        });
        Ok(out)
    }

    async fn put_payload(&self, name: &str, value: Bytes) -> Result<PayloadInfo> {
        if let Some(kept) = self.payload_info(name).await? {
            let young = kept
                .stored_at
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age < self.retention / 2);
            if young && kept.size == value.len() as u64 {
                return Ok(kept);
            }
        }
        let chunk = match self.client.server_info().max_payload {
            0 => PAYLOAD_CHUNK,
            max => PAYLOAD_CHUNK.min(max.saturating_sub(4096).max(4096)),
        };
        let meta = async_nats::jetstream::object_store::ObjectMetadata {
            name: name.to_string(),
            chunk_size: Some(chunk),
            ..Default::default()
        };
        let mut reader = std::io::Cursor::new(value);
        let info = self
            .payloads
            .put(meta, &mut reader)
            .await
            .map_err(|e| BrokerError::nats(&format!("storing payload {name}"), e))?;
        Ok(payload_info(&info))
    }

    async fn payload_info(&self, name: &str) -> Result<Option<PayloadInfo>> {
        use async_nats::jetstream::object_store::InfoErrorKind;
        match self.payloads.info(name).await {
            Ok(info) if info.deleted => Ok(None),
            Ok(info) => Ok(Some(payload_info(&info))),
            Err(e) if e.kind() == InfoErrorKind::NotFound => Ok(None),
            Err(e) => Err(BrokerError::nats(&format!("reading payload {name}"), e)),
        }
    }

    async fn get_payload(&self, name: &str) -> Result<Option<Bytes>> {
        use async_nats::jetstream::object_store::GetErrorKind;
        use tokio::io::AsyncReadExt as _;
        let mut object = match self.payloads.get(name).await {
            Ok(o) => o,
            Err(e) if e.kind() == GetErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(BrokerError::nats(&format!("reading payload {name}"), e)),
        };
        if object.info().deleted {
            return Ok(None);
        }
        let mut value = Vec::with_capacity(object.info().size);
        object
            .read_to_end(&mut value)
            .await
            .map_err(|e| BrokerError::nats(&format!("reading payload {name}"), e))?;
        Ok(Some(Bytes::from(value)))
    }

    async fn schedule(&self, timer: &pb::Timer, kind: TimerKind) -> Result<(), BrokerError> {
        let (run, barrier) = (&timer.run_id, &timer.barrier_id);
        let (subject, msg_id) = match kind {
            TimerKind::RunDeadline => (
                format!("handoff.v1.timers.run.{run}"),
                format!("deadline-{run}"),
            ),
            TimerKind::BarrierTimeout => (
                format!("handoff.v1.timers.barrier.{run}.{barrier}.timeout"),
                format!("barrier-timeout-{run}-{barrier}"),
            ),
            TimerKind::ReleaseCheck => (
                format!("handoff.v1.timers.barrier.{run}.{barrier}.release"),
                format!("barrier-release-{run}-{barrier}"),
            ),
            TimerKind::RunPurge => (
                format!("handoff.v1.timers.purge.{run}"),
                format!("purge-{run}"),
            ),
            TimerKind::QueueWait => (
                format!("handoff.v1.timers.queue.{}.{}", timer.agent, timer.sequence),
                format!("queue-{}-{}", timer.agent, timer.sequence),
            ),
        };
        self.publish(subject, &msg_id, timer.encode_to_vec().into())
            .await
            .map(|_| ())
    }
}

/// The oldest nats-server the broker runs on: 2.12 brought per-message
/// TTL, atomic batch publish and batch direct get (and every version since
/// 2.9.21 checks a write's expected revision as part of replicating it, so
/// of two compare-and-set writes racing on a replicated stream only one is
/// stored: nats-server#4320).
pub const MIN_NATS_SERVER: (u64, u64, u64) = (2, 12, 0);

/// Whether a nats-server of `version` is one the broker runs on.
pub fn current_enough(version: &str) -> bool {
    version_of(version) >= MIN_NATS_SERVER
}

/// A nats-server version as (major, minor, patch); what does not parse is 0.
fn version_of(version: &str) -> (u64, u64, u64) {
    let mut parts = version
        .trim_start_matches('v')
        .split(['.', '-', '+'])
        .map(|p| p.parse::<u64>().unwrap_or(0));
    (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    )
}

/// Refuses a NATS without JetStream with a message that says what to do.
async fn check_jetstream(client: &async_nats::Client) -> Result<(), BrokerError> {
    let hint = "start nats-server with -js (or a `jetstream {}` block in its config)";
    let reply = client
        .request("$JS.API.INFO", Bytes::new())
        .await
        .map_err(|e| match e.kind() {
            async_nats::RequestErrorKind::NoResponders => {
                BrokerError::Unavailable(format!("NATS has no JetStream; {hint}"))
            }
            _ => BrokerError::nats("asking NATS for JetStream", e),
        })?;
    let info: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap_or_default();
    if let Some(err) = info.get("error") {
        return Err(BrokerError::Unavailable(format!(
            "NATS JetStream is not usable ({err}); {hint}"
        )));
    }
    Ok(())
}

/// A stored object's size, hex SHA-256 and time, from its info (whose
/// digest reads `SHA-256=<base64url>`).
fn payload_info(info: &async_nats::jetstream::object_store::ObjectInfo) -> PayloadInfo {
    use base64::Engine as _;
    let sha256 = info
        .digest
        .as_deref()
        .and_then(|d| d.strip_prefix("SHA-256="))
        .and_then(|b| {
            base64::engine::general_purpose::URL_SAFE
                .decode(b)
                .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(b))
                .ok()
        })
        .map(|raw| raw.iter().map(|b| format!("{b:02x}")).collect())
        .unwrap_or_default();
    PayloadInfo {
        size: info.size as u64,
        sha256,
        stored_at: info.modified.map(std::time::SystemTime::from),
    }
}

async fn ensure_stream(
    js: &jetstream::Context,
    config: stream::Config,
) -> Result<stream::Stream, BrokerError> {
    let name = config.name.clone();
    let replicas = config.num_replicas;
    let mut config = config;
    match js.get_stream(&name).await {
        Ok(mut s) => {
            let info = s
                .info()
                .await
                .map_err(|e| BrokerError::nats("reading stream info", e))?;
            let current = info.config.clone();
            config.max_bytes = byte_limit(&name, config.max_bytes, &current, info.state.bytes);
            if current.duplicate_window != config.duplicate_window
                || current.retention != config.retention
                || current.max_age != config.max_age
                || current.num_replicas != config.num_replicas
                || current.allow_direct != config.allow_direct
                || current.max_bytes != config.max_bytes
                || current.discard != config.discard
            {
                let rescaled = current.num_replicas != config.num_replicas;
                js.update_stream(config)
                    .await
                    .map_err(|e| placement(&format!("updating stream {name}"), replicas, e))?;
                if rescaled {
                    await_replicas(js, &name, replicas).await?;
                }
            }
            js.get_stream(&name)
                .await
                .map_err(|e| BrokerError::nats(&format!("opening stream {name}"), e))
        }
        Err(_) => js
            .create_stream(config)
            .await
            .map_err(|e| placement(&format!("creating stream {name}"), replicas, e)),
    }
}

/// The byte limit to give an existing stream that holds `stored` bytes:
/// the configured one, unless that is no more than what it holds (a limit
/// lowered under the stored size would, on nats-server before 2.11,
/// discard its oldest messages, and on later ones refuse every write): then
/// its current limit stays, with a warning naming the key to raise.
fn byte_limit(name: &str, wanted: i64, current: &stream::Config, stored: u64) -> i64 {
    let fits = wanted <= 0 || u64::try_from(wanted).is_ok_and(|w| w > stored);
    if fits || current.max_bytes == wanted {
        return wanted;
    }
    tracing::warn!(
        stream = name,
        stored,
        wanted,
        kept = current.max_bytes,
        "the stream holds more than its configured byte limit (stream_max_bytes or events_max_bytes): its limit stays as it was; raise the key"
    );
    current.max_bytes
}

/// How long a stream whose replicas changed may take to elect a leader and
/// bring its new replicas up to date.
const RESCALE_TIMEOUT: Duration = Duration::from_secs(60);

/// Waits until stream `name`, just given `replicas` replicas, has a leader
/// and that many replicas, all current: until then its reads and writes
/// time out.
async fn await_replicas(
    js: &jetstream::Context,
    name: &str,
    replicas: usize,
) -> Result<(), BrokerError> {
    let deadline = tokio::time::Instant::now() + RESCALE_TIMEOUT;
    loop {
        let last = match js.get_stream(name).await {
            Ok(mut stream) => match stream.info().await {
                Ok(info) => {
                    let followers = info
                        .cluster
                        .as_ref()
                        .map(|c| {
                            c.replicas
                                .iter()
                                .filter(|p| p.current && !p.offline)
                                .count()
                        })
                        .unwrap_or(0);
                    let led = info.cluster.as_ref().is_some_and(|c| c.leader.is_some());
                    if info.config.num_replicas == replicas
                        && (replicas == 1 || (led && followers + 1 == replicas))
                    {
                        tracing::info!(stream = name, replicas, "stream replicated");
                        return Ok(());
                    }
                    format!(
                        "{} of {replicas} replicas current",
                        followers + usize::from(led)
                    )
                }
                Err(e) => e.to_string(),
            },
            Err(e) => e.to_string(),
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(BrokerError::Unavailable(format!(
                "stream {name} did not reach replicas = {replicas} within {RESCALE_TIMEOUT:?} ({last})"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A failure to create or update a stream, with what to do when the
/// cluster cannot hold the configured replicas.
fn placement(context: &str, replicas: usize, err: impl std::fmt::Display) -> BrokerError {
    let text = err.to_string();
    if text.contains("10047") || text.contains("insufficient storage") {
        return BrokerError::Unavailable(format!(
            "{context}: JetStream cannot reserve the stream's byte limit ({text}); every stream and bucket reserves stream_max_bytes (events_max_bytes for the events) on each server, and together they must fit the server's max_file_store: lower them, or give JetStream more storage"
        ));
    }
    let cannot_hold = [
        "10074",
        "10023",
        "10005",
        "insufficient resources",
        "no suitable peers",
        "replicas > 1 not supported",
    ]
    .iter()
    .any(|m| text.contains(m));
    if cannot_hold {
        BrokerError::Unavailable(format!(
            "{context}: the NATS JetStream cluster cannot hold replicas = {replicas} ({text}); \
             replicas needs that many JetStream servers in one cluster: set replicas to at most their number"
        ))
    } else {
        BrokerError::nats(context, err)
    }
}

/// Creates a key/value bucket's backing stream the way KV clients expect
/// it (so it works on nats-server 2.9, whose account info newer clients
/// cannot parse), or brings an existing one to the configured replicas,
/// then opens the bucket.
///
/// With replicas, direct gets are off: a bucket is read from its stream's
/// leader, which has every write acknowledged before the read, so no
/// replica of the broker decides on a value a lagging follower still
/// holds. A bucket of one replica has no follower to lag, and keeps direct
/// gets: they answer the raw value, where the API's answer is JSON with
/// the value in base64 (a barrier of 1000 branches is 160 KB).
async fn ensure_bucket(
    js: &jetstream::Context,
    config: kv::Config,
) -> Result<kv::Store, BrokerError> {
    ensure_bucket_with(js, config, false).await
}

/// [`ensure_bucket`], with per-message TTL allowed when `ttl` (a bucket
/// whose values expire one by one); once allowed, it stays allowed.
async fn ensure_bucket_with(
    js: &jetstream::Context,
    config: kv::Config,
    ttl: bool,
) -> Result<kv::Store, BrokerError> {
    let name = config.bucket.clone();
    let replicas = config.num_replicas.max(1);
    let stream = stream::Config {
        name: format!("KV_{name}"),
        subjects: vec![format!("$KV.{name}.>")],
        max_messages_per_subject: config.history.max(1),
        max_age: config.max_age,
        storage: config.storage,
        num_replicas: replicas,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: replicas == 1,
        max_messages: -1,
        max_bytes: config.max_bytes,
        max_message_size: -1,
        discard: stream::DiscardPolicy::New,
        duplicate_window: dedupe_window_within(config.max_age),
        allow_message_ttl: ttl,
        ..Default::default()
    };
    match js.get_stream(&stream.name).await {
        Ok(mut existing) => {
            let info = existing
                .info()
                .await
                .map_err(|e| BrokerError::nats(&format!("reading bucket {name}"), e))?;
            let mut current = info.config.clone();
            let max_bytes = byte_limit(&stream.name, stream.max_bytes, &current, info.state.bytes);
            let stream = stream::Config {
                max_bytes,
                ..stream.clone()
            };
            if current.num_replicas != replicas
                || current.allow_direct != stream.allow_direct
                || current.max_age != stream.max_age
                || current.max_bytes != stream.max_bytes
                || current.duplicate_window != stream.duplicate_window
                || (ttl && !current.allow_message_ttl)
            {
                let rescaled = current.num_replicas != replicas;
                current.num_replicas = replicas;
                current.allow_direct = stream.allow_direct;
                current.max_age = stream.max_age;
                current.max_bytes = stream.max_bytes;
                current.allow_message_ttl |= ttl;
                current.duplicate_window = stream.duplicate_window;
                js.update_stream(current)
                    .await
                    .map_err(|e| placement(&format!("updating bucket {name}"), replicas, e))?;
                if rescaled {
                    await_replicas(js, &stream.name, replicas).await?;
                }
            }
        }
        Err(_) => {
            if let Err(create) = js.create_stream(stream.clone()).await {
                // Another replica may have created it in the meantime.
                if js.get_stream(&stream.name).await.is_err() {
                    return Err(placement(
                        &format!("creating bucket {name}"),
                        replicas,
                        create,
                    ));
                }
            }
        }
    }
    js.get_key_value(&name)
        .await
        .map_err(|e| BrokerError::nats(&format!("opening bucket {name}"), e))
}

/// The dedupe window of a bucket or of the payload store: the 2 minutes
/// KV clients use, or the age limit when that is shorter (JetStream
/// refuses a window longer than the age limit).
fn dedupe_window_within(max_age: Duration) -> Duration {
    let window = Duration::from_secs(120);
    if max_age.is_zero() {
        window
    } else {
        window.min(max_age)
    }
}

/// Reads a protobuf value and its revision from a bucket (`None` when
/// absent or deleted).
async fn read<T: prost::Message + Default>(
    bucket: &kv::Store,
    key: &str,
) -> Result<Option<(T, u64)>, BrokerError> {
    let entry = bucket
        .entry(key)
        .await
        .map_err(|e| BrokerError::nats("reading the store", e))?;
    match entry {
        Some(e) if e.operation == kv::Operation::Put => T::decode(e.value)
            .map(|v| Some((v, e.revision)))
            .map_err(|err| BrokerError::Internal(format!("stored {key} does not decode: {err}"))),
        _ => Ok(None),
    }
}

/// True when `subject` is a JetStream ack subject of `agent`'s inbox
/// consumer for stream sequence `seq` (both the v1 and the v2 formats).
fn ack_subject_matches(subject: &str, agent: &str, seq: u64) -> bool {
    let parts: Vec<&str> = subject.split('.').collect();
    // v1: $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
    // v2: $JS.ACK.<domain>.<acc>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>[.<token>]
    let at = match parts.len() {
        9 => 2,
        11 | 12 => 4,
        _ => return false,
    };
    parts[0] == "$JS"
        && parts[1] == "ACK"
        && parts[at] == INBOX_STREAM
        && parts[at + 1] == agent
        && parts[at + 3].parse::<u64>().ok() == Some(seq)
}

/// Reads a stream's messages on `filter` from its start, up to `limit`,
/// with an ordered consumer (nothing is acked or left behind).
async fn read_stream(
    stream: &stream::Stream,
    filter: &str,
    limit: usize,
) -> Result<Vec<(u64, Bytes)>, BrokerError> {
    use jetstream::consumer::DeliverPolicy;
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: filter.to_string(),
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(|e| BrokerError::nats("reading events", e))?;
    let pending = consumer.cached_info().num_pending as usize;
    let want = pending.min(limit);
    let mut out = Vec::with_capacity(want);
    if want == 0 {
        return Ok(out);
    }
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| BrokerError::nats("reading events", e))?;
    while out.len() < want {
        let next = tokio::time::timeout(Duration::from_secs(5), messages.next())
            .await
            .map_err(|_| BrokerError::Unavailable("reading events timed out".to_string()))?;
        let Some(msg) = next else { break };
        let msg = msg.map_err(|e| BrokerError::nats("reading events", e))?;
        let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
        out.push((seq, msg.payload.clone()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_broker_needs_2_12_or_newer() {
        for old in ["2.9.10", "2.11.8", "2.10.4-beta.1", "1.4.1", "", "x"] {
            assert!(!current_enough(old), "{old}");
        }
        for new in ["2.12.0", "2.12.0-RC.1", "v2.15.1", "2.15.1", "3.0.0"] {
            assert!(current_enough(new), "{new}");
        }
    }

    #[test]
    fn ack_subjects_name_one_inbox_delivery() {
        assert!(ack_subject_matches(
            "$JS.ACK.HANDOFF_INBOX.worker.1.7.1.0.0",
            "worker",
            7
        ));
        for subject in [
            "$JS.ACK.HANDOFF_TIMERS.worker.1.7.1.0.0",
            "$JS.ACK.HANDOFF_INBOX.planner.1.7.1.0.0",
            "$JS.ACK.HANDOFF_INBOX.worker.1.8.1.0.0",
            "$JS.ACK.x",
        ] {
            assert!(!ack_subject_matches(subject, "worker", 7), "{subject}");
        }
        assert!(ack_subject_matches(
            "$JS.ACK.dom.acc.HANDOFF_INBOX.worker.1.7.1.0.0.tok",
            "worker",
            7
        ));
    }
}
