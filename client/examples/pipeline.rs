//! A three-agent pipeline over the handoff broker: planner -> worker ->
//! aggregator -> final result.
//!
//! ```text
//! cargo run -p handoff-client --example pipeline                 # embedded broker
//! cargo run -p handoff-client --example pipeline -- --addr http://127.0.0.1:7233
//! ```
//!
//! Without `--addr` the example starts `handoffd` in-process on its
//! embedded default (a `nats-server` child with its store in a temporary
//! directory) and stops it at the end. It registers three agents, starts a
//! run with a pinned ask, hands a `Plan` to the planner and runs each agent
//! as a task: every agent completes its delivery by handing off to the next
//! one (complete-and-handoff), the aggregator with the run's final result.
//! The main task waits for the run's end event, prints the run's timeline
//! and exits non-zero unless the run completed.

use std::{collections::HashSet, error::Error, process::ExitCode, time::Duration};

use clap::Parser;
use futures::StreamExt as _;
use handoff_client::{
    display, pb, AgentConfig, Client, Delivery, Handoff, RunConfig, Subscription, WatchFilter,
};
use tokio::{
    net::TcpListener,
    sync::{oneshot, watch},
    task::JoinHandle,
};

type BoxError = Box<dyn Error + Send + Sync>;

/// The ask pinned to the run; every agent sees it verbatim.
const ASK: &str = "Summarise three reports into one brief";
/// How long the run may take before the demo gives up.
const RUN_WAIT: Duration = Duration::from_secs(30);
/// How long to wait for the last ack event once the run has ended.
const SETTLE_WAIT: Duration = Duration::from_secs(5);

// ------------------------------------------------------------ payloads

/// What the planner receives: the steps of the job.
#[derive(Clone, PartialEq, prost::Message)]
struct Plan {
    #[prost(string, repeated, tag = "1")]
    steps: Vec<String>,
}

/// What the planner hands the worker.
#[derive(Clone, PartialEq, prost::Message)]
struct Subtask {
    #[prost(string, tag = "1")]
    step: String,
    #[prost(uint32, tag = "2")]
    index: u32,
}

/// What the worker hands the aggregator.
#[derive(Clone, PartialEq, prost::Message)]
struct WorkerResult {
    #[prost(string, tag = "1")]
    step: String,
    #[prost(string, tag = "2")]
    output: String,
}

/// The run's result.
#[derive(Clone, PartialEq, prost::Message)]
struct Report {
    #[prost(string, repeated, tag = "1")]
    lines: Vec<String>,
}

macro_rules! demo_name {
    ($($ty:ident),*) => {$(
        impl prost::Name for $ty {
            const NAME: &'static str = stringify!($ty);
            const PACKAGE: &'static str = "demo.v1";
        }
    )*};
}
demo_name!(Plan, Subtask, WorkerResult, Report);

// ------------------------------------------------------------ main

/// The planner -> worker -> aggregator demo.
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

/// Runs the pipeline once; `Ok(true)` if the run completed.
async fn demo(addr: &str) -> Result<bool, BoxError> {
    let client = Client::connect(addr).await?;

    for (name, what) in [
        ("planner", "splits the ask into subtasks"),
        ("worker", "does one subtask"),
        ("aggregator", "merges results into the brief"),
    ] {
        client
            .register_agent(
                AgentConfig::new(name)
                    .description(what)
                    .lease(Duration::from_secs(30)),
            )
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

    // Subscribe before handing off, so a failing subscription is reported
    // before any work is queued. Dropping `stop` also stops the agents.
    let (stop, stopped) = watch::channel(false);
    let agents: Vec<JoinHandle<()>> = vec![
        spawn_agent(
            "planner",
            client.subscribe("planner", "planner-1", 1).await?,
            stopped.clone(),
            planner,
        ),
        spawn_agent(
            "worker",
            client.subscribe("worker", "worker-1", 1).await?,
            stopped.clone(),
            worker,
        ),
        spawn_agent(
            "aggregator",
            client.subscribe("aggregator", "aggregator-1", 1).await?,
            stopped,
            aggregator,
        ),
    ];

    let plan = Plan {
        steps: vec![
            "read report-q1.pdf".to_string(),
            "read report-q2.pdf".to_string(),
            "read report-q3.pdf".to_string(),
        ],
    };
    let receipt = client
        .handoff(Handoff::to(&run.id, "planner", &plan)?.idempotency_key("plan"))
        .await?;
    println!(
        "handed the plan to planner (handoff {})",
        receipt.handoff_id
    );

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
            for line in &report.lines {
                println!("  {line}");
            }
        }
    } else if let Some(e) = ended {
        println!("\nrun ended with {}", display::kind(e.kind));
    }
    Ok(completed)
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
/// which fails the run (and the demo says so).
fn spawn_agent<F, Fut>(
    name: &'static str,
    mut sub: Subscription,
    mut stop: watch::Receiver<bool>,
    step: F,
) -> JoinHandle<()>
where
    F: Fn(Delivery) -> Fut + Send + 'static,
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

async fn planner(delivery: Delivery) -> Result<(), BoxError> {
    let plan: Plan = delivery.payload()?;
    println!(
        "[planner] received a plan of {} steps: {:?}",
        plan.steps.len(),
        plan.steps
    );
    // No fan-out yet: the planner hands the worker one subtask covering
    // every step.
    let subtask = Subtask {
        step: plan.steps.join("; "),
        index: 1,
    };
    let receipt = delivery
        .handoff(Handoff::to(delivery.run_id(), "worker", &subtask)?)
        .await?;
    println!(
        "[planner] handed subtask {} to worker (depth {})",
        subtask.index, receipt.depth
    );
    Ok(())
}

async fn worker(delivery: Delivery) -> Result<(), BoxError> {
    let task: Subtask = delivery.payload()?;
    let pinned = delivery.pinned();
    println!(
        "[worker] received subtask {}: {:?} (attempt {})",
        task.index,
        task.step,
        delivery.attempt()
    );
    if pinned.ask.is_empty() {
        return Err("the pinned ask did not reach the worker".into());
    }
    println!(
        "[worker] pinned ask: {:?}, audience: {:?}",
        pinned.ask,
        pinned.fields.get("audience")
    );
    let output = format!(
        "for {:?} ({}): done {}",
        pinned.ask,
        pinned
            .fields
            .get("audience")
            .map_or("anyone", String::as_str),
        task.step
    );
    let result = WorkerResult {
        step: task.step,
        output,
    };
    let receipt = delivery
        .handoff(Handoff::to(delivery.run_id(), "aggregator", &result)?.confidence(0.9))
        .await?;
    println!(
        "[worker] handed its result to aggregator (depth {})",
        receipt.depth
    );
    Ok(())
}

async fn aggregator(delivery: Delivery) -> Result<(), BoxError> {
    let result: WorkerResult = delivery.payload()?;
    println!("[aggregator] received: {:?}", result.output);
    let report = Report {
        lines: vec![
            format!("Brief: {}", delivery.pinned().ask),
            format!("Sources: {}", result.step),
            format!("Worker said: {}", result.output),
        ],
    };
    delivery
        .handoff(Handoff::final_result(delivery.run_id(), &report)?)
        .await?;
    println!(
        "[aggregator] completed the run with a {}-line report",
        report.lines.len()
    );
    Ok(())
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
