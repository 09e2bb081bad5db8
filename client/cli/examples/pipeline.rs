//! A typed multi-agent pipeline over the handoff broker: a planner fans
//! an ask out to parallel workers, a barrier joins their results, and an
//! aggregator receives them all at once and completes the run.
//!
//! ```text
//! cargo run -p handoffctl --example pipeline                 # embedded broker
//! cargo run -p handoffctl --example pipeline -- --addr http://127.0.0.1:7233
//! cargo run -p handoffctl --example pipeline -- --addr http://127.0.0.1:7233 --external-workers
//! ```
//!
//! Without `--addr` the example starts `handoffd` in-process on its
//! embedded default (a `nats-server` child with its store in a temporary
//! directory) and stops it at the end. Then:
//!
//! 1. it registers the demo contracts `handoff.demo.v1.{Ask, Subtask,
//!    WorkerResult, Report}` (from `handoff_proto::DEMO_FILE_DESCRIPTOR_SET`)
//!    with their rules: an `Ask` needs its `question`; a `Subtask` needs its
//!    `instruction` and stays within a token budget; a `WorkerResult` needs
//!    its `summary`, a confidence of at least 0.5 and fresh tool results; a
//!    `Report` needs its `answer`;
//! 2. it registers the agents with the contract each accepts and the ones
//!    it emits: planner (Ask -> Subtask), worker (Subtask -> WorkerResult),
//!    aggregator (accepts WorkerResult: the contract every worker's result
//!    is checked against when it reaches the aggregator's barrier; it
//!    emits the `Report` it completes the run with);
//! 3. it starts a run with a pinned ask and shows the guards at work: a
//!    `Subtask` without its `instruction`, and a `WorkerResult` below the
//!    minimum confidence handed straight to the aggregator, are refused at
//!    the door (nothing is stored; the run's timeline records each refusal
//!    as `contract_rejected`);
//! 4. it hands an `Ask` to the planner. The planner consumes it with one
//!    fan-out, `delivery.fan_out("worker", subtasks).join("aggregator",
//!    JoinMode::All)`: the broker opens a barrier for the four branches
//!    (`barrier_opened`), stores one `Subtask` handoff per branch
//!    (`handoff_accepted` each) and then acks the ask. Two worker
//!    instances share the worker inbox, decode their deliveries as
//!    `Subtask` (a typed subscription) and answer each branch to the
//!    barrier (`branch_arrived` each) with a `WorkerResult`, its
//!    confidence and its tool result: `Handoff::to_barrier` sent with
//!    `delivery.handoff`, the builder form of `delivery.to_barrier(&result)`
//!    (the contract's `min_confidence` refuses a result whose confidence is
//!    not stated).
//!    When the last branch arrives the barrier releases exactly one
//!    handoff to the aggregator (`barrier_released`): a
//!    `handoff.v1.BarrierRelease`, so the aggregator subscribes untyped
//!    and decodes it with `delivery.join::<WorkerResult>()`, getting every
//!    result in branch order. It completes the run with a final handoff
//!    carrying the `Report`.
//!
//! With `--external-workers` the example runs no worker instance: it
//! registers everything as above and runs the planner and the aggregator,
//! and the subtasks wait in the worker inbox for instances of another
//! program (the Python worker of `client/python/examples/demo.py`) to
//! take them.
//!
//! Each worker also records its summary in the run state
//! (`summary.<branch>`), and the aggregator the brief (`report`).
//!
//! The main task waits for the run's end event, prints the run's timeline,
//! the barrier (as `handoffctl barrier show` does) and the report, and
//! exits non-zero unless the run completed. `--runs N` makes N runs one
//! after the other (the tables are the last one's); with the embedded
//! broker the example prints the console's address of the last run, and
//! `--console` keeps the broker up for it until Ctrl-C.

use std::{
    collections::HashSet,
    error::Error,
    process::ExitCode,
    time::{Duration, SystemTime},
};

