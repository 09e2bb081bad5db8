//! `handoff-bench`: the benchmark suite of the handoff broker.
//!
//! It starts a `nats-server` (or uses `--nats-url`, or with `--cluster`
//! starts a three-node JetStream cluster and keeps everything in three
//! replicas) and a `handoffd` process, runs the named scenarios, and
//! measures the same work straight on JetStream against the same server in
//! the same run, so every figure comes with a ratio that holds on a noisy
//! machine:
//!
//! - `chain`: runs through a 5-hop pipeline of agents that accept a
//!   contract (1 KiB Subtask payloads): per-hop and end-to-end latency;
//! - `fanin`: barriers of 10, 100, 1000 and 10,000 branches (512-byte
//!   results, checked against the aggregator's contract; `--fanin-widths`
//!   picks the widths and how many barriers of each, e.g. `1000x20,10000`):
//!   release latency (last branch sent -> release delivered) and total
//!   (opened -> release delivered), p50/p99 across the barriers; a width
//!   handoffd fails is reported as failed, next to raw JetStream;
//! - `chord`: 100 tasks fanned out in one `FanOut` call to 2 instances of
//!   a worker agent with 4 deliveries in flight each, every worker
//!   answering into the barrier (complete-and-handoff), then the
//!   aggregator: submit -> the aggregator has the release; raw JetStream
//!   does the same shape with a work queue, the aggregator counting the
//!   results off their stream (and, as a second baseline, the workers
//!   counting them with compare-and-set and the last one publishing a
//!   release, as the raw fan-in does);
//! - `throughput`: 1 KiB handoffs from many concurrent producers to four
//!   acking instances: accepted per second, and accepted-and-delivered;
//!   next to raw JetStream, and to raw JetStream doing per message the
//!   NATS reads and writes handoffd does per handoff (the floor the
//!   storage design sets, see `floor.rs`);
//!   The chain runs twice: plain, and with a 1 KiB run-state delta on
//!   every handoff (runs with state);
//! - `scale`: per-hop latency before and after the broker holds 100,000
//!   finished runs and 100,000 open barriers;
//! - `state`: 100,000 runs holding state (seeded, then one delta each);
//! - `memory`: `handoffd`'s resident memory idle, at its peak under
//!   `throughput`, with the open barriers of `scale`, and with the runs
//!   holding state of `state`;
//! - `payload`: 1 MiB and 16 MiB handoffs stored by reference, submit ->
//!   delivered with the payload fetched and checked, next to a raw
//!   object-store put and get (see `payload.rs`).
//! - `soak` (only when named: it lasts `--soak-minutes`, 10 by default):
//!   an open-loop load at half the accepted-and-delivered capacity
//!   (`throughput`'s figure when it ran, else measured first), with
//!   handoffd's RSS and the accepted -> delivered p50/p99 of every minute,
//!   printed as its own table (and drawn with `--plot`), and whether the
//!   last minute's RSS is within 10% of the second's.
//!
//! Latencies go through HDR histograms. The table goes to stdout (JSON
//! with `--json`), progress to stderr; `--plot FILE.png` also draws every
//! latency distribution, handoffd next to raw JetStream.
//!
//! `cargo run --release -p handoff-bench [-- chain fanin ...]`

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use clap::{Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

mod chord;
mod console;
mod floor;
mod listing;
mod payload;
mod plot;
mod report;
mod scenarios;
mod soak;
mod stack;

use report::{Figure, Latency, Row};

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Chain,
    Fanin,
    Chord,
    Throughput,
    Scale,
    State,
    Memory,
    Payload,
    Soak,
    /// Finding runs: the first page of `ListRuns` with many runs stored.
    List,
    /// The console: its runs page with many runs stored, and an event's
    /// way to an open run page.
    Console,
}

/// One fan-in width of `--fanin-widths`: `BRANCHES` or
/// `BRANCHESxBARRIERS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Width {
    branches: u32,
    barriers: u64,
}

impl Width {
    /// Barriers measured at `branches` when `--fanin-widths` does not say:
    /// enough for a p99 up to 1000 branches, a few beyond.
    fn default_barriers(branches: u32) -> u64 {
        match branches {
            0..=10 => 200,
            11..=100 => 100,
            101..=1000 => 20,
            _ => 3,
        }
    }
}

