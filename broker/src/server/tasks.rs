//! The background tasks of a serving broker: caches kept current with
//! changes made on any replica, settlements announced by other replicas,
//! durable timers, the event outbox and the metrics endpoint, all in one
//! `JoinSet` that stops with the broker.

use super::*;

/// The background tasks of a serving broker, stopped together.
pub(super) struct Background(tokio::task::JoinSet<()>);

impl Background {
    /// Starts them: the event outbox, the durable timers, the caches of
    /// agents, credentials and contracts (from contracts-bucket revision
    /// `contracts_from` on), the settlements other replicas announce, and,
    /// given its listener, the metrics endpoint with its polls.
    pub(super) fn start(
        broker: &Broker,
        store: JetStream,
        contracts_from: u64,
        metrics: Option<(TcpListener, Option<crate::metrics::Gate>)>,
    ) -> Background {
        let mut set = tokio::task::JoinSet::new();
        set.spawn(broker.outbox_task());
        set.spawn(timers::run(broker.clone(), store.clone()));
        set.spawn(watch_agents(broker.clone(), store.clone()));
        set.spawn(watch_auth(broker.clone(), store.clone()));
        set.spawn(follow_settlements(broker.clone()));
        set.spawn(index_runs(broker.clone(), store.clone()));
        set.spawn(follow_cancels(broker.clone()));
        if let Some((listener, gate)) = metrics {
            set.spawn(crate::metrics::serve(
                listener,
                broker.metrics().clone(),
                gate,
            ));
            set.spawn(report_usage(broker.clone(), store.clone()));
        }
        set.spawn(watch_contracts(broker.clone(), store, contracts_from));
        Background(set)
    }

    /// Stops every one of them.
    pub(super) fn stop(&mut self) {
        self.0.abort_all();
    }
}