use clap::Parser;
use futures::{Stream, StreamExt as _};
use handoff_client::{
    pb, AgentConfig, Client, ContractSpec, Delivery, ErrorKind, Handoff, JoinMode, RunConfig,
    StateDelta, TypedDelivery, WatchFilter,
};
use handoff_proto::{
    demo::{Ask, Citation, Report, Subtask, WorkerResult},
    DEMO_FILE_DESCRIPTOR_SET,
};
use handoffctl::display;
use tokio::{
    net::TcpListener,
    sync::{oneshot, watch},
    task::JoinHandle,
};

type BoxError = Box<dyn Error + Send + Sync>;

/// The ask pinned to the run; every agent sees it verbatim.
const ASK: &str = "Summarise four quarterly reports into one brief";
/// The reports the planner splits the ask over: one subtask (one branch)
/// each.
const SOURCES: [&str; 4] = [
    "report-q1.pdf",
    "report-q2.pdf",
    "report-q3.pdf",
    "report-q4.pdf",
];
/// How long the barrier waits for every branch before it releases a
/// failure to the aggregator.
const JOIN_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the run may take before the demo gives up.
const RUN_WAIT: Duration = Duration::from_secs(30);
/// How long to wait for the last ack event once the run has ended.
const SETTLE_WAIT: Duration = Duration::from_secs(5);

// ------------------------------------------------------------ main

/// The planner -> workers -> barrier -> aggregator demo.
#[derive(Parser, Debug)]
struct Args {
    /// Broker to use; without it, handoffd is started in-process.
    #[arg(long, value_name = "ADDR")]
    addr: Option<String>,
    /// Run no worker instance: the subtasks wait in the worker inbox for
    /// instances of another program (registered here all the same).
    #[arg(long)]
    external_workers: bool,
    /// How many runs to make, one after the other (the tables are printed
    /// for the last one).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    runs: u32,
    /// How long each worker works on a subtask, in milliseconds.
    #[arg(long, default_value_t = 200)]
    work_ms: u64,
    /// With the embedded broker: keep it up, its console open on the last
    /// run, until Ctrl-C.
    #[arg(long)]
    console: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    // With OTEL_EXPORTER_OTLP_ENDPOINT set, the SDK's spans (each handoff
    // call, each delivery processed) are exported there.
    let traces = match export_traces() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("pipeline: OTEL_EXPORTER_OTLP_ENDPOINT: {e}");
            return ExitCode::FAILURE;
        }
    };

    let (addr, embedded) = match args.addr {
        Some(addr) => (addr, None),
        None => match EmbeddedBroker::start().await {
            Ok(b) => (format!("http://{}", b.addr), Some(b)),
            Err(e) => {
                eprintln!("pipeline: cannot start handoffd: {e}");
                return ExitCode::FAILURE;
            }
        },
    };

    let work = Duration::from_millis(args.work_ms);
    let outcome = demo(&addr, !args.external_workers, args.runs, work).await;
    if let (Ok((_, last)), Some(broker)) = (&outcome, &embedded) {
        match broker.console {
            Some(console) => println!("\nconsole: http://{console}/runs/{last}"),
            None => println!("\nconsole: off (console_listen is empty or its port is taken)"),
        }
    }
    if args.console && embedded.is_some() {
        println!("the broker stays up for the console; Ctrl-C stops it");
        let _ = tokio::signal::ctrl_c().await;
    }
    let outcome = outcome.map(|(completed, _)| completed);

    let mut code = match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("pipeline: the run did not complete");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("pipeline: {e}");
            ExitCode::FAILURE
        }
    };
    if let Some(broker) = embedded {
        if let Err(e) = broker.stop().await {
            eprintln!("pipeline: stopping handoffd: {e}");
            code = ExitCode::FAILURE;
        }
    }
    if let Some(provider) = traces {
        // The last spans: exported before exit (the SDK blocks here).
        let flushed = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        if !matches!(flushed, Ok(Ok(()))) {
            eprintln!("pipeline: traces not flushed: {flushed:?}");
        }
    }
    code
}