fn parse_width(text: &str) -> Result<Width, String> {
    let (branches, barriers) = match text.split_once('x') {
        Some((b, n)) => (b, Some(n)),
        None => (text, None),
    };
    let branches: u32 = branches
        .trim()
        .parse()
        .map_err(|e| format!("{branches:?}: {e}"))?;
    if branches < 2 {
        return Err("a fan-in needs at least 2 branches".into());
    }
    let barriers = match barriers {
        Some(n) => n.trim().parse().map_err(|e| format!("{n:?}: {e}"))?,
        None => Width::default_barriers(branches),
    };
    if barriers == 0 {
        return Err("measure at least one barrier".into());
    }
    Ok(Width { branches, barriers })
}

/// Benchmarks of handoffd, each next to raw JetStream.
#[derive(Parser, Debug)]
#[command(name = "handoff-bench")]
struct Args {
    /// Scenarios to run (default: all but soak; they run as chain, fanin,
    /// chord, scale, state, throughput, soak, so the memory held with open
    /// barriers is read before the throughput peak, and the soak runs at
    /// half the throughput just measured).
    #[arg(value_enum)]
    scenarios: Vec<Scenario>,
    /// Print the results as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Also draw the latency distributions (handoffd and raw JetStream)
    /// into this PNG file.
    #[arg(long, value_name = "FILE.png")]
    plot: Option<std::path::PathBuf>,
    /// Run the broker with auth: every call carries a bearer token and is
    /// checked against its grants.
    #[arg(long)]
    auth: bool,
    /// Use this NATS instead of starting a nats-server.
    #[arg(long, value_name = "URL", conflicts_with = "cluster")]
    nats_url: Option<String>,
    /// Start a three-node JetStream cluster instead of one nats-server:
    /// handoffd gets every node's URL and keeps its streams and buckets in
    /// three replicas, and so do the raw JetStream baselines.
    #[arg(long)]
    cluster: bool,
    /// Runs through the chain.
    #[arg(long, default_value_t = 1000)]
    chain_runs: u64,
    /// Fan-in widths, comma-separated, each `BRANCHES` or
    /// `BRANCHESxBARRIERS` (default barriers: 200 at 10 branches, 100 at
    /// 100, 20 at 1000, 3 beyond).
    #[arg(
        long,
        value_delimiter = ',',
        value_parser = parse_width,
        default_value = "10,100,1000,10000"
    )]
    fanin_widths: Vec<Width>,
    /// Chords measured (after 3 warm-up chords).
    #[arg(long, default_value_t = 30)]
    chord_repeats: u64,
    /// Tasks (branches) of each chord.
    #[arg(long, default_value_t = 100)]
    chord_tasks: u32,
    /// Minutes of the soak.
    #[arg(long, default_value_t = 10)]
    soak_minutes: u32,
    /// Handoffs per second of the soak (default: half the measured
    /// accepted-and-delivered throughput).
    #[arg(long)]
    soak_rate: Option<f64>,
    /// Handoffs in the throughput scenario.
    #[arg(long, default_value_t = 30_000)]
    throughput_count: u64,
    /// Concurrent producers in the throughput scenario.
    #[arg(long, default_value_t = 64)]
    producers: usize,
    /// Finished runs and open barriers for the scale scenario.
    #[arg(long, default_value_t = 100_000)]
    scale_n: u64,
    /// Runs holding state for the state scenario.
    #[arg(long, default_value_t = 100_000)]
    state_runs: u64,
    /// Runs stored for the list scenario.
    #[arg(long, default_value_t = 100_000)]
    list_runs: u64,
}

