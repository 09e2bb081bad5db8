//! A typed multi-agent pipeline over the handoff broker: a planner fans
//! an ask out to workers, the workers' results fan back in to an
//! aggregator, which completes the run.
//!
//! ```text
//! cargo run -p handoff-client --example pipeline                 # embedded broker
//! cargo run -p handoff-client --example pipeline -- --addr http://127.0.0.1:7233
//! ```
//!
//! Without `--addr` the example starts `handoffd` in-process on its
//! embedded default (a `nats-server` child with its store in a temporary
//! directory) and stops it at the end. Then:
//!
//! 1. it registers the demo contracts `handoff.demo.v1.{Ask, Subtask,
//!    WorkerResult}` (from `handoff_proto::DEMO_FILE_DESCRIPTOR_SET`) with
//!    their rules: an `Ask` needs its `question`; a `Subtask` needs its
//!    `instruction` and stays within a token budget; a `WorkerResult` needs
//!    its `summary`, a confidence of at least 0.5 and fresh tool results;
//! 2. it registers the agents with the contract each accepts and the ones
//!    it emits: planner (Ask -> Subtask), worker (Subtask -> WorkerResult),
//!    aggregator (WorkerResult -> the run's final `Report`);
//! 3. it starts a run with a pinned ask and shows the guards at work: a
//!    `Subtask` without its `instruction` and a `WorkerResult` below the
//!    minimum confidence are refused at the door (nothing is stored; the
//!    run's timeline records each refusal as `contract_rejected`);
//! 4. it hands an `Ask` to the planner. The planner consumes it and fans
//!    out three `Subtask`s to `worker` (complete-and-handoff, one
//!    idempotency key per subtask, each marked fan-out); two worker
//!    instances share the worker inbox, decode their deliveries as
//!    `Subtask` (a typed subscription) and each hands a `WorkerResult` to
//!    the aggregator; the aggregator collects them by index, acks the
//!    first two and completes the run with the third (a final handoff
//!    carrying the `Report`).
//!
//! The main task waits for the run's end event, prints the run's timeline
//! and the report, and exits non-zero unless the run completed.

