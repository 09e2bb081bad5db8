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
    Backlog, BranchPut, Claim, InboxMessage, Offered, PayloadInfo, Result, Settlement, Stored,
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

/// Key/value bucket of live subscribe sessions, keyed `<agent>.<session>`;
/// each record expires on its own unless its replica refreshes it.
pub const INSTANCES_BUCKET: &str = "handoff_instances";
/// The most the live-session bucket holds (and reserves on each server):
/// a record is about 150 bytes.
pub const INSTANCES_MAX_BYTES: i64 = 64 * 1024 * 1024;
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

/// Whether a write JetStream refused was refused for its expected last
/// sequence (a compare-and-set that lost): the error code 10071, which
/// names the stream's sequence, or 10164, the same refusal without it,
/// which nats-server 2.12 and newer give on some paths (a clustered
/// stream's leader) and which async-nats does not map to
/// `WrongLastSequence`. Looked for through the errors `err` wraps.
pub(crate) fn lost_compare_and_set(err: &(dyn std::error::Error + 'static)) -> bool {
    const WRONG_LAST_SEQUENCE: u64 = 10071;
    const WRONG_LAST_SEQUENCE_CONSTANT: u64 = 10164;
    crate::error::jetstream_error(err).is_some_and(|js| {
        let code = js.error_code().0;
        code == WRONG_LAST_SEQUENCE || code == WRONG_LAST_SEQUENCE_CONSTANT
    })
}

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
    /// Live subscribe sessions.
    pub instances: kv::Store,
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

    /// What every stream and bucket of the broker holds (see [`usage`]).
    pub async fn usage(&self) -> Result<Vec<(String, u64, u64, i64)>, BrokerError> {
        usage(&self.js).await
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
                Err(e) if lost_compare_and_set(&e) => Ok(false),
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

mod barriers;
mod setup;
pub use setup::{current_enough, MIN_NATS_SERVER};
mod claims;
mod events;
mod inboxes;
mod instances;
mod leases;
mod payloads;
mod registry;
mod runs;
mod secrets;
mod state;
mod timers;

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
    let name = consumer.cached_info().name.clone();
    let read = read_ordered(consumer, limit).await;
    // Deleted at once rather than left to expire: a caller polling GetRun
    // would otherwise pile up ephemeral consumers until JetStream refuses
    // more (maximum consumers limit reached).
    if let Err(e) = stream.delete_consumer(&name).await {
        tracing::debug!(error = %e, consumer = %name, "deleting a read's consumer failed");
    }
    read
}

async fn read_ordered(
    consumer: jetstream::consumer::Consumer<pull::OrderedConfig>,
    limit: usize,
) -> Result<Vec<(u64, Bytes)>, BrokerError> {
    let pending = consumer.cached_info().num_pending as usize;
    let want = pending.min(limit);
    let mut out = Vec::with_capacity(want);
    if want == 0 {
        return Ok(out);
    }
    // Every write read this way carries a message id; JetStream's
    // deduplication by it can miss across a change of the stream's leader
    // (a publish retried to the new leader while the old one's was still
    // being replicated): a read gives each id once, at its first copy.
    let mut ids = std::collections::HashSet::new();
    let mut read = 0;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| BrokerError::nats("reading events", e))?;
    while read < want {
        let next = tokio::time::timeout(Duration::from_secs(5), messages.next())
            .await
            .map_err(|_| BrokerError::Unavailable("reading events timed out".to_string()))?;
        let Some(msg) = next else { break };
        let msg = msg.map_err(|e| BrokerError::nats("reading events", e))?;
        read += 1;
        let id = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(NATS_MESSAGE_ID))
            .map(|v| v.as_str().to_string());
        if id.is_some_and(|id| !ids.insert(id)) {
            continue;
        }
        let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
        out.push((seq, msg.payload.clone()));
    }
    Ok(out)
}

/// What every stream and bucket of the broker holds: (name, bytes,
/// messages, byte limit), from one listing of JetStream's streams.
pub async fn usage(js: &jetstream::Context) -> Result<Vec<(String, u64, u64, i64)>, BrokerError> {
    let mut streams = js.streams();
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

#[cfg(test)]
mod tests {
    use super::*;

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