/// Installs the global tracer provider the SDK's spans go to, exporting
/// over OTLP/gRPC to `OTEL_EXPORTER_OTLP_ENDPOINT`; `None` when it is
/// unset.
fn export_traces() -> Result<Option<opentelemetry_sdk::trace::SdkTracerProvider>, BoxError> {
    use opentelemetry_otlp::WithExportConfig as _;
    let Ok(endpoint) = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT") else {
        return Ok(None);
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()?;
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name("handoff-demo-pipeline")
                .build(),
        )
        .with_batch_exporter(exporter)
        .build();
    opentelemetry::global::set_tracer_provider(provider.clone());
    Ok(Some(provider))
}

/// Registers the contracts every handoff is checked against.
async fn register_contracts(client: &Client) -> Result<(), BoxError> {
    let specs = [
        ContractSpec::of::<Ask>(DEMO_FILE_DESCRIPTOR_SET)
            .require("question")
            .max_tokens(500),
        ContractSpec::of::<Subtask>(DEMO_FILE_DESCRIPTOR_SET)
            .require("instruction")
            .max_tokens(200),
        ContractSpec::of::<WorkerResult>(DEMO_FILE_DESCRIPTOR_SET)
            .require("summary")
            .min_confidence(0.5)
            .max_tool_result_age(Duration::from_secs(600)),
        ContractSpec::of::<Report>(DEMO_FILE_DESCRIPTOR_SET).require("answer"),
    ];
    for spec in specs {
        let registered = client.register_contract(spec).await?;
        let c = &registered.contract;
        println!(
            "contract {} ({}): {}",
            display::contract_name(&c.message_type, c.version),
            if registered.created {
                "registered"
            } else {
                "already registered"
            },
            display::rules_summary(c.rules.as_ref())
        );
    }
    Ok(())
}