use std::{
    collections::{BTreeMap, HashSet},
    error::Error,
    process::ExitCode,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use clap::Parser;
use futures::StreamExt as _;
use handoff_client::{
    display, pb, AgentConfig, Client, ContractSpec, ErrorKind, Handoff, RunConfig, TypedDelivery,
    TypedSubscription, WatchFilter,
};
use handoff_proto::{
    demo::{Ask, Citation, Report, Subtask, WorkerResult},
    DEMO_FILE_DESCRIPTOR_SET,
};
use tokio::{
    net::TcpListener,
    sync::{oneshot, watch},
    task::JoinHandle,
};

type BoxError = Box<dyn Error + Send + Sync>;

/// The ask pinned to the run; every agent sees it verbatim.
const ASK: &str = "Summarise three quarterly reports into one brief";
/// The reports the planner splits the ask over: one subtask each.
const SOURCES: [&str; 3] = ["report-q1.pdf", "report-q2.pdf", "report-q3.pdf"];
/// How long the run may take before the demo gives up.
const RUN_WAIT: Duration = Duration::from_secs(30);
/// How long to wait for the last ack event once the run has ended.
const SETTLE_WAIT: Duration = Duration::from_secs(5);

// ------------------------------------------------------------ main

/// The planner -> workers -> aggregator demo.
#[derive(Parser, Debug)]
struct Args {
    /// Broker to use; without it, handoffd is started in-process.
    #[arg(long, value_name = "ADDR")]
    addr: Option<String>,
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

    let outcome = demo(&addr).await;

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
    code
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

/// Runs the pipeline once; `Ok(true)` if the run completed.
async fn demo(addr: &str) -> Result<bool, BoxError> {
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
        AgentConfig::new("aggregator")
            .description("merges the results into the brief")
            .accepts::<WorkerResult>(),
    ] {
        client
            .register_agent(agent.lease(Duration::from_secs(30)))
            .await?;
    }

    let run = client
        .start_run(
            RunConfig::new("demo-user")
                .ask(ASK)
                .pin("audience", "leadership")
                .timeout(Duration::from_secs(60)),
        )
        .await?;
    println!("run {} started by {}", run.id, run.owner);

    show_guards(&client, &run.id).await?;

    // Subscribe before handing off, so a failing subscription is reported
    // before any work is queued. Dropping `stop` also stops the agents.
    let (stop, stopped) = watch::channel(false);
    let collected = Arc::new(Mutex::new(BTreeMap::new()));
    let agents: Vec<JoinHandle<()>> = vec![
        spawn_agent(
            "planner",
            client.subscribe_typed("planner", "planner-1", 1).await?,
            stopped.clone(),
            planner,
        ),
        spawn_agent(
            "worker-1",
            client.subscribe_typed("worker", "worker-1", 1).await?,
            stopped.clone(),
            |d| worker("worker-1", d),
        ),
        spawn_agent(
            "worker-2",
            client.subscribe_typed("worker", "worker-2", 1).await?,
            stopped.clone(),
            |d| worker("worker-2", d),
        ),
        spawn_agent(
            "aggregator",
            client
                .subscribe_typed("aggregator", "aggregator-1", 1)
                .await?,
            stopped,
            move |d| aggregator(collected.clone(), d),
        ),
    ];

    let ask = Ask {
        question: ASK.to_string(),
        max_subtasks: SOURCES.len() as u32,
    };
    let receipt = client
        .handoff(Handoff::to(&run.id, "planner", &ask)?.idempotency_key("ask"))
        .await?;
    println!("handed the ask to planner (handoff {})", receipt.handoff_id);

    let ended = wait_for_end(&client, &run.id).await;
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
    let completed = run.status == pb::RunStatus::Completed as i32;
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
    Ok(completed)
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
            "a WorkerResult with confidence 0.2",
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

/// Runs `step` on each delivery of `sub` until `stop` turns true (a step
/// under way is finished first). A step that fails rejects its delivery,
/// which fails the run (and the demo says so). A delivery that does not
/// decode as `T` has already been rejected by the typed subscription.
fn spawn_agent<T, F, Fut>(
    name: &'static str,
    mut sub: TypedSubscription<T>,
    mut stop: watch::Receiver<bool>,
    step: F,
) -> JoinHandle<()>
where
    T: prost::Message + prost::Name + Default + Clone + Send + 'static,
    F: Fn(TypedDelivery<T>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), BoxError>> + Send,
{
    tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                next = sub.next_delivery() => next,
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
                if let Err(e) = delivery.reject(e.to_string()).await {
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

/// Splits the ask into one subtask per source and hands them all to
/// `worker` from the one delivery (fan-out).
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
    for (i, source) in SOURCES.iter().take(n).enumerate() {
        let subtask = Subtask {
            index: i as u32,
            of: n as u32,
            instruction: format!("Summarise {source} for the brief: {}", ask.question),
            sources: vec![source.to_string()],
        };
        // One delivery, several handoffs: each has its own idempotency key
        // (so a redo after a crash repeats each one, not one for all) and
        // declares fan-out.
        let receipt = delivery
            .handoff(
                Handoff::to(delivery.run_id(), "worker", &subtask)?
                    .idempotency_key(format!("subtask-{i}"))
                    .fan_out(),
            )
            .await?;
        println!(
            "[planner] fanned out subtask {}/{n} to worker (handoff {}, depth {})",
            i + 1,
            short(&receipt.handoff_id),
            receipt.depth
        );
    }
    // Fan-out handoffs leave the ask unsettled until every subtask is
    // stored: a planner that stops half-way is given the ask again.
    delivery.ack().await?;
    Ok(())
}

/// Does one subtask and hands its result to the aggregator.
async fn worker(instance: &'static str, delivery: TypedDelivery<Subtask>) -> Result<(), BoxError> {
    let task = delivery.payload();
    let pinned = delivery.pinned();
    println!(
        "[{instance}] received subtask {}/{} ({}, attempt {})",
        task.index + 1,
        task.of,
        checked(delivery.contract(), delivery.token_count()),
        delivery.attempt()
    );
    if pinned.ask.is_empty() {
        return Err("the pinned ask did not reach the worker".into());
    }
    // The work: long enough for the other instance to take the next one.
    tokio::time::sleep(Duration::from_millis(200)).await;
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
    let receipt = delivery
        .handoff(
            Handoff::to(delivery.run_id(), "aggregator", &result)?
                .confidence(0.9)
                .tool_result("read_pdf", SystemTime::now(), &citation)?,
        )
        .await?;
    println!(
        "[{instance}] handed result {}/{} to aggregator (depth {})",
        result.index + 1,
        result.of,
        receipt.depth
    );
    Ok(())
}

/// Results collected so far, by run and index.
type Collected = Arc<Mutex<BTreeMap<String, BTreeMap<u32, WorkerResult>>>>;

/// Collects the workers' results by index: acks each until the last one
/// arrives, then completes the run with the report (a final handoff that
/// consumes the last delivery). The collection lives in memory: a real
/// aggregator would keep it in durable state.
async fn aggregator(
    collected: Collected,
    delivery: TypedDelivery<WorkerResult>,
) -> Result<(), BoxError> {
    let result = delivery.payload().clone();
    if result.of == 0 || result.index >= result.of {
        return Err(format!("result {} of {} is out of range", result.index, result.of).into());
    }
    let report = {
        let mut all = collected.lock().unwrap_or_else(|p| p.into_inner());
        let run = all.entry(delivery.run_id().to_string()).or_default();
        run.insert(result.index, result.clone());
        let have = run.len() as u32;
        println!(
            "[aggregator] received result {}/{} from the workers ({}, confidence {}); {have} of {} in",
            result.index + 1,
            result.of,
            checked(delivery.contract(), delivery.token_count()),
            delivery.confidence(),
            result.of
        );
        (have == result.of).then(|| Report {
            answer: format!(
                "Brief for {}: {have} reports summarised",
                delivery
                    .pinned()
                    .fields
                    .get("audience")
                    .map_or("anyone", String::as_str)
            ),
            results: run.values().cloned().collect(),
        })
    };
    match report {
        None => delivery.ack().await?,
        Some(report) => {
            delivery
                .handoff(Handoff::final_result(delivery.run_id(), &report)?)
                .await?;
            println!(
                "[aggregator] completed the run with a report of {} results",
                report.results.len()
            );
        }
    }
    Ok(())
}

fn short(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

// ------------------------------------------------------------ embedded broker

/// handoffd running in this process on its embedded nats-server.
struct EmbeddedBroker {
    addr: std::net::SocketAddr,
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
