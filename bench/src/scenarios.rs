//! The scenarios, each measured through `handoffd` and, where there is an
//! equivalent, straight on JetStream in the same run.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use async_nats::jetstream::{self, consumer::pull, kv, stream};
use futures::{StreamExt, TryStreamExt};
use handoff_client::{
    pb, AgentConfig, Client, ContractSpec, Handoff, RunConfig, StateDelta, Subscription,
};
use handoff_proto::{
    demo::{Subtask, WorkerResult},
    DEMO_FILE_DESCRIPTOR_SET,
};
use hdrhistogram::Histogram;
use indicatif::ProgressBar;

use crate::{report::histogram, BoxError};

/// Agents of the 5-hop chain.
pub(crate) const CHAIN: [&str; 5] = ["c0", "c1", "c2", "c3", "c4"];
/// Concurrent requests when the bench loads the broker.
pub(crate) const CONCURRENCY: usize = 64;
/// The most a raw release carries (below NATS's default 1 MiB payload).
const RAW_RELEASE_MAX: usize = 1024 * 1024 - 4096;
/// How long a scenario waits for one delivery or release.
pub(crate) const WAIT: Duration = Duration::from_secs(60);

/// Registers the demo contracts (Subtask: instruction required, at most
/// 4,000 tokens; WorkerResult: summary required) and the agents: the chain
/// `c0`..`c4` and `sink` accept Subtask, `agg` accepts WorkerResult,
/// `worker` emits it.
pub(crate) async fn prepare(client: &Client) -> Result<(), BoxError> {
    client
        .register_contract(
            ContractSpec::of::<Subtask>(DEMO_FILE_DESCRIPTOR_SET)
                .require("instruction")
                .max_tokens(4000),
        )
        .await?;
    client
        .register_contract(
            ContractSpec::of::<WorkerResult>(DEMO_FILE_DESCRIPTOR_SET).require("summary"),
        )
        .await?;
    for name in CHAIN.iter().chain(&["sink"]) {
        client
            .register_agent(
                AgentConfig::new(*name)
                    .accepts::<Subtask>()
                    .emits::<Subtask>(),
            )
            .await?;
    }
    client
        .register_agent(AgentConfig::new("agg").accepts::<WorkerResult>())
        .await?;
    client
        .register_agent(AgentConfig::new("worker").emits::<WorkerResult>())
        .await?;
    Ok(())
}

/// A Subtask of about 1 KiB encoded.
pub(crate) fn subtask() -> Subtask {
    Subtask {
        index: 1,
        of: 1,
        instruction: "Summarise the section on quarterly revenue for leadership. ".repeat(17),
        sources: vec!["report-q3.pdf".to_string()],
    }
}

/// A WorkerResult of about `size` bytes encoded.
pub(crate) fn worker_result(size: usize) -> WorkerResult {
    WorkerResult {
        index: 1,
        of: 1,
        summary: "revenue grew in every region. ".repeat(size / 30 + 1),
        citations: vec![],
    }
}

/// The next delivery of `sub`, waiting at most [`WAIT`].
pub(crate) async fn next(sub: &mut Subscription) -> Result<handoff_client::Delivery, BoxError> {
    match tokio::time::timeout(WAIT, sub.next_delivery()).await {
        Ok(Some(d)) => Ok(d?),
        Ok(None) => Err("subscription ended".into()),
        Err(_) => Err("no delivery within 60 s".into()),
    }
}

/// What an agent of the chain reports to the run's driver.
enum Step {
    /// Agent `.0` got its delivery at `.1`.
    Arrived(usize, Instant),
    /// Agent `.0`'s own call (the handoff to the next agent, or the last
    /// agent's ack) was answered after `.1`.
    Answered(usize, Result<Duration, String>),
}

