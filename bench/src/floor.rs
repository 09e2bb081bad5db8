//! The floor under `throughput`: raw JetStream doing, per message, the
//! NATS operations handoffd does per handoff, with none of handoffd's own
//! work (no gRPC, no contract check, no signing). What it reaches is the
//! most the broker's storage design allows on this machine; the gap
//! between it and handoffd is the broker's own cost, the gap between it
//! and plain raw JetStream the cost of the design's writes and reads.
//!
//! Per message, as handoffd's accept, delivery and ack paths do for a
//! plain handoff:
//! - accept: read the run (a key/value direct get), store the message
//!   with a message id and await its ack, then store an `accepted` event
//!   with a message id and await its ack;
//! - delivery: read the run again; store a `delivered` event off the
//!   critical path (confirmed in the background, as the broker's outbox
//!   does);
//! - ack: create a lease record (a key/value create), ack the message and
//!   await the confirmation, store an `acked` event in the background.

use std::{
    future::IntoFuture,
    sync::{atomic::AtomicU64, Arc},
};

use async_nats::jetstream::{self, consumer::pull, stream};
use indicatif::ProgressBar;

use crate::{
    scenarios::{bucket, connect, drive, spawn_acker, subtask},
    BoxError,
};

/// Stores an event with a message id; with `confirm`, awaits the ack,
/// otherwise confirms it in the background.
async fn event(
    js: &jetstream::Context,
    kind: &str,
    id: String,
    payload: bytes::Bytes,
    confirm: bool,
) -> Result<(), BoxError> {
    let ack = js
        .send_publish(
            format!("bench.floor.events.run.{kind}"),
            jetstream::message::PublishMessage::build()
                .payload(payload)
                .message_id(format!("{kind}-{id}")),
        )
        .await?;
    if confirm {
        ack.await?;
    } else {
        tokio::spawn(ack.into_future());
    }
    Ok(())
}

/// Accepted and accepted-and-delivered per second of `count` 1 KiB
/// messages from `producers` tasks to four acking instances, each message
/// costing the NATS operations of one handoff (see the module docs).
pub(crate) async fn raw_floor(
    url: &str,
    replicas: usize,
    count: u64,
    producers: usize,
    bar: &ProgressBar,
) -> Result<(f64, f64), BoxError> {
    let js = connect(url).await?;
    let inbox = js
        .create_stream(stream::Config {
            name: "BENCH_FLOOR_INBOX".into(),
            subjects: vec!["bench.floor.inbox".into()],
            num_replicas: replicas,
            ..Default::default()
        })
        .await?;
    js.create_stream(stream::Config {
        name: "BENCH_FLOOR_EVENTS".into(),
        subjects: vec!["bench.floor.events.>".into()],
        num_replicas: replicas,
        ..Default::default()
    })
    .await?;
    let runs = bucket(&js, "bench_floor_runs", replicas).await?;
    let leases = bucket(&js, "bench_floor_leases", replicas).await?;
    // A run of about the size of the broker's.
    runs.put("run", bytes::Bytes::from(vec![b'r'; 200])).await?;
    let consumer = inbox
        .create_consumer(pull::Config {
            durable_name: Some("sink".into()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            max_ack_pending: 4 * 256,
            ..Default::default()
        })
        .await?;
    // Events of about the size of the broker's.
    let event_payload = bytes::Bytes::from(vec![b'e'; 160]);
    let acked = Arc::new(AtomicU64::new(0));
    let mut consumers = Vec::new();
    for _ in 0..4 {
        let messages = consumer.messages().await?;
        let (js, runs, leases, event_payload) = (
            js.clone(),
            runs.clone(),
            leases.clone(),
            event_payload.clone(),
        );
        consumers.push(spawn_acker(
            messages,
            move |m: jetstream::Message| {
                let (js, runs, leases, event_payload) = (
                    js.clone(),
                    runs.clone(),
                    leases.clone(),
                    event_payload.clone(),
                );
                async move {
                    let sequence = m.info()?.stream_sequence;
                    runs.entry("run").await?;
                    let id = sequence.to_string();
                    event(&js, "delivered", id.clone(), event_payload.clone(), false).await?;
                    leases
                        .create(format!("sink.{sequence}"), event_payload.clone())
                        .await?;
                    m.double_ack().await?;
                    event(&js, "acked", id, event_payload, false).await?;
                    Ok::<(), BoxError>(())
                }
            },
            acked.clone(),
        ));
    }
    let payload = bytes::Bytes::from(prost::Message::encode_to_vec(&subtask()));
    let next_id = Arc::new(AtomicU64::new(0));
    drive(count, producers, bar, &acked, consumers, move || {
        let (js, runs, payload, event_payload, next_id) = (
            js.clone(),
            runs.clone(),
            payload.clone(),
            event_payload.clone(),
            next_id.clone(),
        );
        async move {
            let id = next_id
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                .to_string();
            runs.entry("run").await?;
            js.send_publish(
                "bench.floor.inbox",
                jetstream::message::PublishMessage::build()
                    .payload(payload)
                    .message_id(&id),
            )
            .await?
            .await?;
            event(&js, "accepted", id, event_payload, true).await?;
            Ok(())
        }
    })
    .await
}
