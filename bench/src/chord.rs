//! `chord`: a fan-out and its join, end to end. A submitter fans out
//! `tasks` Subtasks at once (one `FanOut` call: the barrier and every
//! branch handoff) to `workers` instances of one worker agent with
//! `in_flight` deliveries each; every worker answers its branch with a
//! 512-byte WorkerResult straight into the barrier (complete-and-handoff:
//! the branch result consumes the task's delivery); the aggregator
//! receives the release. Measured: submit -> the aggregator has the
//! release.
//!
//! The same shape on raw JetStream: the tasks go to a work-queue stream
//! read by one durable pull consumer (as the broker reads an agent's
//! inbox, `max_ack_pending` = workers x in flight) that `workers` pullers
//! share, each answering at most `in_flight` tasks at once; a worker
//! publishes its result (deduplicated by message id) and then acks its
//! task. The aggregator either counts the distinct results off their
//! stream ([`RawCount::Consumer`]), or, as a barrier decides, each worker
//! counts its result on a key/value counter with compare-and-set and the
//! last one publishes a release that the aggregator pulls
//! ([`RawCount::CompareAndSet`], the raw fan-in's way).

use std::time::Instant;

use async_nats::jetstream::{self, consumer::pull, stream};
use futures::{StreamExt, TryStreamExt};
use handoff_client::{pb, AgentConfig, Client, JoinMode, RunConfig};
use handoff_proto::demo::{Subtask, WorkerResult};
use hdrhistogram::Histogram;
use indicatif::ProgressBar;
use tokio::task::JoinHandle;

use crate::{
    report::histogram,
    scenarios::{bucket, connect, next, worker_result, WAIT},
    BoxError,
};

/// The worker agent of the chord: accepts a Subtask, answers a
/// WorkerResult into the barrier.
const WORKER: &str = "chord-worker";
/// The aggregator: receives the release of WorkerResults.
const AGGREGATOR: &str = "chord-agg";
/// Chords run before the measured ones.
const WARMUP: u64 = 3;

/// The shape of a chord.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shape {
    /// Branches, one task each.
    pub(crate) tasks: u32,
    /// Instances of the worker agent.
    pub(crate) workers: usize,
    /// Deliveries each worker instance holds at once (`max_in_flight`).
    pub(crate) in_flight: u32,
}

/// The task of branch `i` of `of`: a short Subtask.
fn task(i: u32, of: u32) -> Subtask {
    Subtask {
        index: i,
        of,
        instruction: format!("Summarise section {i} of the quarterly report."),
        sources: vec!["report-q3.pdf".to_string()],
    }
}

/// Aborts the spawned workers when dropped, however the scenario ends.
struct Workers(Vec<JoinHandle<Result<(), BoxError>>>);

