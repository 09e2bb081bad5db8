//! What contract validation (with tokenization) adds to a handoff.
//!
//! The same `Handoff` RPC is timed against two agents that differ only in
//! what they accept: `plain` takes any payload, `typed` accepts the demo
//! `Subtask` contract with every rule on (required fields, token and byte
//! budgets, confidence, tool result age). Payloads are string-heavy
//! `Subtask`s of about 1 KiB and 64 KiB; the two agents alternate so both
//! see the same machine noise. The broker's check alone (decode, unknown
//! fields, required fields, token count) is also timed in-process.
//!
//! `cargo run --release -p handoff-tests --example validation_latency [-- ITERATIONS]`

use std::time::{Duration, Instant, SystemTime};

use handoff_client::{pb, AgentConfig, Handoff, RunConfig};
use handoff_proto::{demo::Subtask, DEMO_FILE_DESCRIPTOR_SET};
use handoff_tests::{Broker, Nats};
use handoffd::rules::contracts::{message_of, tokens::Tokenizer, validate};
use hdrhistogram::Histogram;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A `Subtask` whose strings add up to about `size` bytes of prose.
fn subtask(size: usize) -> Subtask {
    let sentence = "Compare the revenue of each region with last quarter and note any change above five percent. ";
    let mut text = String::with_capacity(size);
    while text.len() < size {
        text.push_str(sentence);
    }
    text.truncate(size);
    Subtask {
        index: 0,
        of: 1,
        instruction: text,
        sources: vec!["https://example.com/q3.pdf".into()],
    }
}

fn rules() -> pb::ContractRules {
    pb::ContractRules {
        required_fields: vec!["instruction".into(), "sources".into()],
        max_tokens: 1_000_000,
        max_bytes: 1 << 20,
        min_confidence: Some(0.5),
        max_tool_result_age: Some(prost_types::Duration {
            seconds: 3600,
            nanos: 0,
        }),
        carry: Vec::new(),
    }
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let iterations: u32 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    let nats = Nats::start().await;
    let broker = Broker::start(nats.url(), |_| {}).await;
    let client = broker.client().await;
    client
        .raw()
        .register_contract(pb::RegisterContractRequest {
            message_type: "handoff.demo.v1.Subtask".into(),
            rules: Some(rules()),
            file_descriptor_set: DEMO_FILE_DESCRIPTOR_SET.to_vec(),
            ..Default::default()
        })
        .await?;
    client
        .register_agent(AgentConfig::new("typed").accepts_type("handoff.demo.v1.Subtask"))
        .await?;
    client.register_agent(AgentConfig::new("plain")).await?;
    client
        .register_agent(AgentConfig::new("planner").emits_type("handoff.demo.v1.Subtask"))
        .await?;
    let run = client.start_run(RunConfig::new("bench")).await?;

    let message = message_of(DEMO_FILE_DESCRIPTOR_SET, "handoff.demo.v1.Subtask")?;
    let tokenizer = Tokenizer::new("o200k_base")?;
    println!(
        "Handoff RPC latency, {iterations} per cell, contract check on vs off (one broker, one nats-server, loopback)"
    );
    println!(
        "{:<10} {:>8} {:>10} {:>10} {:>10} {:>10} {:>10} {:>12}",
        "payload", "tokens", "off p50", "on p50", "added p50", "off p99", "on p99", "check alone"
    );
    for size in [1024usize, 64 * 1024] {
        let payload = subtask(size);
        let bytes = prost::Message::encode_to_vec(&payload);
        let rules = rules();
        // The check alone, in-process.
        let mut alone = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
        let mut tokens = 0;
        for _ in 0..iterations {
            let start = Instant::now();
            let m = validate::check(
                &message,
                &rules,
                &tokenizer,
                &bytes,
                Some(0.9),
                &[],
                SystemTime::now(),
            )
            .map_err(|v| v.to_string())?;
            alone.record(start.elapsed().as_nanos().max(1) as u64)?;
            tokens = m.tokens;
        }
        let mut off = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
        let mut on = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
        let warmup = 50;
        for i in 0..iterations + warmup {
            for (target, hist) in [("plain", &mut off), ("typed", &mut on)] {
                let h = Handoff::to(&run.id, target, &payload)?
                    .from_agent("planner")
                    .confidence(0.9);
                let start = Instant::now();
                client.handoff(h).await?;
                if i >= warmup {
                    hist.record(start.elapsed().as_micros().max(1) as u64)?;
                }
            }
        }
        println!(
            "{:<10} {:>8} {:>9.3}m {:>9.3}m {:>9.3}m {:>9.3}m {:>9.3}m {:>10.1}us",
            format!("{} KiB", size / 1024),
            tokens,
            ms(&off, 0.5),
            ms(&on, 0.5),
            ms(&on, 0.5) - ms(&off, 0.5),
            ms(&off, 0.99),
            ms(&on, 0.99),
            alone.value_at_quantile(0.5) as f64 / 1000.0,
        );
    }
    println!("(m = milliseconds; check alone = p50 of the broker's validate::check in-process)");
    broker.stop().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(nats);
    Ok(())
}
