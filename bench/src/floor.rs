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
//!
//! And per hop of a chain (`raw_chain_floor`), as a delivery and a
//! complete-and-handoff do:
//! - delivery: store a `delivered` event in the background (a first
//!   attempt writes no lease record; the run was read less than a second
//!   before: the broker's delivery path keeps it that long);
//! - complete-and-handoff: together, read the run, read the consumed
//!   message by sequence, create the consumed handoff's claim and read its
//!   lease; then store the next message and await its ack; then together
//!   (while the next hop's delivery is already on its way) store the
//!   `accepted` event, create the lease record and ack the consumed
//!   message, and record the receipt in the claim (a compare-and-set
//!   update); an `acked` event in the background.

use std::{
    future::IntoFuture,
    sync::{atomic::AtomicU64, Arc},
    time::Instant,
};

use async_nats::jetstream::{self, consumer::pull, stream};
use futures::StreamExt;
use hdrhistogram::Histogram;
use indicatif::ProgressBar;

use crate::{
    report::histogram,
    scenarios::{bucket, chain_consumers, connect, drive, spawn_acker, subtask, CHAIN, WAIT},
    BoxError,
};

/// The stream of the floors' events.
async fn events_stream(js: &jetstream::Context, replicas: usize) -> Result<(), BoxError> {
    js.create_stream(stream::Config {
        name: "BENCH_FLOOR_EVENTS".into(),
        subjects: vec!["bench.floor.events.>".into()],
        num_replicas: replicas,
        ..Default::default()
    })
    .await?;
    Ok(())
}

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
    events_stream(&js, replicas).await?;
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

/// The chain's floor: `raw_chain` with, per hop, the NATS calls a delivery
/// and a complete-and-handoff make in handoffd, in the same order and with
/// the same concurrency (see the module docs). Hop and end to end as in
/// `raw_chain`: from one delivery to the next.
pub(crate) async fn raw_chain_floor(
    url: &str,
    replicas: usize,
    runs: u64,
    bar: &ProgressBar,
) -> Result<(Histogram<u64>, Histogram<u64>), BoxError> {
    let js = connect(url).await?;
    let chain = js
        .create_stream(stream::Config {
            name: "BENCH_FLOOR_CHAIN".into(),
            subjects: vec!["bench.floor.chain.>".into()],
            num_replicas: replicas,
            allow_direct: replicas == 1,
            ..Default::default()
        })
        .await?;
    events_stream(&js, replicas).await?;
    let run_bucket = bucket(&js, "bench_floor_runs", replicas).await?;
    let claims = bucket(&js, "bench_floor_claims", replicas).await?;
    let leases = bucket(&js, "bench_floor_hop_leases", replicas).await?;
    run_bucket
        .put("run", bytes::Bytes::from(vec![b'r'; 200]))
        .await?;
    let mut streams = chain_consumers(&chain, "f", "bench.floor.chain").await?;
    let payload = bytes::Bytes::from(prost::Message::encode_to_vec(&subtask()));
    // Events, lease records and claims of about the size of the broker's.
    let small = bytes::Bytes::from(vec![b'e'; 160]);
    let publish = |subject: String, id: String| {
        js.send_publish(
            subject,
            jetstream::message::PublishMessage::build()
                .payload(payload.clone())
                .message_id(id),
        )
    };
    let (mut hop, mut e2e) = (histogram(), histogram());
    let mut settling = Vec::new();
    let warmup = 20;
    for r in 0..runs + warmup {
        let start = Instant::now();
        run_bucket.entry("run").await?;
        publish("bench.floor.chain.0".into(), format!("{r}-0"))
            .await?
            .await?;
        event(&js, "accepted", format!("{r}-0"), small.clone(), true).await?;
        let mut last = start;
        for (i, messages) in streams.iter_mut().enumerate() {
            let msg = match tokio::time::timeout(WAIT, messages.next()).await {
                Ok(Some(m)) => m?,
                _ => return Err("raw chain floor: no message".into()),
            };
            let sequence = msg.info()?.stream_sequence;
            let id = format!("{r}-{i}");
            let lease_key = format!("f{i}.{sequence}");
            // A first attempt writes no lease record on delivery: its
            // signed token is its lease until it is settled.
            event(&js, "delivered", id.clone(), small.clone(), false).await?;
            let now = Instant::now();
            if r >= warmup {
                hop.record(now.duration_since(last).as_micros() as u64)?;
            }
            last = now;
            let (lease, claimed) = if i + 1 < CHAIN.len() {
                let parent = async {
                    match replicas {
                        1 => chain
                            .direct_get(sequence)
                            .await
                            .map(|_| ())
                            .map_err(BoxError::from),
                        _ => chain
                            .get_raw_message(sequence)
                            .await
                            .map(|_| ())
                            .map_err(BoxError::from),
                    }
                };
                let (run, parent, claim, lease) = tokio::join!(
                    run_bucket.entry("run"),
                    parent,
                    claims.create(&id, small.clone()),
                    leases.entry(&lease_key),
                );
                run?;
                parent?;
                let next = format!("{r}-{}", i + 1);
                publish(format!("bench.floor.chain.{}", i + 1), next.clone())
                    .await?
                    .await?;
                (lease?, Some((claim?, next)))
            } else {
                (leases.entry(&lease_key).await?, None)
            };
            // The third stage (the event, the ack with its lease record and
            // the receipt) answers the agent; the next hop does not wait for
            // it: the next agent's delivery is already on its way.
            let revision = lease.map_or(0, |e| e.revision);
            let (js, leases, claims, small) =
                (js.clone(), leases.clone(), claims.clone(), small.clone());
            settling.push(tokio::spawn(async move {
                let (accepted, recorded, acked, receipt) = tokio::join!(
                    async {
                        match &claimed {
                            Some((_, next)) => {
                                event(&js, "accepted", next.clone(), small.clone(), true).await
                            }
                            None => Ok(()),
                        }
                    },
                    async {
                        leases
                            .update(&lease_key, small.clone(), revision)
                            .await
                            .map(|_| ())
                            .map_err(BoxError::from)
                    },
                    async {
                        msg.double_ack()
                            .await
                            .map_err(|e| BoxError::from(e.to_string()))
                    },
                    async {
                        match &claimed {
                            Some((claim, _)) => claims
                                .update(&id, small.clone(), *claim)
                                .await
                                .map(|_| ())
                                .map_err(BoxError::from),
                            None => Ok(()),
                        }
                    },
                );
                accepted?;
                recorded?;
                acked?;
                receipt?;
                event(&js, "acked", id, small, false).await
            }));
        }
        for settled in settling.drain(..) {
            settled.await.map_err(|e| BoxError::from(e.to_string()))??;
        }
        if r >= warmup {
            e2e.record(last.duration_since(start).as_micros() as u64)?;
            bar.inc(1);
        }
    }
    Ok((hop, e2e))
}