impl Workers {
    /// Waits until a worker stops (they only stop on an error) and
    /// returns why.
    async fn failed(&mut self) -> BoxError {
        if self.0.is_empty() {
            return futures::future::pending().await;
        }
        match futures::future::select_all(self.0.iter_mut()).await.0 {
            Ok(Ok(())) => "a chord worker stopped".into(),
            Ok(Err(e)) => e,
            Err(e) => e.into(),
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for w in &self.0 {
            w.abort();
        }
    }
}

/// Registers the chord's worker agent and aggregator.
pub(crate) async fn prepare(client: &Client) -> Result<(), BoxError> {
    client
        .register_agent(
            AgentConfig::new(WORKER)
                .accepts::<Subtask>()
                .emits::<WorkerResult>(),
        )
        .await?;
    client
        .register_agent(AgentConfig::new(AGGREGATOR).accepts::<WorkerResult>())
        .await?;
    Ok(())
}

/// `repeats` chords of `shape` through handoffd (SDK `fan_out(..).join`,
/// workers answering with `Delivery::to_barrier`): submit -> the
/// aggregator has the release.
pub(crate) async fn chord(
    client: &Client,
    shape: Shape,
    repeats: u64,
    bar: &ProgressBar,
) -> Result<Histogram<u64>, BoxError> {
    let run = client.start_run(RunConfig::new("bench")).await?;
    let mut agg = client.subscribe(AGGREGATOR, "bench", 1).await?;
    let result = worker_result(512);
    let mut workers = Workers(Vec::new());
    for i in 0..shape.workers {
        let sub = client
            .subscribe(WORKER, &format!("w{i}"), shape.in_flight)
            .await?;
        let result = result.clone();
        workers.0.push(tokio::spawn(async move {
            sub.map_err(BoxError::from)
                .try_for_each_concurrent(shape.in_flight as usize, |d| {
                    let result = result.clone();
                    async move {
                        d.to_barrier(&result).await?;
                        Ok(())
                    }
                })
                .await
        }));
    }
    let mut took = histogram();
    for it in 0..repeats + WARMUP {
        let barrier = format!("chord-{it}");
        let start = Instant::now();
        client
            .fan_out(
                &run.id,
                WORKER,
                (0..shape.tasks).map(|i| task(i, shape.tasks)),
            )
            .barrier_id(&barrier)
            .join(AGGREGATOR, JoinMode::All)
            .await?;
        let d = tokio::select! {
            d = next(&mut agg) => d?,
            e = workers.failed() => return Err(e),
        };
        let released = Instant::now();
        let r: pb::BarrierRelease = d.payload()?;
        if r.barrier_id != barrier
            || r.branches.len() != shape.tasks as usize
            || !r.missing.is_empty()
        {
            return Err(format!(
                "chord: unexpected release of {} ({} branches, {} missing)",
                r.barrier_id,
                r.branches.len(),
                r.missing.len()
            )
            .into());
        }
        d.ack().await?;
        if it >= WARMUP {
            took.record(released.duration_since(start).as_micros() as u64)?;
            bar.inc(1);
        }
    }
    Ok(took)
}

/// How the raw chord's aggregator learns that every result is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RawCount {
    /// The aggregator reads the results stream and counts distinct
    /// branches (results deduplicated by message id): the plain
    /// JetStream chord.
    Consumer,
    /// Each worker counts its result on a key/value counter with
    /// compare-and-set and the last one publishes a release, which the
    /// aggregator pulls: the decision is made once, durably, as a barrier
    /// makes it (the raw fan-in's way).
    CompareAndSet,
}

impl RawCount {
    /// A subject and stream token of its own.
    fn token(self) -> &'static str {
        match self {
            RawCount::Consumer => "c",
            RawCount::CompareAndSet => "k",
        }
    }
}

/// Everything a raw worker needs.
#[derive(Clone)]
struct RawWorker {
    js: jetstream::Context,
    /// `bench.chord<token>`.
    prefix: String,
    counters: Option<jetstream::kv::Store>,
    tasks: u32,
    result: bytes::Bytes,
}

impl RawWorker {
    /// Answers task `bench.chord<token>.task.<iteration>.<branch>`:
    /// publishes its result (deduplicated by message id), counts it when
    /// there is a counter, publishes the release at the last count, then
    /// acks the task.
    async fn answer(self, msg: jetstream::Message) -> Result<(), BoxError> {
        let mut tokens = msg.subject.split('.').skip(3);
        let (it, k) = match (tokens.next(), tokens.next()) {
            (Some(it), Some(k)) => (it.to_string(), k.to_string()),
            _ => return Err("raw chord: bad task subject".into()),
        };
        let prefix = &self.prefix;
        self.js
            .send_publish(
                format!("{prefix}.result.{it}.{k}"),
                jetstream::message::PublishMessage::build()
                    .payload(self.result.clone())
                    .message_id(format!("{it}.{k}")),
            )
            .await?
            .await?;
        if let Some(counters) = &self.counters {
            let key = format!("c{it}");
            loop {
                let (count, written) = match counters.entry(&key).await? {
                    None => (1u32, counters.create(&key, "1".into()).await.is_ok()),
                    Some(e) => {
                        let count = std::str::from_utf8(&e.value)?.parse::<u32>()? + 1;
                        let ok = counters
                            .update(&key, count.to_string().into(), e.revision)
                            .await
                            .is_ok();
                        (count, ok)
                    }
                };
                if written {
                    if count == self.tasks {
                        self.js
                            .publish(format!("{prefix}.release.{it}"), "released".into())
                            .await?
                            .await?;
                    }
                    break;
                }
            }
        }
        msg.double_ack().await?;
        Ok(())
    }

    /// Pulls tasks from `consumer`, at most `in_flight` unacked at once,
    /// and answers each.
    async fn run(
        self,
        consumer: jetstream::consumer::Consumer<pull::Config>,
        in_flight: usize,
    ) -> Result<(), BoxError> {
        consumer
            .stream()
            .max_messages_per_batch(in_flight)
            .messages()
            .await?
            .map_err(BoxError::from)
            .try_for_each_concurrent(in_flight, |msg| self.clone().answer(msg))
            .await
    }
}