/// Per-hop and end-to-end latency of `runs` runs through the 5-hop chain,
/// and how long an agent's handoff call took to be answered.
///
/// Each agent runs on a task of its own, as agents do: a hop is from
/// handing off to the next agent's delivery, which does not wait for the
/// previous agent's call to be answered. One run is in flight at a time:
/// the next starts once every call of the last was answered.
///
/// With `delta`, each run starts with a state and every handoff carries a
/// state delta writing `delta` bytes to a key of its own, based on the
/// revision its delivery carried.
pub(crate) async fn chain(
    client: &Client,
    runs: u64,
    delta: Option<usize>,
    bar: &ProgressBar,
) -> Result<(Histogram<u64>, Histogram<u64>, Histogram<u64>), BoxError> {
    let payload = subtask();
    let with_delta = move |h: Handoff, base: u64, hop: usize| match delta {
        Some(size) => {
            h.state_delta(StateDelta::based_on(base).set(format!("hop{hop}"), "x".repeat(size)))
        }
        None => h,
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut agents = tokio::task::JoinSet::new();
    for (i, name) in CHAIN.iter().enumerate() {
        let mut sub = client.subscribe(name, "bench", 1).await?;
        let (tx, payload) = (tx.clone(), payload.clone());
        agents.spawn(async move {
            while let Some(Ok(d)) = sub.next_delivery().await {
                let _ = tx.send(Step::Arrived(i, Instant::now()));
                let called = Instant::now();
                let answered = match CHAIN.get(i + 1) {
                    Some(to) => match Handoff::to("", *to, &payload) {
                        Ok(h) => d
                            .handoff(with_delta(h, d.state_revision(), i + 1))
                            .await
                            .map(|_| ()),
                        Err(e) => Err(e),
                    },
                    None => d.ack().await,
                };
                let answered = answered
                    .map(|()| called.elapsed())
                    .map_err(|e| e.to_string());
                let _ = tx.send(Step::Answered(i, answered));
            }
        });
    }
    let (mut hop, mut e2e, mut call) = (histogram(), histogram(), histogram());
    let warmup = 20;
    for r in 0..runs + warmup {
        let mut config = RunConfig::new("bench").max_depth(8);
        if delta.is_some() {
            config = config.pin_state("order_id", "A-1");
        }
        let run = client.start_run(config).await?;
        let start = Instant::now();
        client
            .handoff(with_delta(Handoff::to(&run.id, CHAIN[0], &payload)?, 1, 0))
            .await?;
        let mut arrived = [start; CHAIN.len()];
        let mut answered = 0;
        while answered < CHAIN.len() {
            let step = match tokio::time::timeout(WAIT, rx.recv()).await {
                Ok(Some(step)) => step,
                _ => return Err("chain: no delivery within 60 s".into()),
            };
            match step {
                Step::Arrived(i, at) => {
                    if let Some(slot) = arrived.get_mut(i) {
                        *slot = at;
                    }
                }
                Step::Answered(i, took) => {
                    let took = took.map_err(|e| format!("chain: agent {i}: {e}"))?;
                    if r >= warmup && i + 1 < CHAIN.len() {
                        call.record(took.as_micros() as u64)?;
                    }
                    answered += 1;
                }
            }
        }
        if r >= warmup {
            let mut last = start;
            for at in arrived {
                hop.record(at.duration_since(last).as_micros() as u64)?;
                last = at;
            }
            e2e.record(last.duration_since(start).as_micros() as u64)?;
            bar.inc(1);
        }
    }
    agents.abort_all();
    Ok((hop, e2e, call))
}

/// The round trip of `count` gRPC calls that touch no NATS (the standard
/// health check) to the broker at `addr`: what the two gRPC exchanges of a
/// hop (the handoff call, the delivery on the next agent's stream) cost
/// on this machine before the broker does anything.
pub(crate) async fn grpc_round_trip(addr: &str, count: u64) -> Result<Histogram<u64>, BoxError> {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let channel = tonic::transport::Endpoint::from_shared(addr.to_string())?
        .connect()
        .await?;
    let mut health = HealthClient::new(channel);
    let mut took = histogram();
    for i in 0..count + 100 {
        let start = Instant::now();
        health.check(HealthCheckRequest::default()).await?;
        if i >= 100 {
            took.record(start.elapsed().as_micros() as u64)?;
        }
    }
    Ok(took)
}

/// JetStream at `url` (one URL, or several comma-separated: the nodes of a
/// cluster, one of which the client picks as the broker does).
pub(crate) async fn connect(url: &str) -> Result<jetstream::Context, BoxError> {
    let servers = url
        .split(',')
        .map(|u| u.trim().parse::<async_nats::ServerAddr>())
        .collect::<Result<Vec<_>, _>>()?;
    Ok(jetstream::new(async_nats::connect(servers).await?))
}

/// One pull consumer per agent of the chain on stream `s`, durable
/// `<durable>N` on subject `<subject>.N`, each as a stream of messages.
pub(crate) async fn chain_consumers(
    s: &stream::Stream,
    durable: &str,
    subject: &str,
) -> Result<Vec<pull::Stream>, BoxError> {
    let mut streams = Vec::new();
    for i in 0..CHAIN.len() {
        let consumer = s
            .create_consumer(pull::Config {
                durable_name: Some(format!("{durable}{i}")),
                filter_subject: format!("{subject}.{i}"),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ..Default::default()
            })
            .await?;
        streams.push(consumer.messages().await?);
    }
    Ok(streams)
}

/// The same chain on raw JetStream: publish and await the ack, pull, ack
/// (the ack off the next hop's path, as the broker's is); the stream kept
/// in `replicas` replicas, as the broker keeps its own.
pub(crate) async fn raw_chain(
    url: &str,
    replicas: usize,
    runs: u64,
    bar: &ProgressBar,
) -> Result<(Histogram<u64>, Histogram<u64>), BoxError> {
    let js = connect(url).await?;
    let s = js
        .create_stream(stream::Config {
            name: "BENCH_CHAIN".into(),
            subjects: vec!["bench.chain.>".into()],
            num_replicas: replicas,
            ..Default::default()
        })
        .await?;
    let mut streams = chain_consumers(&s, "c", "bench.chain").await?;
    let payload = bytes::Bytes::from(prost::Message::encode_to_vec(&subtask()));
    let (mut hop, mut e2e) = (histogram(), histogram());
    let mut acking = Vec::new();
    let warmup = 20;
    for r in 0..runs + warmup {
        let start = Instant::now();
        js.publish("bench.chain.0", payload.clone()).await?.await?;
        let mut last = start;
        for (i, messages) in streams.iter_mut().enumerate() {
            let msg = match tokio::time::timeout(WAIT, messages.next()).await {
                Ok(Some(m)) => m?,
                _ => return Err("raw chain: no message".into()),
            };
            let now = Instant::now();
            if r >= warmup {
                hop.record(now.duration_since(last).as_micros() as u64)?;
            }
            last = now;
            if i + 1 < CHAIN.len() {
                js.publish(format!("bench.chain.{}", i + 1), payload.clone())
                    .await?
                    .await?;
            }
            // The next agent's message is on its way: its arrival does
            // not wait for this ack, as it does not wait for handoffd's.
            acking.push(tokio::spawn(async move {
                msg.double_ack().await.map_err(|e| e.to_string())
            }));
        }
        for acked in acking.drain(..) {
            acked.await.map_err(|e| e.to_string())??;
        }
        if r >= warmup {
            e2e.record(last.duration_since(start).as_micros() as u64)?;
            bar.inc(1);
        }
    }
    Ok((hop, e2e))
}

/// Barriers run before the measured ones: two, or one from 5,000
/// branches up, where a barrier takes seconds.
fn fanin_warmup(n: u32) -> u64 {
    if n >= 5000 {
        1
    } else {
        2
    }
}

fn branch(run: &str, barrier: &str, key: u32, result: &WorkerResult) -> Result<Handoff, BoxError> {
    Ok(Handoff::from_request(pb::HandoffRequest {
        run_id: run.to_string(),
        source_agent: "worker".into(),
        to_barrier: true,
        barrier_id: barrier.to_string(),
        branch_key: key.to_string(),
        payload: Some(handoff_client::encode(result)?),
        ..Default::default()
    }))
}

/// Fan-in of `n` branches, `iterations` times: release latency (last
/// branch sent -> release delivered) and total (barrier opened -> release
/// delivered). Branch results of 512 bytes, checked against the
/// aggregator's contract.
pub(crate) async fn fanin(
    client: &Client,
    n: u32,
    iterations: u64,
    bar: &ProgressBar,
) -> Result<(Histogram<u64>, Histogram<u64>), BoxError> {
    let run = client.start_run(RunConfig::new("bench")).await?;
    let mut agg = client.subscribe("agg", "bench", 1).await?;
    let result = worker_result(512);
    let (mut release, mut total) = (histogram(), histogram());
    let warmup = fanin_warmup(n);
    for it in 0..iterations + warmup {
        let barrier = format!("n{n}-{it}");
        let start = Instant::now();
        client
            .raw()
            .open_barrier(pb::OpenBarrierRequest {
                barrier: Some(pb::BarrierSpec {
                    run_id: run.id.clone(),
                    barrier_id: barrier.clone(),
                    branch_count: n,
                    target_agent: "agg".into(),
                    ..Default::default()
                }),
            })
            .await?;
        futures::stream::iter(0..n - 1)
            .map(|k| {
                let client = client.clone();
                let h = branch(&run.id, &barrier, k, &result);
                async move { client.handoff(h?).await.map_err(BoxError::from) }
            })
            .buffer_unordered(CONCURRENCY)
            .try_collect::<Vec<_>>()
            .await?;
        let last = Instant::now();
        client
            .handoff(branch(&run.id, &barrier, n - 1, &result)?)
            .await?;
        let d = next(&mut agg).await?;
        let delivered = Instant::now();
        let r: pb::BarrierRelease = d.payload()?;
        if r.barrier_id != barrier || r.branches.len() != n as usize || !r.missing.is_empty() {
            return Err(format!("unexpected release of {}", r.barrier_id).into());
        }
        d.ack().await?;
        if it >= warmup {
            release.record(delivered.duration_since(last).as_micros() as u64)?;
            total.record(delivered.duration_since(start).as_micros() as u64)?;
            bar.inc(1);
        }
    }
    Ok((release, total))
}

/// A key/value bucket made the way the broker makes its own (works on
/// nats-server 2.9), in `replicas` replicas. On a cluster it is read from
/// its stream's leader, as the broker's are (direct gets could answer from
/// a lagging follower); on one server, which has no follower, by direct
/// gets.
pub(crate) async fn bucket(
    js: &jetstream::Context,
    name: &str,
    replicas: usize,
) -> Result<kv::Store, BoxError> {
    js.create_stream(stream::Config {
        name: format!("KV_{name}"),
        subjects: vec![format!("$KV.{name}.>")],
        num_replicas: replicas,
        max_messages_per_subject: 1,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: replicas == 1,
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    })
    .await?;
    Ok(js.get_key_value(name).await?)
}

/// The same fan-in on raw JetStream: each branch publishes its result and
/// then increments a counter with compare-and-set; the branch that makes
/// it `n` publishes the release, which one consumer pulls and acks.
pub(crate) async fn raw_fanin(
    url: &str,
    replicas: usize,
    n: u32,
    iterations: u64,
    bar: &ProgressBar,
) -> Result<(Histogram<u64>, Histogram<u64>), BoxError> {
    let js = connect(url).await?;
    let s = js
        .create_stream(stream::Config {
            name: format!("BENCH_FAN_{n}"),
            subjects: vec![format!("bench.fan{n}.>")],
            num_replicas: replicas,
            ..Default::default()
        })
        .await?;
    let counters = bucket(&js, &format!("bench_fan_{n}"), replicas).await?;
    let mut releases = s
        .create_consumer(pull::Config {
            durable_name: Some("release".into()),
            filter_subject: format!("bench.fan{n}.release.>"),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await?
        .messages()
        .await?;
    let payload = bytes::Bytes::from(prost::Message::encode_to_vec(&worker_result(512)));
    // The release carries as many bytes as the results, as handoffd's
    // does (up to what one NATS message may hold: wider, handoffd stores
    // it by reference).
    let mut body = payload.repeat(n as usize);
    body.truncate(RAW_RELEASE_MAX);
    let body = bytes::Bytes::from(body);
    let arrive = |it: u64, k: u32| {
        let (js, counters, payload, body) =
            (js.clone(), counters.clone(), payload.clone(), body.clone());
        async move {
            js.publish(format!("bench.fan{n}.branch.{it}.{k}"), payload)
                .await?
                .await?;
            let key = format!("f{it}");
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
                    if count == n {
                        js.publish(format!("bench.fan{n}.release.{it}"), body)
                            .await?
                            .await?;
                    }
                    return Ok::<(), BoxError>(());
                }
            }
        }
    };
    let (mut release, mut total) = (histogram(), histogram());
    let warmup = fanin_warmup(n);
    for it in 0..iterations + warmup {
        let start = Instant::now();
        futures::stream::iter(0..n - 1)
            .map(|k| arrive(it, k))
            .buffer_unordered(CONCURRENCY)
            .try_collect::<Vec<_>>()
            .await?;
        let last = Instant::now();
        arrive(it, n - 1).await?;
        let msg = match tokio::time::timeout(WAIT, releases.next()).await {
            Ok(Some(m)) => m?,
            _ => return Err("raw fan-in: no release".into()),
        };
        let delivered = Instant::now();
        msg.double_ack().await?;
        if it >= warmup {
            release.record(delivered.duration_since(last).as_micros() as u64)?;
            total.record(delivered.duration_since(start).as_micros() as u64)?;
            bar.inc(1);
        }
    }
    Ok((release, total))
}

/// Acks every item `items` yields, many at a time, counting the acks that
/// succeed in `acked`, until the stream ends or the task is aborted.
pub(crate) fn spawn_acker<S, T, E, F, A, AE>(
    mut items: S,
    ack: F,
    acked: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()>
where
    S: futures::Stream<Item = Result<T, E>> + Unpin + Send + 'static,
    T: Send + 'static,
    E: Send + 'static,
    F: Fn(T) -> A + Send + 'static,
    A: std::future::Future<Output = Result<(), AE>> + Send + 'static,
    AE: Send + 'static,
{
    tokio::spawn(async move {
        let mut acks = futures::stream::FuturesUnordered::new();
        loop {
            tokio::select! {
                item = items.next() => match item {
                    Some(Ok(item)) => acks.push(ack(item)),
                    _ => return,
                },
                Some(r) = acks.next(), if !acks.is_empty() => {
                    if r.is_ok() {
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    })
}

/// Runs `producers` tasks calling `send` until it was called `count` times,
/// then waits until the consumers acked `count`. Returns sends per second
/// and acks per second, both from the start; stops the consumers.
pub(crate) async fn drive<F, Fut>(
    count: u64,
    producers: usize,
    bar: &ProgressBar,
    acked: &AtomicU64,
    consumers: Vec<tokio::task::JoinHandle<()>>,
    send: F,
) -> Result<(f64, f64), BoxError>
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<(), BoxError>> + Send,
{
    let next_index = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..producers {
        let (send, next_index, bar) = (send.clone(), next_index.clone(), bar.clone());
        tasks.push(tokio::spawn(async move {
            while next_index.fetch_add(1, Ordering::Relaxed) < count {
                send().await?;
                bar.inc(1);
            }
            Ok::<(), BoxError>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let accepted = start.elapsed();
    let deadline = Instant::now() + WAIT;
    while acked.load(Ordering::Relaxed) < count {
        if Instant::now() > deadline {
            return Err("throughput: not everything sent was acked within 60 s".into());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let delivered = start.elapsed();
    for c in consumers {
        c.abort();
    }
    Ok((
        count as f64 / accepted.as_secs_f64(),
        count as f64 / delivered.as_secs_f64(),
    ))
}

/// Sustained rate: `producers` tasks hand off `count` 1 KiB Subtasks to
/// `sink` (contract checked) while 4 instances of `sink` ack them. Returns
/// accepted per second and accepted-and-delivered (acked) per second.
pub(crate) async fn throughput(
    client: &Client,
    count: u64,
    producers: usize,
    bar: &ProgressBar,
) -> Result<(f64, f64), BoxError> {
    let run = client.start_run(RunConfig::new("bench")).await?;
    let acked = Arc::new(AtomicU64::new(0));
    let mut consumers = Vec::new();
    for i in 0..4 {
        let sub = client.subscribe("sink", &format!("s{i}"), 256).await?;
        consumers.push(spawn_acker(
            sub,
            |d: handoff_client::Delivery| async move { d.ack().await },
            acked.clone(),
        ));
    }
    let (client, run_id, payload) = (client.clone(), run.id, subtask());
    drive(count, producers, bar, &acked, consumers, move || {
        let (client, h) = (
            client.clone(),
            Handoff::to(run_id.as_str(), "sink", &payload),
        );
        async move {
            client.handoff(h?).await?;
            Ok(())
        }
    })
    .await
}

/// The same load on raw JetStream: publishers await each ack; four
/// consumers share one durable pull consumer and ack every message; the
/// stream kept in `replicas` replicas.
pub(crate) async fn raw_throughput(
    url: &str,
    replicas: usize,
    count: u64,
    producers: usize,
    bar: &ProgressBar,
) -> Result<(f64, f64), BoxError> {
    let js = connect(url).await?;
    let s = js
        .create_stream(stream::Config {
            name: "BENCH_SINK".into(),
            subjects: vec!["bench.sink".into()],
            num_replicas: replicas,
            ..Default::default()
        })
        .await?;
    let consumer = s
        .create_consumer(pull::Config {
            durable_name: Some("sink".into()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            max_ack_pending: 4 * 256,
            ..Default::default()
        })
        .await?;
    let acked = Arc::new(AtomicU64::new(0));
    let mut consumers = Vec::new();
    for _ in 0..4 {
        let messages = consumer.messages().await?;
        consumers.push(spawn_acker(
            messages,
            |m: jetstream::Message| async move { m.double_ack().await },
            acked.clone(),
        ));
    }
    let payload = bytes::Bytes::from(prost::Message::encode_to_vec(&subtask()));
    drive(count, producers, bar, &acked, consumers, move || {
        let (js, payload) = (js.clone(), payload.clone());
        async move {
            js.publish("bench.sink", payload).await?.await?;
            Ok(())
        }
    })
    .await
}

/// Fills the broker with `runs` finished runs (started, then completed by
/// a final handoff) and `barriers` open barriers (2 branches each, none
/// arrived), `CONCURRENCY` requests at a time.
/// `runs` runs, each started with a state of three keys (about 200 bytes)
/// and then changed by one handoff carrying a 256-byte delta (to an agent
/// no instance serves, so the handoffs wait in its inbox).
pub(crate) async fn populate_state(
    client: &Client,
    runs: u64,
    bar: &ProgressBar,
) -> Result<(), BoxError> {
    client
        .register_agent(AgentConfig::new("state-sink"))
        .await?;
    let payload = subtask();
    futures::stream::iter(0..runs)
        .map(|i| {
            let (client, payload, bar) = (client.clone(), payload.clone(), bar.clone());
            async move {
                let run = client
                    .start_run(
                        RunConfig::new("state")
                            .pin_state("order_id", format!("A-{i}"))
                            .state("customer", "ACME Corporation, purchasing department")
                            .state("notes", "the customer prefers delivery on weekday mornings"),
                    )
                    .await?;
                client
                    .handoff(
                        Handoff::to(&run.id, "state-sink", &payload)?
                            .state_delta(StateDelta::based_on(1).set("summary", "y".repeat(256))),
                    )
                    .await?;
                bar.inc(1);
                Ok::<(), BoxError>(())
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect::<Vec<_>>()
        .await?;
    Ok(())
}

pub(crate) async fn populate(
    client: &Client,
    runs: u64,
    barriers: u64,
    bar: &ProgressBar,
) -> Result<(), BoxError> {
    let payload = subtask();
    futures::stream::iter(0..runs)
        .map(|_| {
            let (client, payload, bar) = (client.clone(), payload.clone(), bar.clone());
            async move {
                let run = client.start_run(RunConfig::new("scale")).await?;
                client
                    .handoff(Handoff::final_result(&run.id, &payload)?)
                    .await?;
                bar.inc(1);
                Ok::<(), BoxError>(())
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect::<Vec<_>>()
        .await?;
    let run = client.start_run(RunConfig::new("scale")).await?;
    futures::stream::iter(0..barriers)
        .map(|i| {
            let (client, run_id, bar) = (client.clone(), run.id.clone(), bar.clone());
            async move {
                client
                    .raw()
                    .open_barrier(pb::OpenBarrierRequest {
                        barrier: Some(pb::BarrierSpec {
                            run_id,
                            barrier_id: format!("open-{i}"),
                            branch_count: 2,
                            target_agent: "agg".into(),
                            ..Default::default()
                        }),
                    })
                    .await?;
                bar.inc(1);
                Ok::<(), BoxError>(())
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect::<Vec<_>>()
        .await?;
    Ok(())
}