/// Runs the pipeline `runs` times, with two worker instances of its own
/// if `workers`; `Ok(true)` if every run completed, with the last run's id.
async fn demo(
    addr: &str,
    workers: bool,
    runs: u32,
    work: Duration,
) -> Result<(bool, String), BoxError> {
    let client = Client::connect(addr).await?;

    register_contracts(&client).await?;
    for agent in [
        AgentConfig::new("planner")
            .description("splits the ask into subtasks")
            .accepts::<Ask>()
            .emits::<Subtask>(),
        AgentConfig::new("worker")
            .description("does one subtask")
            .accepts::<Subtask>()
            .emits::<WorkerResult>(),
        // Accepts WorkerResult: the branch results that reach its barrier
        // are checked against it. What it receives is the barrier's one
        // release, a handoff.v1.BarrierRelease carrying them all.
        AgentConfig::new("aggregator")
            .description("merges the results into the brief")
            .accepts::<WorkerResult>()
            .emits::<Report>(),
    ] {
        client
            .register_agent(agent.lease(Duration::from_secs(30)))
            .await?;
    }

    let mut first = start_demo_run(&client).await?;

    show_guards(&client, &first.id).await?;

    // Subscribe before handing off, so a failing subscription is reported
    // before any work is queued. Dropping `stop` also stops the agents.
    let (stop, stopped) = watch::channel(false);
    let mut agents: Vec<JoinHandle<()>> = vec![
        spawn_agent(
            "planner",
            client.subscribe_typed("planner", "planner-1", 1).await?,
            stopped.clone(),
            planner,
        ),
        // Untyped: the release is a BarrierRelease, not a WorkerResult.
        spawn_agent(
            "aggregator",
            client.subscribe("aggregator", "aggregator-1", 1).await?,
            stopped.clone(),
            aggregator,
        ),
    ];
    if workers {
        agents.push(spawn_agent(
            "worker-1",
            client.subscribe_typed("worker", "worker-1", 1).await?,
            stopped.clone(),
            move |d| worker("worker-1", work, d),
        ));
        agents.push(spawn_agent(
            "worker-2",
            client.subscribe_typed("worker", "worker-2", 1).await?,
            stopped,
            move |d| worker("worker-2", work, d),
        ));
    } else {
        println!("no worker instance here: the subtasks wait for instances of another program");
    }

    let ask = Ask {
        question: ASK.to_string(),
        max_subtasks: SOURCES.len() as u32,
    };
    let mut all_completed = true;
    let mut ended = Ok(None);
    for n in 1..=runs {
        let run = if n == 1 {
            first.clone()
        } else {
            start_demo_run(&client).await?
        };
        let receipt = client
            .handoff(Handoff::to(&run.id, "planner", &ask)?.idempotency_key("ask"))
            .await?;
        println!("handed the ask to planner (handoff {})", receipt.handoff_id);
        ended = wait_for_end(&client, &run.id).await;
        let completed =
            matches!(&ended, Ok(Some(e)) if e.kind == pb::EventKind::RunCompleted as i32);
        all_completed &= completed;
        first = run;
        if !completed {
            break;
        }
    }
    let run = first;
    // Let each agent finish the step it is in (the aggregator's handoff
    // answers just after the run completes), then stop them.
    let _ = stop.send(true);
    for mut task in agents {
        if tokio::time::timeout(Duration::from_secs(10), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
    let ended = ended?;
    if ended.is_some() {
        wait_settled(&client, &run.id).await?;
    }

    let resp = client.get_run(&run.id).await?;
    let run = resp.run.ok_or("the broker answered without the run")?;
    println!();
    print!("{}", display::run_table(&run, &resp.timeline));
    let opened = resp
        .timeline
        .iter()
        .find(|e| e.kind == pb::EventKind::BarrierOpened as i32);
    if let Some(opened) = opened {
        let barrier = client.get_barrier(&run.id, &opened.barrier_id).await?;
        println!();
        print!("{}", display::barrier_table(&barrier));
    }
    let completed = run.status == pb::RunStatus::Completed as i32 && all_completed;
    if completed {
        if let Some(result) = &run.result {
            let report: Report = handoff_client::decode(result)?;
            println!("\nresult ({}):", result.type_url);
            println!("  {}", report.answer);
            for r in &report.results {
                println!("  {}/{}: {}", r.index + 1, r.of, r.summary);
            }
        }
    } else if let Some(e) = ended {
        println!("\nrun ended with {}", display::kind(e.kind));
    }
    Ok((completed, run.id))
}

/// Starts a run of the demo: its ask pinned, with its audience.
async fn start_demo_run(client: &Client) -> Result<pb::Run, BoxError> {
    let run = client
        .start_run(
            RunConfig::new("demo-user")
                .ask(ASK)
                .pin("audience", "leadership")
                .timeout(Duration::from_secs(60)),
        )
        .await?;
    println!("run {} started by {}", run.id, run.owner);
    Ok(run)
}

/// Sends two handoffs that break their receiver's contract and prints the
/// refusals. An accepted one is an error: the guard did not hold.
async fn show_guards(client: &Client, run_id: &str) -> Result<(), BoxError> {
    let no_instruction = Subtask {
        index: 0,
        of: 1,
        instruction: String::new(),
        sources: vec![SOURCES[0].to_string()],
    };
    let unsure = WorkerResult {
        index: 0,
        of: 1,
        summary: "revenue may have grown, perhaps".to_string(),
        citations: vec![],
    };
    let attempts = [
        (
            "a Subtask without its instruction",
            Handoff::to(run_id, "worker", &no_instruction)?,
        ),
        (
            "a WorkerResult with confidence 0.2, handed straight to the aggregator",
            Handoff::to(run_id, "aggregator", &unsure)?.confidence(0.2),
        ),
    ];
    for (what, handoff) in attempts {
        match client.handoff(handoff).await {
            Err(e) if e.kind() == ErrorKind::FailedPrecondition => {
                println!("{what}: refused as expected: {e}");
            }
            Err(e) => return Err(format!("{what}: refused for another reason: {e}").into()),
            Ok(r) => return Err(format!("{what} was accepted (handoff {})", r.handoff_id).into()),
        }
    }
    Ok(())
}

/// Waits for the run's end event (replaying from the start of the events
/// stream, so an end that already happened is seen too). `None`: no end
/// within [`RUN_WAIT`].
async fn wait_for_end(client: &Client, run_id: &str) -> Result<Option<pb::Event>, BoxError> {
    let mut events = client
        .watch(
            WatchFilter::all()
                .run(run_id)
                .kinds([
                    pb::EventKind::RunCompleted,
                    pb::EventKind::RunFailed,
                    pb::EventKind::RunTimedOut,
                ])
                .from_sequence(1),
        )
        .await?;
    match tokio::time::timeout(RUN_WAIT, events.next()).await {
        Ok(Some(event)) => Ok(Some(event?)),
        Ok(None) => Err("the broker ended the event stream".into()),
        Err(_) => {
            eprintln!("pipeline: no end of run {run_id} within {RUN_WAIT:?}");
            Ok(None)
        }
    }
}

/// Waits (at most [`SETTLE_WAIT`]) until every delivery of the run shows
/// as settled in its events. The ack of the last hop is published just
/// after the run's end event, so a timeline read at once may lack it.
async fn wait_settled(client: &Client, run_id: &str) -> Result<(), BoxError> {
    use pb::EventKind as K;
    let mut events = client
        .watch(WatchFilter::all().run(run_id).from_sequence(1))
        .await?;
    let (mut delivered, mut settled) = (HashSet::new(), HashSet::new());
    let mut ended = false;
    let deadline = tokio::time::Instant::now() + SETTLE_WAIT;
    while !(ended && delivered.is_subset(&settled)) {
        let event = match tokio::time::timeout_at(deadline, events.next()).await {
            Ok(Some(event)) => event?,
            Ok(None) | Err(_) => break,
        };
        match K::try_from(event.kind) {
            Ok(K::Delivered | K::Redelivered) => {
                delivered.insert(event.handoff_id);
            }
            Ok(K::Acked | K::Rejected | K::DeadLettered | K::RoutedToFallback | K::Discarded) => {
                settled.insert(event.handoff_id);
            }
            Ok(K::RunCompleted | K::RunFailed | K::RunTimedOut) => ended = true,
            _ => {}
        }
    }
    Ok(())
}

// ------------------------------------------------------------ agents

/// A delivery, typed or not, that the agent loop can reject.
trait AsDelivery {
    fn as_delivery(&self) -> &Delivery;
}

impl AsDelivery for Delivery {
    fn as_delivery(&self) -> &Delivery {
        self
    }
}

impl<T> AsDelivery for TypedDelivery<T> {
    fn as_delivery(&self) -> &Delivery {
        self.delivery()
    }
}

/// Runs `step` on each delivery of `sub` until `stop` turns true (a step
/// under way is finished first). A step that fails rejects its delivery,
/// which fails the run, or only its branch for a worker (and the demo says
/// so). A delivery that does not
/// decode as a typed subscription's `T` is rejected by the subscription.
fn spawn_agent<S, D, F, Fut>(
    name: &'static str,
    mut sub: S,
    mut stop: watch::Receiver<bool>,
    step: F,
) -> JoinHandle<()>
where
    S: Stream<Item = handoff_client::Result<D>> + Unpin + Send + 'static,
    D: AsDelivery + Clone + Send + 'static,
    F: Fn(D) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), BoxError>> + Send,
{
    tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                next = sub.next() => next,
                _ = stop.wait_for(|stop| *stop) => return,
            };
            let delivery = match next {
                Some(Ok(d)) => d,
                Some(Err(e)) if e.kind() == ErrorKind::Decode => {
                    eprintln!("[{name}] {e}");
                    continue;
                }
                Some(Err(e)) => {
                    eprintln!("[{name}] subscription ended: {e}");
                    return;
                }
                None => return,
            };
            if let Err(e) = step(delivery.clone()).await {
                eprintln!("[{name}] failed: {e}; rejecting the delivery");
                if let Err(e) = delivery.as_delivery().reject(e.to_string()).await {
                    eprintln!("[{name}] reject failed: {e}");
                }
            }
        }
    })
}

