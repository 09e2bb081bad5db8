//! Per-hop latency of a plain handoff, next to raw JetStream.
//!
//! Two agents pass one handoff back and forth with complete-and-handoff;
//! a hop is the time from one delivery to the next (the handoff is
//! validated, stored, announced, the consumed delivery acked, and the new
//! one pulled and delivered). The same loop on raw JetStream (publish and
//! await the ack, pull, double-ack) runs against the same server.
//!
//! `cargo run --release -p handoff-tests --example hop_latency [-- HOPS]`

use std::time::{Duration, Instant};

use async_nats::jetstream::{
    self,
    consumer::{pull, PullConsumer},
    stream,
};
use futures::StreamExt;
use handoff_client::{AgentConfig, Handoff, RunConfig};
use handoff_tests::{note, Broker, Nats};
use hdrhistogram::Histogram;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let hops: u32 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    let nats = Nats::start().await;
    let broker = Broker::start(nats.url(), |c| c.default_max_depth = hops + 1000).await;
    let client = broker.client().await;
    for a in ["ping", "pong"] {
        client.register_agent(AgentConfig::new(a)).await?;
    }
    let run = client
        .start_run(RunConfig::new("bench").max_depth(hops + 1000))
        .await?;
    let mut ping = client.subscribe("ping", "p", 1).await?;
    let mut pong = client.subscribe("pong", "p", 1).await?;
    client
        .handoff(Handoff::to(&run.id, "ping", &note(&"x".repeat(1024), 0))?)
        .await?;
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let warmup = 200;
    let mut last = Instant::now();
    for i in 0..hops + warmup {
        let (sub, next) = if i % 2 == 0 {
            (&mut ping, "pong")
        } else {
            (&mut pong, "ping")
        };
        let d = match sub.next_delivery().await {
            Some(d) => d?,
            None => return Err("subscription ended".into()),
        };
        let now = Instant::now();
        if i > warmup {
            hist.record(now.duration_since(last).as_micros() as u64)?;
        }
        last = now;
        d.handoff(Handoff::to("", next, &note(&"x".repeat(1024), i))?)
            .await?;
    }
    let raw = raw_jetstream(nats.url(), hops).await?;
    let p = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "hops: {}  (1 KiB payload, one broker, one nats-server, loopback)",
        hist.len()
    );
    println!(
        "{:<22} {:>9} {:>9} {:>9} {:>9}",
        "", "p50 ms", "p90 ms", "p99 ms", "max ms"
    );
    for (name, h) in [("handoff hop", &hist), ("raw JetStream hop", &raw)] {
        println!(
            "{:<22} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
            name,
            p(h, 0.5),
            p(h, 0.9),
            p(h, 0.99),
            h.max() as f64 / 1000.0
        );
    }
    println!(
        "ratio p50 {:.2}x  p99 {:.2}x",
        p(&hist, 0.5) / p(&raw, 0.5),
        p(&hist, 0.99) / p(&raw, 0.99)
    );
    broker.stop().await;
    Ok(())
}

async fn raw_jetstream(
    url: &str,
    hops: u32,
) -> Result<Histogram<u64>, Box<dyn std::error::Error + Send + Sync>> {
    let client = async_nats::connect(url).await?;
    let js = jetstream::new(client);
    let s = js
        .create_stream(stream::Config {
            name: "RAW".into(),
            subjects: vec!["raw.>".into()],
            ..Default::default()
        })
        .await?;
    let consumer: PullConsumer = s
        .create_consumer(pull::Config {
            durable_name: Some("raw".into()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await?;
    let payload = bytes::Bytes::from(vec![b'x'; 1024]);
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for i in 0..hops + 200 {
        let start = Instant::now();
        js.publish("raw.x", payload.clone()).await?.await?;
        let mut batch = consumer
            .batch()
            .max_messages(1)
            .expires(Duration::from_secs(5))
            .messages()
            .await?;
        let msg = match batch.next().await {
            Some(m) => m?,
            None => return Err("no message".into()),
        };
        msg.double_ack().await?;
        if i >= 200 {
            hist.record(start.elapsed().as_micros() as u64)?;
        }
    }
    Ok(hist)
}
