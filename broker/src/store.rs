//! The JetStream adapter: streams, consumers and key/value buckets.
//!
//! Nothing authoritative lives in broker memory. Handoffs wait in the inbox
//! stream (one durable pull consumer per agent: explicit ack, ack wait =
//! lease), events go to the events stream, dead letters to their own
//! stream, run deadlines to a timer stream, and agents and runs are
//! key/value entries changed with compare-and-set. Every publish carries a
//! deterministic message id, so a retried step is recognised by JetStream
//! instead of stored twice.

use std::{collections::HashMap, time::Duration};

use async_nats::{
    header::{HeaderMap, NATS_MESSAGE_ID},
    jetstream::{self, consumer::pull, kv, stream},
};
use bytes::Bytes;
use handoff_proto::pb;
use prost::Message as _;

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
/// Key/value bucket of consumed deliveries: the first handoff made from
/// each, keyed by the consumed handoff's id.
pub const CONSUMED_BUCKET: &str = "handoff_consumed";

/// Branch results read at once when a release gathers their payloads:
/// enough that a 100-branch release takes one round of direct gets.
const BRANCH_READS: usize = 128;
/// Durable consumer of the timer stream, shared by every broker replica.
pub const TIMERS_CONSUMER: &str = "handoff_timers";

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

/// Key of the note that a branch result reached a barrier before it was
/// opened (names hold no `.`, so it cannot be a barrier's key).
fn early_key(run_id: &str, barrier_id: &str) -> String {
    format!("{run_id}.{barrier_id}.early")
}

/// Subject of an agent's dead letters.
pub fn dead_subject(agent: &str) -> String {
    format!("handoff.v1.dead.{agent}")
}

/// The first handoff made from a consumed delivery.
#[derive(Debug)]
pub enum Claim {
    /// This request made it, at this revision.
    Made(u64),
    /// Another request made it before.
    Held(pb::ConsumeClaim),
}

/// Handles to everything the broker keeps in JetStream.
#[derive(Clone)]
pub struct Store {
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
    /// Agent specs.
    pub agents: kv::Store,
    /// Runs.
    pub runs: kv::Store,
    /// Contract versions.
    pub contracts: kv::Store,
    /// Consumed deliveries.
    pub consumed: kv::Store,
    ack_timeout: Duration,
}