/// Where a delivery was checked, for the log lines.
fn checked(contract: Option<(&str, u32)>, tokens: u64) -> String {
    match contract {
        Some((t, v)) => format!("{}, {tokens} tokens", display::contract_name(t, v)),
        None => "unchecked".to_string(),
    }
}

/// Splits the ask into one subtask per source and fans them out to
/// `worker`, joined at a barrier that releases to `aggregator` once every
/// branch has reported. One call: the broker opens the barrier, stores
/// every branch and then acks the ask. Redone after a crash, the same
/// fan-out opens the same barrier (its id derives from the subtasks) and
/// repeats the same branch handoffs, recognised as duplicates.
async fn planner(delivery: TypedDelivery<Ask>) -> Result<(), BoxError> {
    let ask = delivery.payload();
    println!(
        "[planner] received the ask {:?} ({})",
        ask.question,
        checked(delivery.contract(), delivery.token_count())
    );
    let n = match ask.max_subtasks {
        0 => SOURCES.len(),
        n => (n as usize).min(SOURCES.len()),
    };
    let subtasks = SOURCES
        .iter()
        .take(n)
        .enumerate()
        .map(|(i, source)| Subtask {
            index: i as u32,
            of: n as u32,
            instruction: format!("Summarise {source} for the brief: {}", ask.question),
            sources: vec![source.to_string()],
        });
    let fanned = delivery
        .fan_out("worker", subtasks)
        .timeout(JOIN_TIMEOUT)
        .join("aggregator", JoinMode::All)
        .await?;
    println!(
        "[planner] fanned out {n} subtasks to worker; barrier {} joins them for aggregator",
        fanned.barrier_id
    );
    for (key, receipt) in fanned.keys.iter().zip(&fanned.branches) {
        println!(
            "[planner]   branch {key}: handoff {} (depth {}{})",
            short(&receipt.handoff_id),
            receipt.depth,
            if receipt.duplicate { ", duplicate" } else { "" }
        );
    }
    Ok(())
}

