//! Creating the streams, buckets and consumers on a nats-server recent enough.

use super::*;

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
        // A run's end is decided beside its state, atomically with the
        // final handoff's delta (an atomic batch).
        let state = ensure_bucket_with(
            &js,
            bucket(STATE_BUCKET, Duration::ZERO),
            Allow {
                atomic: true,
                ..Allow::default()
            },
        )
        .await?;
        // A claim matters as long as the consumed handoff can be consumed,
        // that is while the inbox keeps it.
        let consumed = ensure_bucket(&js, bucket(CONSUMED_BUCKET, cfg.retention)).await?;
        // Each lease record expires on its own (see `put_lease`); the
        // bucket's age limit only bounds a record written without one.
        let leases =
            ensure_bucket_with(&js, bucket(LEASES_BUCKET, LEASE_RECORD_AGE), Allow::TTL).await?;
        // Likewise each session's record (see `put_instance`). Its records
        // are small and few: it reserves at most INSTANCES_MAX_BYTES.
        let instances = kv::Config {
            max_bytes: match cfg.stream_max_bytes {
                limit if limit > 0 => limit.min(INSTANCES_MAX_BYTES),
                _ => INSTANCES_MAX_BYTES,
            },
            ..bucket(INSTANCES_BUCKET, LEASE_RECORD_AGE)
        };
        let instances = ensure_bucket_with(&js, instances, Allow::TTL).await?;
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
            instances,
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
fn placement(
    context: &str,
    replicas: usize,
    err: impl std::error::Error + Send + Sync + 'static,
) -> BrokerError {
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
    ensure_bucket_with(js, config, Allow::default()).await
}

/// What a bucket allows besides plain keys and values; once allowed, it
/// stays allowed.
#[derive(Debug, Clone, Copy, Default)]
struct Allow {
    /// Per-message TTL (a bucket whose values expire one by one).
    ttl: bool,
    /// Atomic batches (writes to several keys stored all or none).
    atomic: bool,
}

impl Allow {
    const TTL: Self = Self {
        ttl: true,
        atomic: false,
    };
}

/// [`ensure_bucket`], with what it allows besides.
async fn ensure_bucket_with(
    js: &jetstream::Context,
    config: kv::Config,
    allow: Allow,
) -> Result<kv::Store, BrokerError> {
    let Allow { ttl, atomic } = allow;
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
        allow_atomic_publish: atomic,
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
                || (atomic && !current.allow_atomic_publish)
            {
                let rescaled = current.num_replicas != replicas;
                current.num_replicas = replicas;
                current.allow_direct = stream.allow_direct;
                current.max_age = stream.max_age;
                current.max_bytes = stream.max_bytes;
                current.allow_message_ttl |= ttl;
                current.allow_atomic_publish |= atomic;
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
    if atomic {
        // A server that does not know atomic batches keeps the stream
        // without them, silently: the broker would lose its fencing.
        let allowed = match js.get_stream(format!("KV_{name}")).await {
            Ok(mut stream) => stream
                .info()
                .await
                .map(|info| info.config.allow_atomic_publish)
                .map_err(|e| BrokerError::nats(&format!("reading bucket {name}"), e))?,
            Err(e) => return Err(BrokerError::nats(&format!("opening bucket {name}"), e)),
        };
        if !allowed {
            return Err(BrokerError::Internal(format!(
                "bucket {name} does not allow atomic batches (allow_atomic): every server of the cluster needs nats-server 2.12 or newer"
            )));
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
}
