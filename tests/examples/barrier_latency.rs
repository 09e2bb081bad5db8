//! Release latency of a barrier: from the last branch's handoff to the
//! aggregator's delivery of the release.
//!
//! For each fan-in a barrier of `BRANCHES` branches is opened and all but
//! one branch result are handed off concurrently; then the last one is
//! sent and the clock runs until the aggregator (one subscribed instance)
//! receives the release with every result. The figures split into the
//! last branch's own `Handoff` call (validated, stored in the branch
//! stream, counted with compare-and-set; the release is decided, its
//! payloads gathered and published inside that call) and the whole span
//! to the delivery.
//!
//! `cargo run --release -p handoff-tests --example barrier_latency [-- FAN_INS BRANCHES PAYLOAD_BYTES]`

use std::time::{Duration, Instant};

use futures::future::try_join_all;
use handoff_client::{pb, AgentConfig, Client, Handoff, RunConfig};
use handoff_tests::{note, Broker, Nats};
use hdrhistogram::Histogram;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn branch(run: &str, barrier: &str, key: u32, text: &str) -> Result<Handoff, BoxError> {
    Ok(Handoff::from_request(pb::HandoffRequest {
        run_id: run.to_string(),
        source_agent: "worker".into(),
        to_barrier: true,
        barrier_id: barrier.to_string(),
        branch_key: key.to_string(),
        payload: Some(handoff_client::encode(&note(text, key))?),
        ..Default::default()
    }))
}

async fn open(client: &Client, run: &str, barrier: &str, branches: u32) -> Result<(), BoxError> {
    client
        .raw()
        .open_barrier(pb::OpenBarrierRequest {
            barrier: Some(pb::BarrierSpec {
                run_id: run.to_string(),
                barrier_id: barrier.to_string(),
                branch_count: branches,
                target_agent: "aggregator".into(),
                ..Default::default()
            }),
        })
        .await?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let arg = |n: usize, default: u32| {
        std::env::args()
            .nth(n)
            .and_then(|s| s.parse().ok())
            .unwrap_or(default)
    };
    let (fan_ins, branches, size) = (arg(1, 200), arg(2, 100), arg(3, 1024));
    let nats = Nats::start().await;
    let broker = Broker::start(nats.url(), |_| {}).await;
    let client = broker.client().await;
    for a in ["worker", "aggregator"] {
        client.register_agent(AgentConfig::new(a)).await?;
    }
    let run = client.start_run(RunConfig::new("bench")).await?;
    let mut agg = client.subscribe("aggregator", "a", 1).await?;
    let text = "x".repeat(size as usize);
    let new = || Histogram::<u64>::new_with_bounds(1, 60_000_000, 3);
    let (mut release, mut last_call) = (new()?, new()?);
    let warmup = 10;
    for i in 0..fan_ins + warmup {
        let barrier = format!("b{i}");
        open(&client, &run.id, &barrier, branches).await?;
        try_join_all((0..branches - 1).map(|k| {
            let client = client.clone();
            let h = branch(&run.id, &barrier, k, &text);
            async move { client.handoff(h?).await.map_err(BoxError::from) }
        }))
        .await?;
        let last = branch(&run.id, &barrier, branches - 1, &text)?;
        let start = Instant::now();
        client.handoff(last).await?;
        let accepted = start.elapsed();
        let d = match tokio::time::timeout(Duration::from_secs(10), agg.next_delivery()).await {
            Ok(Some(d)) => d?,
            _ => return Err(format!("no release for {barrier}").into()),
        };
        let delivered = start.elapsed();
        let r: pb::BarrierRelease = d.payload()?;
        if r.barrier_id != barrier || r.branches.len() != branches as usize {
            return Err(
                format!("unexpected release {} ({})", r.barrier_id, r.branches.len()).into(),
            );
        }
        d.ack().await?;
        if i >= warmup {
            release.record(delivered.as_micros() as u64)?;
            last_call.record(accepted.as_micros() as u64)?;
        }
    }
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "fan-ins: {}  branches: {branches}  payload: {size} B  (one broker, one nats-server, loopback)",
        release.len()
    );
    println!(
        "{:<40} {:>8} {:>8} {:>8} {:>8}",
        "", "p50 ms", "p90 ms", "p99 ms", "max ms"
    );
    for (name, h) in [
        ("last branch's Handoff call", &last_call),
        ("last branch sent -> release delivered", &release),
    ] {
        println!(
            "{:<40} {:>8.3} {:>8.3} {:>8.3} {:>8.3}",
            name,
            ms(h, 0.5),
            ms(h, 0.9),
            ms(h, 0.99),
            h.max() as f64 / 1000.0
        );
    }
    broker.stop().await;
    Ok(())
}