/// Does one subtask and reports its result to the barrier of its branch.
async fn worker(
    instance: &'static str,
    work: Duration,
    delivery: TypedDelivery<Subtask>,
) -> Result<(), BoxError> {
    let task = delivery.payload();
    let pinned = delivery.pinned();
    let (barrier, key) = delivery
        .barrier_branch()
        .ok_or("the subtask came without its barrier branch")?;
    println!(
        "[{instance}] received subtask {}/{} on branch {key} of {barrier} ({}, attempt {})",
        task.index + 1,
        task.of,
        checked(delivery.contract(), delivery.token_count()),
        delivery.attempt()
    );
    if pinned.ask.is_empty() {
        return Err("the pinned ask did not reach the worker".into());
    }
    // The work: long enough for the other instance to take the next one.
    tokio::time::sleep(work).await;
    let source = task.sources.first().map_or("nowhere", String::as_str);
    let audience = pinned
        .fields
        .get("audience")
        .map_or("anyone", String::as_str);
    let citation = Citation {
        source: source.to_string(),
        quote: format!("key figures of {source}"),
    };
    let result = WorkerResult {
        index: task.index,
        of: task.of,
        summary: format!("{source}: the points that matter to {audience}"),
        citations: vec![citation.clone()],
    };
    // The result goes to the barrier of this branch, and is checked there
    // against the aggregator's contract: WorkerResult wants a stated
    // confidence of at least 0.5 and fresh tool results, so this uses the
    // builder behind `delivery.to_barrier(&result)` to state them.
    let receipt = delivery
        .handoff(
            Handoff::to_barrier(delivery.run_id(), barrier, key, &result)?
                .confidence(0.9)
                .tool_result("read_pdf", SystemTime::now(), &citation)?
                // The run state keeps each summary, one key per branch.
                .state_delta(
                    StateDelta::new().set(format!("summary.{key}"), result.summary.clone()),
                ),
        )
        .await?;
    println!(
        "[{instance}] reported branch {key} to the barrier (handoff {}, depth {})",
        short(&receipt.handoff_id),
        receipt.depth
    );
    Ok(())
}