/// Frees the slots of this replica's sessions whose deliveries were
/// settled through another replica.
pub(super) async fn follow_settlements(broker: Broker) {
    use futures::StreamExt;
    loop {
        match broker.store().settled_announcements().await {
            Ok(mut slots) => {
                while let Some(slot) = slots.next().await {
                    broker.release_slot(&slot);
                }
            }
            Err(e) => tracing::warn!(error = %e, "listening for settlements failed; retrying"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Keeps the run index (see [`crate::app::run_index`]) current: every
/// run record of the runs bucket (its history first, then each change),
/// and the events that name the agents of a run, its dead letters and its
/// drift (the whole events stream first).
pub(super) async fn index_runs(broker: Broker, store: JetStream) {
    tokio::join!(
        index_run_records(broker.clone(), store.clone()),
        index_run_events(broker, store)
    );
}

async fn index_run_records(broker: Broker, store: JetStream) {
    use async_nats::jetstream::kv::Operation;
    use futures::StreamExt;
    use prost::Message as _;
    let index = broker.run_index();
    loop {
        // An empty bucket sends no history: nothing to wait for.
        match store.runs.status().await {
            Ok(status) if status.values() == 0 => index.loaded(),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "run index: reading the runs bucket failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        }
        match store.runs.watch_with_history(">").await {
            Ok(mut updates) => {
                while let Some(entry) = updates.next().await {
                    let Ok(entry) = entry else { break };
                    match entry.operation {
                        Operation::Put => match handoff_proto::pb::Run::decode(entry.value) {
                            Ok(run) => index.put(run, entry.revision),
                            Err(e) => {
                                tracing::warn!(key = %entry.key, error = %e, "run index: undecodable run skipped")
                            }
                        },
                        Operation::Delete | Operation::Purge => index.remove(&entry.key),
                    }
                    if entry.delta == 0 {
                        index.loaded();
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "run index: watching runs failed; retrying"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn index_run_events(broker: Broker, store: JetStream) {
    use async_nats::jetstream::consumer::{pull, DeliverPolicy};
    use futures::StreamExt;
    use handoff_proto::pb::EventKind;
    use prost::Message as _;
    let kinds = [
        EventKind::HandoffAccepted,
        EventKind::HandoffRedriven,
        EventKind::DeadLettered,
        EventKind::IntentDrift,
        EventKind::RunPurged,
    ];
    let mut next = 0u64;
    loop {
        let config = pull::OrderedConfig {
            filter_subjects: kinds
                .iter()
                .map(|k| format!("handoff.v1.events.*.{}", k.token()))
                .collect(),
            deliver_policy: if next == 0 {
                DeliverPolicy::All
            } else {
                DeliverPolicy::ByStartSequence {
                    start_sequence: next,
                }
            },
            ..Default::default()
        };
        let messages = match store.events.create_consumer(config).await {
            Ok(consumer) => {
                // Nothing to replay: the index is as current as the
                // stream already.
                if consumer.cached_info().num_pending == 0 {
                    broker.run_index().events_loaded();
                }
                consumer.messages().await.map_err(|e| e.to_string())
            }
            Err(e) => Err(e.to_string()),
        };
        match messages {
            Ok(mut messages) => {
                while let Some(Ok(msg)) = messages.next().await {
                    if let Ok(info) = msg.info() {
                        next = info.stream_sequence + 1;
                        if info.pending == 0 {
                            broker.run_index().events_loaded();
                        }
                    }
                    if let Ok(event) = handoff_proto::pb::Event::decode(msg.payload.clone()) {
                        broker.run_index().event(&event);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "run index: reading events failed; retrying"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Tells this replica's sessions when a run whose deliveries they hold is
/// cancelled, on whichever replica (from the `run_cancelled` events).
pub(super) async fn follow_cancels(broker: Broker) {
    use futures::StreamExt;
    // From new events at start, then on from the last one seen, so a
    // cancel made while the watch was down still reaches its deliveries.
    let mut next = 0;
    loop {
        let watched = broker
            .store()
            .watch_events(None, Some(handoff_proto::pb::EventKind::RunCancelled), next)
            .await;
        match watched {
            Ok(mut events) => {
                while let Some(Ok(event)) = events.next().await {
                    next = event.sequence + 1;
                    let told = broker.cancel_deliveries(&event.run_id, &event.reason);
                    if told > 0 {
                        tracing::info!(run_id = %event.run_id, deliveries = told, "in-flight deliveries told of the cancel");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "listening for cancels failed; retrying"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Keeps the agent cache current with registrations made on any replica.
pub(super) async fn watch_agents(broker: Broker, store: JetStream) {
    use async_nats::jetstream::kv::Operation;
    use futures::StreamExt;
    use prost::Message as _;
    loop {
        match store.agents.watch_all().await {
            Ok(mut updates) => {
                while let Some(entry) = updates.next().await {
                    let Ok(entry) = entry else { break };
                    match entry.operation {
                        Operation::Put => {
                            if let Ok(spec) = handoff_proto::pb::AgentSpec::decode(entry.value) {
                                broker.cache_agent(spec);
                            }
                        }
                        Operation::Delete | Operation::Purge => broker.forget_agent(&entry.key),
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "agent watch failed; retrying"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// How often the metrics read what the streams and buckets hold.
pub(super) const USAGE_POLL: Duration = Duration::from_secs(15);

/// Reports, for the metrics endpoint, the inbox backlog of the agents
/// served here and what every stream and bucket holds.
pub(super) async fn report_usage(broker: Broker, store: JetStream) {
    let pending = crate::app::session::report_pending(broker.clone());
    let usage = async {
        let mut tick = tokio::time::interval(USAGE_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match store.usage().await {
                Ok(streams) => {
                    for (name, bytes, messages, limit) in streams {
                        broker
                            .metrics()
                            .set_store_usage(&name, bytes, messages, limit);
                    }
                }
                Err(e) => tracing::debug!(error = %e, "stream sizes not read"),
            }
        }
    };
    tokio::join!(pending, usage);
}

/// Keeps this replica's authentication caches current with changes made
/// on any replica: a token revoked or a principal's grants changed drops
/// the verified credentials and wakes the live checks of open streams
/// (which end within a moment if they no longer hold); a signing key
/// rotated out stops verifying here at once; the bootstrap token disabled
/// stops authenticating.
pub(super) async fn watch_auth(broker: Broker, store: JetStream) {
    use async_nats::jetstream::kv::Operation;
    use futures::StreamExt;
    use prost::Message as _;
    if !broker.auth().enabled() {
        return;
    }
    loop {
        let watched = tokio::try_join!(
            store.tokens.watch_all(),
            store.principals.watch_all(),
            store.keys.watch_all()
        );
        match watched {
            Ok((tokens, principals, keys)) => {
                // Whatever happened before the watches began (at start, or
                // while they were down): read again now that no change
                // can slip between the read and the watch.
                let reloaded = tokio::try_join!(
                    crate::app::auth::load_keys(&broker),
                    crate::app::auth::load_bootstrap(&broker)
                );
                if let Err(e) = reloaded {
                    tracing::warn!(error = %e, "signing keys and bootstrap token not read again; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                broker.auth().changed();
                let mut changes = futures::stream::select_all([
                    tokens.map(|e| (0, e)).boxed(),
                    principals.map(|e| (1, e)).boxed(),
                    keys.map(|e| (2, e)).boxed(),
                ]);
                while let Some((bucket, entry)) = changes.next().await {
                    let Ok(entry) = entry else { break };
                    match bucket {
                        2 if entry.operation == Operation::Put => {
                            match handoff_proto::pb::SigningKeys::decode(entry.value) {
                                Ok(keys) => broker.auth().keys_record(keys),
                                Err(e) => {
                                    tracing::warn!(error = %e, "stored signing keys do not decode")
                                }
                            }
                        }
                        0 if entry.key == crate::app::auth::BOOTSTRAP_ID => {
                            let token = match entry.operation {
                                Operation::Put => Some(
                                    handoff_proto::pb::ApiToken::decode(entry.value)
                                        .unwrap_or_else(|e| {
                                            // Fail closed: a record that does
                                            // not decode keeps it disabled.
                                            tracing::warn!(error = %e, "the bootstrap token's record does not decode; it stays disabled");
                                            handoff_proto::pb::ApiToken {
                                                revoked_at: Some(crate::app::now()),
                                                ..Default::default()
                                            }
                                        }),
                                ),
                                Operation::Delete | Operation::Purge => None,
                            };
                            broker.auth().bootstrap_record(token.as_ref());
                        }
                        _ => broker.auth().changed(),
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "watch of tokens, principals and keys failed; retrying")
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Keeps the contract registry current with versions registered on any
/// replica (versions are never changed or deleted, only added), from
/// bucket revision `next` on.
pub(super) async fn watch_contracts(broker: Broker, store: JetStream, mut next: u64) {
    use async_nats::jetstream::kv::Operation;
    use futures::StreamExt;
    use prost::Message as _;
    loop {
        match store.contracts.watch_all_from_revision(next).await {
            Ok(mut updates) => {
                while let Some(entry) = updates.next().await {
                    let Ok(entry) = entry else { break };
                    next = entry.revision + 1;
                    if entry.operation != Operation::Put {
                        continue;
                    }
                    let compiled = handoff_proto::pb::Contract::decode(entry.value)
                        .map_err(|e| e.to_string())
                        .and_then(|c| {
                            crate::rules::contracts::Compiled::new(c).map_err(|e| e.to_string())
                        });
                    match compiled {
                        Ok(c) => broker.contracts().insert(std::sync::Arc::new(c)),
                        Err(e) => {
                            tracing::warn!(key = %entry.key, error = %e, "stored contract skipped")
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "contract watch failed; retrying"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
