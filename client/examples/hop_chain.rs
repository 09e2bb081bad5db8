//! Per-hop latency of a chain of agents driven by the Rust SDK, against a
//! broker that is already running: the Rust half of `bench/python_hop.py`,
//! which runs the same chain with the Python SDK against the same broker and
//! prints both side by side.
//!
//! ```text
//! cargo run --release -p handoff-client --example hop_chain -- --addr http://127.0.0.1:7233 \
//!     [--agents 5] [--runs 500] [--warmup 20] [--payload 1024] [--prefix chain-rs]
//! ```
//!
//! It registers agents `<prefix>-0` .. `<prefix>-<N-1>` (no contract), and
//! for each of `--runs` runs, one after another: starts the run, hands a
//! `Subtask` with a `--payload`-byte instruction to the first agent, and
//! each agent in turn takes its delivery and hands the same payload to the
//! next with complete-and-handoff (`delivery.handoff`); the last one ends
//! the run with a final handoff. A hop is the time from one agent's delivery
//! to the next one's (the handoff validated, stored, announced, the consumed
//! delivery acked, the next one delivered). The first `--warmup` runs are
//! not measured. It prints one JSON object: the hop count and the p50, p90
//! and p99 in milliseconds.

use std::{error::Error, process::ExitCode, time::Instant};

use handoff_client::{AgentConfig, Client, Handoff, RunConfig, Subscription};
use handoff_proto::demo::Subtask;

type BoxError = Box<dyn Error + Send + Sync>;

/// The chain's sizes and where to run it.
#[derive(Debug)]
struct Args {
    /// The broker.
    addr: String,
    /// Agents in the chain (hops per run: one fewer).
    agents: usize,
    /// Measured runs.
    runs: usize,
    /// Runs before those, not measured.
    warmup: usize,
    /// Bytes of the instruction each handoff carries.
    payload: usize,
    /// Names of the agents: `<prefix>-0`, `<prefix>-1`...
    prefix: String,
}

impl Args {
    /// `--name value` pairs; every problem named.
    fn parse(mut argv: impl Iterator<Item = String>) -> Result<Args, BoxError> {
        let mut args = Args {
            addr: String::new(),
            agents: 5,
            runs: 500,
            warmup: 20,
            payload: 1024,
            prefix: "chain-rs".to_string(),
        };
        while let Some(flag) = argv.next() {
            let value = argv.next().ok_or_else(|| format!("{flag} needs a value"))?;
            let number = || {
                value
                    .parse::<usize>()
                    .map_err(|e| format!("{flag} {value}: {e}"))
            };
            match flag.as_str() {
                "--addr" => args.addr = value.clone(),
                "--agents" => args.agents = number()?,
                "--runs" => args.runs = number()?,
                "--warmup" => args.warmup = number()?,
                "--payload" => args.payload = number()?,
                "--prefix" => args.prefix = value.clone(),
                _ => return Err(format!("unknown argument {flag}").into()),
            }
        }
        if args.addr.is_empty() {
            return Err("--addr is required".into());
        }
        if args.agents < 2 || args.runs == 0 {
            return Err("--agents must be at least 2 and --runs at least 1".into());
        }
        Ok(args)
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("hop_chain: {e}");
            return ExitCode::from(2);
        }
    };
    match chain(&args).await {
        Ok(mut hops) => {
            hops.sort_unstable();
            let q = |q: f64| {
                let i = ((hops.len() as f64 * q).ceil() as usize).clamp(1, hops.len()) - 1;
                hops[i] as f64 / 1000.0
            };
            println!(
                "{{\"sdk\": \"rust\", \"hops\": {}, \"p50_ms\": {:.3}, \"p90_ms\": {:.3}, \"p99_ms\": {:.3}}}",
                hops.len(),
                q(0.5),
                q(0.9),
                q(0.99)
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("hop_chain: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the chain; the hops measured, in microseconds.
async fn chain(args: &Args) -> Result<Vec<u64>, BoxError> {
    let client = Client::connect(args.addr.as_str()).await?;
    let names: Vec<String> = (0..args.agents)
        .map(|i| format!("{}-{i}", args.prefix))
        .collect();
    let mut subs: Vec<Subscription> = Vec::with_capacity(names.len());
    for name in &names {
        client
            .register_agent(AgentConfig::new(name.as_str()))
            .await?;
        subs.push(client.subscribe(name, "bench", 1).await?);
    }
    let task = Subtask {
        index: 0,
        of: 1,
        instruction: "x".repeat(args.payload),
        sources: vec![],
    };
    let mut hops = Vec::with_capacity(args.runs * (args.agents - 1));
    for run_n in 0..args.warmup + args.runs {
        let run = client
            .start_run(RunConfig::new("bench").max_depth(args.agents as u32 + 1))
            .await?;
        client
            .handoff(Handoff::to(&run.id, &names[0], &task)?)
            .await?;
        let mut last: Option<Instant> = None;
        for (i, sub) in subs.iter_mut().enumerate() {
            let d = match sub.next_delivery().await {
                Some(d) => d?,
                None => return Err(format!("the subscription of {} ended", names[i]).into()),
            };
            let now = Instant::now();
            if d.run_id() != run.id {
                return Err(format!("{} got a handoff of another run", names[i]).into());
            }
            if let Some(last) = last {
                if run_n >= args.warmup {
                    hops.push(now.duration_since(last).as_micros() as u64);
                }
            }
            last = Some(now);
            let next = match names.get(i + 1) {
                Some(next) => Handoff::to(&run.id, next, &task)?,
                None => Handoff::final_result(&run.id, &task)?,
            };
            d.handoff(next).await?;
        }
    }
    Ok(hops)
}