/// Receives the barrier's one release, with every worker's result in
/// branch order, and completes the run with the report (a final handoff
/// that consumes the release). A release that is a failure, or lacks a
/// branch, fails the step and so the run.
async fn aggregator(delivery: Delivery) -> Result<(), BoxError> {
    let join = delivery.join::<WorkerResult>()?;
    println!(
        "[aggregator] received the release of barrier {}: {} of {} branches arrived (confidence {})",
        join.barrier_id,
        join.results().count(),
        join.branches.len(),
        join.confidence
    );
    if join.failure || !join.missing.is_empty() || !join.failed.is_empty() {
        return Err(format!(
            "the join is incomplete: missing {:?}, failed {:?}; {}",
            join.missing,
            join.failed,
            join.warnings.join("; ")
        )
        .into());
    }
    let results: Vec<WorkerResult> = join.results().map(|(_, r)| r.clone()).collect();
    let report = Report {
        answer: format!(
            "Brief for {}: {} reports summarised",
            delivery
                .pinned()
                .fields
                .get("audience")
                .map_or("anyone", String::as_str),
            results.len()
        ),
        results,
    };
    delivery
        .handoff(
            Handoff::final_result(delivery.run_id(), &report)?
                .state_delta(StateDelta::new().set("report", report.answer.clone())),
        )
        .await?;
    println!(
        "[aggregator] completed the run with a report of {} results",
        report.results.len()
    );
    Ok(())
}

fn short(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

// ------------------------------------------------------------ embedded broker

/// handoffd running in this process on its embedded nats-server.
struct EmbeddedBroker {
    addr: std::net::SocketAddr,
    /// The console's address, if it serves.
    console: Option<std::net::SocketAddr>,
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<Result<(), handoffd::RunError>>,
    /// Kept until the broker (and its nats-server) has stopped.
    _data_dir: tempfile::TempDir,
}

impl EmbeddedBroker {
    async fn start() -> Result<EmbeddedBroker, BoxError> {
        let data_dir = tempfile::TempDir::new()?;
        let config = handoffd::Config {
            data_dir: data_dir.path().to_path_buf(),
            ..handoffd::Config::default()
        };
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let (shutdown, shutdown_rx) = oneshot::channel::<()>();
        let (ready_tx, ready_rx) = oneshot::channel();
        let mut task = tokio::spawn(handoffd::run_with(
            config,
            listener,
            async {
                let _ = shutdown_rx.await;
            },
            Some(ready_tx),
        ));
        let ready = tokio::select! {
            ready = tokio::time::timeout(Duration::from_secs(30), ready_rx) => ready,
            // The broker stopped before it was ready: report why.
            ended = &mut task => {
                return Err(match ended {
                    Ok(Err(e)) => e.into(),
                    Ok(Ok(())) => "handoffd stopped before it was ready".into(),
                    Err(e) => format!("handoffd task: {e}").into(),
                });
            }
        };
        match ready {
            Ok(Ok(ready)) => {
                println!(
                    "handoffd serving on {} (embedded nats-server at {})",
                    ready.addr, ready.nats_url
                );
                Ok(EmbeddedBroker {
                    addr: ready.addr,
                    console: ready.console_addr,
                    shutdown,
                    task,
                    _data_dir: data_dir,
                })
            }
            Ok(Err(_)) => match task.await {
                Ok(Err(e)) => Err(e.into()),
                _ => Err("handoffd stopped before it was ready".into()),
            },
            Err(_) => {
                let _ = shutdown.send(());
                let _ = task.await;
                Err("handoffd was not ready within 30s".into())
            }
        }
    }

    /// Drains the broker and stops its nats-server.
    async fn stop(self) -> Result<(), BoxError> {
        let _ = self.shutdown.send(());
        let result = match tokio::time::timeout(Duration::from_secs(30), self.task).await {
            Ok(Ok(r)) => r.map_err(Into::into),
            Ok(Err(e)) => Err(format!("handoffd task: {e}").into()),
            Err(_) => Err("handoffd did not stop within 30s".into()),
        };
        drop(self._data_dir);
        result
    }
}