impl Store {
    /// Creates or updates the streams, buckets and timer consumer; safe to
    /// call from every replica at every start.
    pub async fn open(client: async_nats::Client, cfg: &Config) -> Result<Store, BrokerError> {
        let js = jetstream::new(client.clone());
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
                ..Default::default()
            };
        let inbox = ensure_stream(
            &js,
            base(
                INBOX_STREAM,
                "handoff.v1.inbox.>",
                stream::RetentionPolicy::Limits,
            ),
        )
        .await?;
        let events = ensure_stream(
            &js,
            base(
                EVENTS_STREAM,
                "handoff.v1.events.>",
                stream::RetentionPolicy::Limits,
            ),
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
            storage: stream::StorageType::File,
            num_replicas: replicas,
            ..Default::default()
        };
        let agents = ensure_bucket(&js, bucket(AGENTS_BUCKET, Duration::ZERO)).await?;
        let runs = ensure_bucket(&js, bucket(RUNS_BUCKET, Duration::ZERO)).await?;
        let contracts = ensure_bucket(&js, bucket(CONTRACTS_BUCKET, Duration::ZERO)).await?;
        let barriers = ensure_bucket(&js, bucket(BARRIERS_BUCKET, cfg.retention)).await?;
        // A claim matters as long as the consumed handoff can be consumed,
        // that is while the inbox keeps it.
        let consumed = ensure_bucket(&js, bucket(CONSUMED_BUCKET, cfg.retention)).await?;
        // Timers not yet due wait as pending (negatively acknowledged with a
        // delay), so the consumer must allow any number of them pending.
        let timer_consumer = pull::Config {
            durable_name: Some(TIMERS_CONSUMER.to_string()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            max_deliver: -1,
            max_ack_pending: -1,
            ..Default::default()
        };
        match timers.consumer_info(TIMERS_CONSUMER).await {
            Ok(info) if info.config.max_ack_pending == -1 => {}
            Ok(_) => {
                timers
                    .update_consumer(timer_consumer)
                    .await
                    .map_err(|e| BrokerError::nats("updating the timer consumer", e))?;
            }
            Err(_) => {
                timers
                    .create_consumer(timer_consumer)
                    .await
                    .map_err(|e| BrokerError::nats("creating the timer consumer", e))?;
            }
        }
        Ok(Store {
            client,
            js,
            inbox,
            events,
            dead,
            timers,
            agents,
            runs,
            contracts,
            consumed,
            branches,
            barriers,
            ack_timeout: cfg.connect_timeout.min(Duration::from_secs(5)),
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

    /// Publishes an event (deduplicated by `msg_id`) and returns its sequence.
    pub async fn publish_event(&self, event: &pb::Event, msg_id: &str) -> Result<u64, BrokerError> {
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

    /// Publishes an event (deduplicated by `msg_id`) as a plain NATS
    /// message: the events stream stores it, and no confirmation is
    /// awaited or sent.
    pub async fn publish_event_unconfirmed(
        &self,
        event: &pb::Event,
        msg_id: &str,
    ) -> Result<(), BrokerError> {
        let kind = pb::EventKind::try_from(event.kind).unwrap_or(pb::EventKind::Unspecified);
        let mut headers = HeaderMap::new();
        headers.insert(NATS_MESSAGE_ID, msg_id);
        self.client
            .publish_with_headers(
                event_subject(&event.run_id, kind),
                headers,
                event.encode_to_vec().into(),
            )
            .await
            .map_err(|e| BrokerError::nats("publishing", e))
    }

    /// Settles a delivery by its ack subject (`+ACK`, `-NAK`, `+TERM`,
    /// `+WPI`) and waits for JetStream's confirmation.
    pub async fn settle(
        &self,
        ack_subject: &str,
        kind: jetstream::AckKind,
    ) -> Result<(), BrokerError> {
        let body: Bytes = kind.into();
        let request = self.client.request(ack_subject.to_string(), body);
        match tokio::time::timeout(self.ack_timeout, request).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(BrokerError::nats("settling the delivery", e)),
            Err(_) => Err(BrokerError::Unavailable(
                "JetStream did not confirm the settlement in time".to_string(),
            )),
        }
    }

    /// Reads an inbox message by sequence; `None` if it is gone.
    pub async fn inbox_message(
        &self,
        seq: u64,
    ) -> Result<Option<jetstream::message::StreamMessage>, BrokerError> {
        match self.inbox.get_raw_message(seq).await {
            Ok(m) => Ok(Some(m)),
            Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(BrokerError::nats("reading the inbox", e)),
        }
    }

    /// Reads a run and its revision.
    pub async fn run(&self, run_id: &str) -> Result<Option<(pb::Run, u64)>, BrokerError> {
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

    /// Writes a run if its revision is still `revision`; `Ok(false)` when
    /// another writer got there first.
    pub async fn update_run(&self, run: &pb::Run, revision: u64) -> Result<bool, BrokerError> {
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

    /// Creates a run; `Ok(false)` if one with that id exists.
    pub async fn create_run(&self, run: &pb::Run) -> Result<bool, BrokerError> {
        match self.runs.create(&run.id, run.encode_to_vec().into()).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(BrokerError::nats("creating the run", e)),
        }
    }

    /// Reads an agent spec.
    pub async fn agent(&self, name: &str) -> Result<Option<pb::AgentSpec>, BrokerError> {
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
    pub async fn put_agent(&self, spec: &pb::AgentSpec) -> Result<bool, BrokerError> {
        let existed = self.agent(&spec.name).await?.is_some();
        self.agents
            .put(&spec.name, spec.encode_to_vec().into())
            .await
            .map_err(|e| BrokerError::nats("storing the agent", e))?;
        Ok(existed)
    }

    /// Every registered agent, by name.
    pub async fn list_agents(&self) -> Result<Vec<pb::AgentSpec>, BrokerError> {
        use futures::TryStreamExt;
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
    pub async fn contract(
        &self,
        message_type: &str,
        version: u32,
    ) -> Result<Option<pb::Contract>, BrokerError> {
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
    pub async fn create_contract(&self, contract: &pb::Contract) -> Result<bool, BrokerError> {
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

    /// The latest revision of the contracts bucket (0 when empty).
    pub async fn contracts_revision(&self) -> Result<u64, BrokerError> {
        let stream = self
            .js
            .get_stream(format!("KV_{CONTRACTS_BUCKET}"))
            .await
            .map_err(|e| BrokerError::nats("reading the contracts bucket", e))?;
        Ok(stream.cached_info().state.last_sequence)
    }

    /// Every stored contract version's key.
    pub async fn contract_keys(&self) -> Result<Vec<String>, BrokerError> {
        use futures::TryStreamExt;
        match self.contracts.keys().await {
            Ok(k) => k
                .try_collect()
                .await
                .map_err(|e| BrokerError::nats("listing contracts", e)),
            Err(e) => Err(BrokerError::nats("listing contracts", e)),
        }
    }

    /// Records the first handoff made from a consumed delivery, or returns
    /// the one recorded before.
    pub async fn claim_consumed(
        &self,
        consumed_handoff: &str,
        claim: &pb::ConsumeClaim,
    ) -> Result<Claim, BrokerError> {
        match self
            .consumed
            .create(consumed_handoff, claim.encode_to_vec().into())
            .await
        {
            Ok(revision) => Ok(Claim::Made(revision)),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                let value = self
                    .consumed
                    .get(consumed_handoff)
                    .await
                    .map_err(|e| BrokerError::nats("reading the consumed delivery", e))?;
                match value {
                    Some(v) => pb::ConsumeClaim::decode(v).map(Claim::Held).map_err(|e| {
                        BrokerError::Internal(format!("stored claim does not decode: {e}"))
                    }),
                    // Withdrawn or expired between the two calls: try again.
                    None => Box::pin(self.claim_consumed(consumed_handoff, claim)).await,
                }
            }
            Err(e) => Err(BrokerError::nats("recording the consumed delivery", e)),
        }
    }

    /// A barrier and its revision.
    pub async fn barrier(
        &self,
        run_id: &str,
        barrier_id: &str,
    ) -> Result<Option<(pb::Barrier, u64)>, BrokerError> {
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

    /// Creates a barrier unless it exists; returns whether it was created.
    pub async fn create_barrier(&self, barrier: &pb::Barrier) -> Result<bool, BrokerError> {
        let spec = barrier.spec.clone().unwrap_or_default();
        match self
            .barriers
            .create(
                barrier_key(&spec.run_id, &spec.barrier_id),
                barrier.encode_to_vec().into(),
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(BrokerError::nats("storing the barrier", e)),
        }
    }

    /// Notes that a branch result reached a barrier not yet opened, so
    /// that opening it looks for stored results (idempotent).
    pub async fn mark_early_branch(
        &self,
        run_id: &str,
        barrier_id: &str,
    ) -> Result<(), BrokerError> {
        self.barriers
            .put(early_key(run_id, barrier_id), Bytes::new())
            .await
            .map(|_| ())
            .map_err(|e| BrokerError::nats("noting an early branch", e))
    }

    /// Whether a branch result reached this barrier before it was opened.
    pub async fn has_early_branch(
        &self,
        run_id: &str,
        barrier_id: &str,
    ) -> Result<bool, BrokerError> {
        self.barriers
            .entry(early_key(run_id, barrier_id))
            .await
            .map(|e| e.is_some_and(|e| e.operation == kv::Operation::Put))
            .map_err(|e| BrokerError::nats("reading the barrier", e))
    }

    /// Compare-and-set of a barrier; false when another write came first.
    pub async fn update_barrier(
        &self,
        barrier: &pb::Barrier,
        revision: u64,
    ) -> Result<bool, BrokerError> {
        let spec = barrier.spec.clone().unwrap_or_default();
        match self
            .barriers
            .update(
                barrier_key(&spec.run_id, &spec.barrier_id),
                barrier.encode_to_vec().into(),
                revision,
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(false),
            Err(e) => Err(BrokerError::nats("updating the barrier", e)),
        }
    }

    /// Every branch result stored for a barrier, in stream order, each
    /// with its stream sequence (a retried or late branch may appear more
    /// than once under its key).
    pub async fn branch_results(
        &self,
        run_id: &str,
        barrier_id: &str,
    ) -> Result<Vec<pb::BranchResult>, BrokerError> {
        use futures::StreamExt;
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
            let Some(msg) = messages.next().await else {
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

    /// The payloads of branch results stored at `sequences`, read
    /// concurrently with direct gets (falling back to the stream leader for
    /// one a replica has not caught up with). A sequence no longer stored,
    /// or a result without a payload, is absent from the map.
    pub async fn branch_payloads(
        &self,
        sequences: &[u64],
    ) -> Result<HashMap<u64, prost_types::Any>, BrokerError> {
        use futures::{StreamExt, TryStreamExt};
        futures::stream::iter(sequences.iter().copied())
            .map(|seq| async move {
                let msg = match self.branches.direct_get(seq).await {
                    Ok(m) => Some(m),
                    Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => {
                        match self.branches.get_raw_message(seq).await {
                            Ok(m) => Some(m),
                            Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => {
                                None
                            }
                            Err(e) => return Err(BrokerError::nats("reading a branch result", e)),
                        }
                    }
                    Err(e) => return Err(BrokerError::nats("reading a branch result", e)),
                };
                Ok(msg
                    .and_then(|m| pb::BranchResult::decode(m.payload).ok())
                    .and_then(|r| r.payload)
                    .map(|p| (seq, p)))
            })
            .buffer_unordered(BRANCH_READS)
            .try_filter_map(|found| async move { Ok(found) })
            .try_collect()
            .await
    }

    /// Withdraws a claim this broker made for a handoff it did not store
    /// (only if nothing changed it since). A failure is logged: the claim
    /// then only refuses other targets for that delivery.
    pub async fn release_claim(&self, consumed_handoff: &str, revision: u64) {
        if let Err(e) = self
            .consumed
            .delete_expect_revision(consumed_handoff, Some(revision))
            .await
        {
            tracing::warn!(consumed_handoff, error = %e, "claim on a consumed delivery not withdrawn");
        }
    }

    /// Creates the agent's durable pull consumer, or updates its lease.
    pub async fn ensure_agent_consumer(
        &self,
        agent: &str,
        lease: Duration,
        max_ack_pending: i64,
    ) -> Result<(), BrokerError> {
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

    /// The pull consumer of an agent.
    pub async fn agent_consumer(
        &self,
        agent: &str,
    ) -> Result<async_nats::jetstream::consumer::PullConsumer, BrokerError> {
        self.inbox
            .get_consumer(agent)
            .await
            .map_err(|e| BrokerError::nats("opening the agent's consumer", e))
    }
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

async fn ensure_stream(
    js: &jetstream::Context,
    config: stream::Config,
) -> Result<stream::Stream, BrokerError> {
    let name = config.name.clone();
    match js.get_stream(&name).await {
        Ok(mut s) => {
            let current = s
                .info()
                .await
                .map_err(|e| BrokerError::nats("reading stream info", e))?
                .config
                .clone();
            if current.duplicate_window != config.duplicate_window
                || current.max_age != config.max_age
                || current.num_replicas != config.num_replicas
                || !current.allow_direct
            {
                js.update_stream(config)
                    .await
                    .map_err(|e| BrokerError::nats(&format!("updating stream {name}"), e))?;
            }
            js.get_stream(&name)
                .await
                .map_err(|e| BrokerError::nats(&format!("opening stream {name}"), e))
        }
        Err(_) => js
            .create_stream(config)
            .await
            .map_err(|e| BrokerError::nats(&format!("creating stream {name}"), e)),
    }
}

/// Creates a key/value bucket's backing stream the way KV clients expect
/// it (so it works on nats-server 2.9, whose account info newer clients
/// cannot parse), then opens the bucket.
async fn ensure_bucket(
    js: &jetstream::Context,
    config: kv::Config,
) -> Result<kv::Store, BrokerError> {
    let name = config.bucket.clone();
    let stream = stream::Config {
        name: format!("KV_{name}"),
        subjects: vec![format!("$KV.{name}.>")],
        max_messages_per_subject: config.history.max(1),
        max_age: config.max_age,
        storage: config.storage,
        num_replicas: config.num_replicas.max(1),
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        max_messages: -1,
        max_bytes: -1,
        max_message_size: -1,
        discard: stream::DiscardPolicy::New,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    };
    if js.get_stream(&stream.name).await.is_err() {
        if let Err(create) = js.create_stream(stream.clone()).await {
            // Another replica may have created it in the meantime.
            if js.get_stream(&stream.name).await.is_err() {
                return Err(BrokerError::nats(
                    &format!("creating bucket {name}"),
                    create,
                ));
            }
        }
    }
    js.get_key_value(&name)
        .await
        .map_err(|e| BrokerError::nats(&format!("opening bucket {name}"), e))
}