/// The same chord on raw JetStream (see the module docs), in `replicas`
/// replicas, counted as `count` says: submit (every task published, acks
/// awaited together) -> the aggregator knows every result is in.
pub(crate) async fn raw_chord(
    url: &str,
    replicas: usize,
    shape: Shape,
    count: RawCount,
    repeats: u64,
    bar: &ProgressBar,
) -> Result<Histogram<u64>, BoxError> {
    let js = connect(url).await?;
    let t = count.token();
    let prefix = format!("bench.chord{t}");
    let tasks_stream = js
        .create_stream(stream::Config {
            name: format!("BENCH_CHORD_{t}_TASKS"),
            subjects: vec![format!("{prefix}.task.>")],
            retention: stream::RetentionPolicy::WorkQueue,
            num_replicas: replicas,
            ..Default::default()
        })
        .await?;
    let results = js
        .create_stream(stream::Config {
            name: format!("BENCH_CHORD_{t}"),
            subjects: vec![format!("{prefix}.result.>"), format!("{prefix}.release.>")],
            num_replicas: replicas,
            ..Default::default()
        })
        .await?;
    let counters = match count {
        RawCount::Consumer => None,
        RawCount::CompareAndSet => Some(bucket(&js, &format!("bench_chord_{t}"), replicas).await?),
    };
    tasks_stream
        .create_consumer(pull::Config {
            durable_name: Some("workers".into()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            max_ack_pending: i64::from(shape.in_flight) * shape.workers as i64,
            ..Default::default()
        })
        .await?;
    let watched = match count {
        RawCount::Consumer => format!("{prefix}.result.>"),
        RawCount::CompareAndSet => format!("{prefix}.release.>"),
    };
    let mut aggregator = results
        .create_consumer(pull::Config {
            durable_name: Some("aggregator".into()),
            filter_subject: watched,
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await?
        .messages()
        .await?;
    let worker = RawWorker {
        js: js.clone(),
        prefix: prefix.clone(),
        counters,
        tasks: shape.tasks,
        result: prost::Message::encode_to_vec(&worker_result(512)).into(),
    };
    let mut workers = Workers(Vec::new());
    for _ in 0..shape.workers {
        let consumer: jetstream::consumer::Consumer<pull::Config> =
            tasks_stream.get_consumer("workers").await?;
        workers.0.push(tokio::spawn(
            worker.clone().run(consumer, shape.in_flight as usize),
        ));
    }
    let payloads: Vec<bytes::Bytes> = (0..shape.tasks)
        .map(|i| prost::Message::encode_to_vec(&task(i, shape.tasks)).into())
        .collect();
    let mut took = histogram();
    for it in 0..repeats + WARMUP {
        let start = Instant::now();
        let mut acks = Vec::with_capacity(payloads.len());
        for (k, p) in payloads.iter().enumerate() {
            acks.push(
                js.publish(format!("{prefix}.task.{it}.{k}"), p.clone())
                    .await?,
            );
        }
        futures::future::try_join_all(acks.into_iter().map(std::future::IntoFuture::into_future))
            .await?;
        // The aggregator: the release, or every distinct result of this
        // chord.
        let mut seen = std::collections::HashSet::new();
        let done = loop {
            let msg = tokio::select! {
                m = tokio::time::timeout(WAIT, aggregator.next()) => match m {
                    Ok(Some(m)) => m?,
                    _ => return Err("raw chord: the aggregator got nothing within 60 s".into()),
                },
                e = workers.failed() => return Err(e),
            };
            let mut tokens = msg.subject.split('.').skip(3);
            let mine = tokens.next() == Some(it.to_string().as_str());
            let key = tokens.next().map(str::to_string);
            msg.ack().await?;
            match (count, mine, key) {
                (RawCount::CompareAndSet, true, _) => break Instant::now(),
                (RawCount::Consumer, true, Some(key)) => {
                    seen.insert(key);
                    if seen.len() == shape.tasks as usize {
                        break Instant::now();
                    }
                }
                _ => {}
            }
        };
        if it >= WARMUP {
            took.record(done.duration_since(start).as_micros() as u64)?;
            bar.inc(1);
        }
    }
    Ok(took)
}