fn bar(len: u64, prefix: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template("{prefix:>24} [{bar:32}] {pos}/{len} {elapsed}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(prefix.to_string());
    bar
}

fn latency(h: &hdrhistogram::Histogram<u64>, raw: Option<&hdrhistogram::Histogram<u64>>) -> Figure {
    Figure::Latency {
        handoff: Latency::of(h),
        raw: raw.map(Latency::of),
    }
}

/// Whether a clustered nats-server of this version (`2.9.10`) checks a
/// write's expected last sequence in the replicated write itself, so that
/// of concurrent compare-and-set writes with the same revision only one
/// succeeds: from 2.9.21 on.
fn serializes_concurrent_cas(version: &str) -> bool {
    let parts: Vec<u64> = version
        .split(|c: char| !c.is_ascii_digit())
        .take(3)
        .map(|p| p.parse().unwrap_or(0))
        .collect();
    match parts[..] {
        [major, minor, patch] => (major, minor, patch) >= (2, 9, 21),
        _ => true,
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("handoff-bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), BoxError> {
    let all = args.scenarios.is_empty();
    let wants = |s: Scenario| (all && s != Scenario::Soak) || args.scenarios.contains(&s);
    let nats = match (&args.nats_url, args.cluster) {
        (Some(url), _) => stack::Nats::Url(url.clone()),
        (None, true) => {
            // The cluster helper logs through tracing; keep those lines
            // (errors only, unless RUST_LOG says more) off stdout, where
            // the table or the JSON goes.
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_writer(std::io::stderr)
                .try_init();
            stack::Nats::Cluster
        }
        (None, false) => stack::Nats::Single,
    };
    let stack = stack::Stack::start(nats, args.auth).await?;
    let client = stack.client().await?;
    let mut rows = Vec::new();
    let mut panels = Vec::new();
    let mut panel = |title: String,
                     handoff: &hdrhistogram::Histogram<u64>,
                     raw: Option<&hdrhistogram::Histogram<u64>>| {
        if args.plot.is_some() {
            panels.push(plot::Panel {
                title,
                handoff: handoff.clone(),
                raw: raw.cloned(),
            });
        }
    };

    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = stack.broker_rss();
    scenarios::prepare(&client).await?;
    chord::prepare(&client).await?;

    if wants(Scenario::Chain) {
        let runs = args.chain_runs;
        let (hop, e2e, call) =
            scenarios::chain(&client, runs, None, &bar(runs, "chain (handoffd)")).await?;
        let (state_hop, _, _) = scenarios::chain(
            &client,
            runs,
            Some(1024),
            &bar(runs, "chain with state (handoffd)"),
        )
        .await?;
        let (raw_hop, raw_e2e) = scenarios::raw_chain(
            stack.nats_url(),
            stack.replicas(),
            runs,
            &bar(runs, "chain (JetStream)"),
        )
        .await?;
        let (floor_hop, _) = floor::raw_chain_floor(
            stack.nats_url(),
            stack.replicas(),
            runs,
            &bar(runs, "chain (JetStream, handoffd's NATS operations)"),
        )
        .await?;
        panel("chain: per hop".into(), &hop, Some(&raw_hop));
        panel("chain: end to end, 5 hops".into(), &e2e, Some(&raw_e2e));
        rows.push(Row::new(
            "chain",
            "per hop (1 KiB, contract checked)",
            latency(&hop, Some(&raw_hop)),
        ));
        rows.push(Row::new(
            "chain",
            "end to end, 5 hops",
            latency(&e2e, Some(&raw_e2e)),
        ));
        rows.push(Row::new(
            "chain",
            "per hop; raw doing handoffd's NATS operations",
            latency(&hop, Some(&floor_hop)),
        ));
        rows.push(Row::new(
            "chain",
            "a handoff call, until answered",
            latency(&call, None),
        ));
        let grpc = scenarios::grpc_round_trip(stack.addr(), runs * 5).await?;
        rows.push(Row::new(
            "chain",
            "a gRPC round trip to handoffd (no NATS)",
            latency(&grpc, None),
        ));
        panel(
            "chain: per hop, 1 KiB state delta".into(),
            &state_hop,
            Some(&raw_hop),
        );
        rows.push(Row::new(
            "chain",
            "per hop with a 1 KiB state delta",
            latency(&state_hop, Some(&raw_hop)),
        ));
        let ratio = Latency::of(&state_hop).p50 / Latency::of(&hop).p50.max(f64::MIN_POSITIVE);
        rows.push(Row::new(
            "chain",
            "per-hop p50, with state delta / without",
            Figure::Ratio {
                value: ratio,
                of: "p50".into(),
            },
        ));
    }

    let mut fanin = wants(Scenario::Fanin);
    if fanin && args.cluster {
        let version = stack.nats_version().await?;
        if !serializes_concurrent_cas(&version) {
            eprintln!(
                "fanin skipped: on a cluster of nats-server {version}, compare-and-set writes \
                 made at the same time can all succeed (fixed in 2.9.21, nats-server#4319), so \
                 barriers and the raw counters lose branches and never release"
            );
            fanin = false;
        }
    }
    if fanin {
        for &Width {
            branches: n,
            barriers: iterations,
        } in &args.fanin_widths
        {
            let handoff = scenarios::fanin(
                &client,
                n,
                iterations,
                &bar(iterations, &format!("fan-in {n} (handoffd)")),
            )
            .await;
            let (raw_release, raw_total) = scenarios::raw_fanin(
                stack.nats_url(),
                stack.replicas(),
                n,
                iterations,
                &bar(iterations, &format!("fan-in {n} (JetStream)")),
            )
            .await?;
            let (release, total) = match handoff {
                Ok(figures) => figures,
                Err(e) => {
                    eprintln!("fan-in {n} (handoffd) failed: {e}");
                    for (what, raw) in [
                        ("last branch -> release", &raw_release),
                        ("opened -> release", &raw_total),
                    ] {
                        rows.push(Row::new(
                            "fanin",
                            format!("{n} branches: {what}"),
                            Figure::Failed {
                                error: e.to_string(),
                                raw: Some(Latency::of(raw)),
                            },
                        ));
                    }
                    continue;
                }
            };
            panel(
                format!("fan-in {n}: last branch -> release"),
                &release,
                Some(&raw_release),
            );
            panel(
                format!("fan-in {n}: opened -> release"),
                &total,
                Some(&raw_total),
            );
            rows.push(Row::new(
                "fanin",
                format!("{n} branches: last branch -> release"),
                latency(&release, Some(&raw_release)),
            ));
            rows.push(Row::new(
                "fanin",
                format!("{n} branches: opened -> release"),
                latency(&total, Some(&raw_total)),
            ));
        }
    }

    if wants(Scenario::Chord) {
        let repeats = args.chord_repeats;
        let shape = chord::Shape {
            tasks: args.chord_tasks,
            workers: 2,
            in_flight: 4,
        };
        let took = chord::chord(&client, shape, repeats, &bar(repeats, "chord (handoffd)")).await?;
        let raw = chord::raw_chord(
            stack.nats_url(),
            stack.replicas(),
            shape,
            chord::RawCount::Consumer,
            repeats,
            &bar(repeats, "chord (JetStream)"),
        )
        .await?;
        let raw_cas = chord::raw_chord(
            stack.nats_url(),
            stack.replicas(),
            shape,
            chord::RawCount::CompareAndSet,
            repeats,
            &bar(repeats, "chord (JetStream, CAS)"),
        )
        .await?;
        panel(
            format!("chord: {} tasks, submit -> release", shape.tasks),
            &took,
            Some(&raw),
        );
        rows.push(Row::new(
            "chord",
            format!("{} tasks, 2 workers x 4: submit -> release", shape.tasks),
            latency(&took, Some(&raw)),
        ));
        rows.push(Row::new(
            "chord",
            "the same, raw counting by compare-and-set",
            latency(&took, Some(&raw_cas)),
        ));
    }

    let mut loaded = None;
    if wants(Scenario::Scale) || wants(Scenario::Memory) {
        let n = args.scale_n;
        let runs = (args.chain_runs / 2).max(100);
        let (before, _, _) =
            scenarios::chain(&client, runs, None, &bar(runs, "scale: chain, empty")).await?;
        scenarios::populate(&client, n, n, &bar(2 * n, "scale: fill")).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        loaded = stack.broker_rss();
        let (after, _, _) =
            scenarios::chain(&client, runs, None, &bar(runs, "scale: chain, full")).await?;
        if wants(Scenario::Scale) {
            panel("scale: per hop, nothing kept".into(), &before, None);
            panel(
                format!("scale: per hop, {n} runs + {n} barriers kept"),
                &after,
                None,
            );
            rows.push(Row::new(
                "scale",
                "per hop, nothing kept",
                latency(&before, None),
            ));
            rows.push(Row::new(
                "scale",
                format!("per hop, {n} runs + {n} barriers kept"),
                latency(&after, None),
            ));
            let ratio = Latency::of(&after).p50 / Latency::of(&before).p50.max(f64::MIN_POSITIVE);
            rows.push(Row::new(
                "scale",
                "per-hop p50, full / empty",
                Figure::Ratio {
                    value: ratio,
                    of: "p50".into(),
                },
            ));
        }
    }

    let mut listed = false;
    if wants(Scenario::List) {
        let n = args.list_runs;
        let before = stack.broker_rss();
        listing::populate(&client, n, &bar(n, "list: runs stored")).await?;
        listed = true;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = stack.broker_rss();
        let samples = 200;
        let (first, ids) = listing::first_pages(&client, samples, None).await?;
        let (by_owner, _) = listing::first_pages(&client, samples, Some("list-3")).await?;
        let raw = listing::raw_page(stack.nats_url(), &ids, samples).await?;
        let (scan, keys) = listing::raw_scan(stack.nats_url()).await?;
        panel(
            format!("list: first page of 50, {n} runs"),
            &first,
            Some(&raw),
        );
        rows.push(Row::new(
            "list",
            format!("first page of 50, {n} runs stored (raw: reading its 50 records)"),
            latency(&first, Some(&raw)),
        ));
        rows.push(Row::new(
            "list",
            format!("first page of 50 of one owner (1 in {})", listing::OWNERS),
            latency(&by_owner, Some(&raw)),
        ));
        rows.push(Row::new(
            "list",
            format!("raw JetStream listing the runs bucket's {keys} keys, once"),
            latency(&scan, None),
        ));
        if let (Some(before), Some(after)) = (before, after) {
            rows.push(Row::new(
                "list",
                format!("handoffd RSS added by {n} runs"),
                Figure::Memory {
                    bytes: after.saturating_sub(before),
                },
            ));
        }
    }

    if wants(Scenario::Console) {
        let n = args.list_runs;
        let addr = stack
            .console()
            .ok_or("the broker did not report its console address")?;
        if !listed {
            listing::populate(&client, n, &bar(n, "console: runs stored")).await?;
        }
        let samples = 200;
        // Warm-up: the first render builds nothing lasting, but connections.
        console::runs_page(addr, "/", 5).await?;
        let page = console::runs_page(addr, "/", samples).await?;
        let by_owner = console::runs_page(addr, "/?owner=list-3", samples).await?;
        let (_, ids) = listing::first_pages(&client, 5, None).await?;
        let raw_page = listing::raw_page(stack.nats_url(), &ids, samples).await?;
        panel(
            format!("console: runs page, {n} runs"),
            &page,
            Some(&raw_page),
        );
        rows.push(Row::new(
            "console",
            format!("runs page (first 50 of {n} runs, rendered HTML; raw: reading its 50 records)"),
            latency(&page, Some(&raw_page)),
        ));
        rows.push(Row::new(
            "console",
            format!("runs page of one owner (1 in {})", listing::OWNERS),
            latency(&by_owner, Some(&raw_page)),
        ));
        let (told, shown) = console::event_to_page(&client, addr, samples).await?;
        let raw_event = console::raw_event(stack.nats_url(), samples).await?;
        panel(
            "console: event to live stream".into(),
            &told,
            Some(&raw_event),
        );
        rows.push(Row::new(
            "console",
            "event to an open run page's live stream (handoff call to SSE line; raw: publish to a waiting consumer)".to_string(),
            latency(&told, Some(&raw_event)),
        ));
        rows.push(Row::new(
            "console",
            "event to the run page read again showing it (what the page does on the line)"
                .to_string(),
            latency(&shown, Some(&raw_event)),
        ));
    }

    if wants(Scenario::State) || wants(Scenario::Memory) {
        let n = args.state_runs;
        let before = stack.broker_rss();
        scenarios::populate_state(&client, n, &bar(n, "state: runs holding state")).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        for (what, bytes) in [
            (
                "handoffd RSS, before the runs with state".to_string(),
                before,
            ),
            (
                format!("handoffd RSS, {n} runs holding state"),
                stack.broker_rss(),
            ),
        ] {
            if let Some(bytes) = bytes {
                rows.push(Row::new("state", what, Figure::Memory { bytes }));
            }
        }
    }

    let mut peak = None;
    let mut capacity = None;
    if wants(Scenario::Throughput) || wants(Scenario::Memory) {
        let count = args.throughput_count;
        let sampling = Arc::new(AtomicBool::new(true));
        let max_rss = Arc::new(AtomicU64::new(0));
        let sampler = {
            let (sampling, max_rss) = (sampling.clone(), max_rss.clone());
            let pid = stack.broker_pid();
            tokio::spawn(async move {
                while sampling.load(Ordering::Relaxed) {
                    if let Some(b) = pid.and_then(stack::rss) {
                        max_rss.fetch_max(b, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        };
        let (accepted, delivered) = scenarios::throughput(
            &client,
            count,
            args.producers,
            &bar(count, "throughput (handoffd)"),
        )
        .await?;
        sampling.store(false, Ordering::Relaxed);
        let _ = sampler.await;
        peak = Some(max_rss.load(Ordering::Relaxed));
        capacity = Some(delivered);
        let (raw_accepted, raw_delivered) = scenarios::raw_throughput(
            stack.nats_url(),
            stack.replicas(),
            count,
            args.producers,
            &bar(count, "throughput (JetStream)"),
        )
        .await?;
        rows.push(Row::new(
            "throughput",
            format!("accepted, {} producers, 1 KiB", args.producers),
            Figure::Rate {
                handoff: accepted,
                raw: Some(raw_accepted),
            },
        ));
        rows.push(Row::new(
            "throughput",
            "accepted and delivered (acked by 4 instances)",
            Figure::Rate {
                handoff: delivered,
                raw: Some(raw_delivered),
            },
        ));
        let (floor_accepted, floor_delivered) = floor::raw_floor(
            stack.nats_url(),
            stack.replicas(),
            count,
            args.producers,
            &bar(count, "throughput (JetStream, handoffd's NATS operations)"),
        )
        .await?;
        rows.push(Row::new(
            "throughput",
            "accepted; raw doing handoffd's NATS operations",
            Figure::Rate {
                handoff: accepted,
                raw: Some(floor_accepted),
            },
        ));
        rows.push(Row::new(
            "throughput",
            "accepted and delivered; the same",
            Figure::Rate {
                handoff: delivered,
                raw: Some(floor_delivered),
            },
        ));
    }

    if wants(Scenario::Payload) {
        for &(size, label, count) in payload::SIZES {
            let progress = bar(count, &format!("payload {label}"));
            let (h, raw) = payload::run(
                &client,
                stack.nats_url(),
                stack.replicas(),
                size,
                count,
                &progress,
            )
            .await?;
            panel(format!("payload: {label} end to end"), &h, Some(&raw));
            rows.push(Row::new(
                "payload",
                format!("{label}: submit -> delivered, resolved (raw: put+get)"),
                latency(&h, Some(&raw)),
            ));
        }
    }

    if wants(Scenario::Memory) {
        for (what, bytes) in [
            ("handoffd RSS, idle".to_string(), idle),
            ("handoffd RSS, peak under throughput".to_string(), peak),
            (
                format!("handoffd RSS, {} open barriers", args.scale_n),
                loaded,
            ),
        ] {
            if let Some(bytes) = bytes {
                rows.push(Row::new("memory", what, Figure::Memory { bytes }));
            }
        }
    }

    let mut soaked = None;
    if wants(Scenario::Soak) {
        let capacity = match (args.soak_rate, capacity) {
            (Some(rate), _) => 2.0 * rate,
            (None, Some(c)) => c,
            (None, None) => {
                let count = args.throughput_count;
                scenarios::throughput(
                    &client,
                    count,
                    args.producers,
                    &bar(count, "soak: capacity"),
                )
                .await?
                .1
            }
        };
        let rate = capacity / 2.0;
        let minutes = args.soak_minutes.max(1);
        let expected = (rate * 60.0 * f64::from(minutes)) as u64;
        let s = soak::soak(
            &client,
            rate,
            capacity,
            minutes,
            stack.broker_pid(),
            stack.nats_pid(),
            stack.nats_url(),
            &bar(expected, &format!("soak at {rate:.0}/s")),
        )
        .await?;
        rows.extend(s.rows());
        soaked = Some(s);
    }

    if let Some(path) = &args.plot {
        if !panels.is_empty() {
            plot::write(path, &panels)?;
            eprintln!("latency distributions drawn in {}", path.display());
        }
        if let Some(s) = &soaked {
            let path = soak::plot_path(path, panels.is_empty());
            s.plot(&path)?;
            eprintln!(
                "soak RSS and latency per minute drawn in {}",
                path.display()
            );
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", report::table(&rows));
        if let Some(s) = &soaked {
            print!("\n{}", s.table());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{parse_width, serializes_concurrent_cas, Width};

    #[test]
    fn fanin_widths_name_their_barriers_or_take_the_default() {
        assert_eq!(
            parse_width("1000"),
            Ok(Width {
                branches: 1000,
                barriers: 20
            })
        );
        assert_eq!(
            parse_width("10000x2"),
            Ok(Width {
                branches: 10_000,
                barriers: 2
            })
        );
        assert_eq!(parse_width("10").map(|w| w.barriers), Ok(200));
        assert!(parse_width("1").is_err());
        assert!(parse_width("100x0").is_err());
        assert!(parse_width("many").is_err());
    }

    #[test]
    fn concurrent_compare_and_set_is_serialized_from_2_9_21() {
        assert!(!serializes_concurrent_cas("2.9.10"));
        assert!(!serializes_concurrent_cas("2.9.20"));
        assert!(serializes_concurrent_cas("2.9.21"));
        assert!(serializes_concurrent_cas("2.10.0-beta.1"));
        assert!(serializes_concurrent_cas("2.11.4"));
    }
}
