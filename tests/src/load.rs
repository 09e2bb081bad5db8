//! A steady load of handoffs and fan-ins from several clients, for tests
//! that break NATS underneath the brokers.
//!
//! [`Load::start`] runs producers that each make plain handoffs to
//! `worker` and, every fourth step, a fan-in: a barrier of three branches
//! whose release goes to `aggregator`. A producer retries a failed call
//! with the same idempotency key until it is accepted, and records every
//! attempt ([`Call`]): what failed, with which code and reason, and for how
//! long. Consumers ack every delivery (retrying a failed ack) and count
//! what they saw. [`Load::finish`] stops the producers, waits until the
//! consumers have seen everything accepted, and returns both sides for the
//! test to judge.

use std::{
    collections::HashMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use handoff_client::{pb, AgentConfig, Client, ErrorKind, Handoff, RunConfig};
use tokio::{sync::watch, task::JoinHandle};

use crate::note;

/// One attempt of a call.
#[derive(Debug, Clone)]
pub struct Call {
    /// When it was made.
    pub start: Instant,
    /// When it was answered.
    pub end: Instant,
    /// `None` when it succeeded, else its gRPC code and `ErrorInfo.reason`.
    pub failed: Option<(tonic::Code, String)>,
}

/// What the producers did.
#[derive(Debug, Default)]
pub struct Produced {
    /// Ids of the accepted plain handoffs.
    pub handoffs: Vec<String>,
    /// Run and barrier ids of the fan-ins whose three branches were all
    /// accepted.
    pub barriers: Vec<(String, String)>,
    /// Every attempt of every call.
    pub calls: Vec<Call>,
}

/// What the consumers saw.
#[derive(Debug, Default)]
pub struct Consumed {
    /// Deliveries of each plain handoff, by handoff id.
    pub deliveries: HashMap<String, u32>,
    /// Releases delivered, by barrier id.
    pub releases: HashMap<String, u32>,
    /// Acks that failed and were retried.
    pub failed_acks: u32,
    /// Subscribe streams that ended or broke and were opened again.
    pub broken_streams: u32,
    /// Why the last of them broke.
    pub last_stream_error: Option<String>,
}

impl Produced {
    /// The longest stretch of time in which calls failed and none
    /// succeeded (from the start of the first failed attempt to the end of
    /// the next successful one), or zero.
    pub fn longest_gap(&self) -> Duration {
        let mut calls: Vec<&Call> = self.calls.iter().collect();
        calls.sort_by_key(|c| c.start);
        let successes: Vec<Instant> = {
            let mut s: Vec<Instant> = calls
                .iter()
                .filter(|c| c.failed.is_none())
                .map(|c| c.end)
                .collect();
            s.sort();
            s
        };
        let mut longest = Duration::ZERO;
        for c in calls.iter().filter(|c| c.failed.is_some()) {
            let next_ok = successes.iter().find(|&&t| t > c.start).copied();
            let until = next_ok.unwrap_or(c.end);
            longest = longest.max(until.saturating_duration_since(c.start));
        }
        longest
    }

    /// The failed attempts.
    pub fn failures(&self) -> Vec<&Call> {
        self.calls.iter().filter(|c| c.failed.is_some()).collect()
    }
}

/// A running load.
pub struct Load {
    stop: watch::Sender<bool>,
    producers: Vec<JoinHandle<Produced>>,
    consumers: Vec<JoinHandle<Consumed>>,
    finished: watch::Sender<bool>,
    /// A broker of the load, for reading barriers.
    addr: SocketAddr,
    /// Accepted so far (plain handoffs, fan-ins), for progress checks.
    progress: watch::Receiver<(usize, usize)>,
}

/// Registers `worker` and `aggregator` (lease `lease`) through `client`.
pub async fn register_agents(client: &Client, lease: Duration) {
    for agent in ["worker", "aggregator"] {
        retry_until_ok(|| async {
            client
                .register_agent(AgentConfig::new(agent).lease(lease))
                .await
                .map(|_| ())
        })
        .await;
    }
}

async fn retry_until_ok<F, Fut>(call: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = handoff_client::Result<()>>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match call().await {
            Ok(()) => return,
            Err(e) => {
                assert!(Instant::now() < deadline, "never succeeded: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

impl Load {
    /// Starts `producers` producers and, for each agent, `consumers`
    /// instances with `max_in_flight`, spread over the brokers at `addrs`
    /// (producer or consumer `i` talks to `addrs[i % addrs.len()]`). The
    /// agents must be registered ([`register_agents`]).
    pub async fn start(
        addrs: &[SocketAddr],
        producers: usize,
        consumers: usize,
        max_in_flight: u32,
    ) -> Load {
        let (stop, stopped) = watch::channel(false);
        let (finished_tx, finished) = watch::channel(false);
        let (progress_tx, progress) = watch::channel((0, 0));
        let progress_tx = std::sync::Arc::new(progress_tx);
        // Once the inboxes are settled nothing more comes: a short quiet
        // lets the last acks be answered.
        let quiet = Duration::from_millis(500);
        let mut consumer_tasks = Vec::new();
        for i in 0..consumers {
            for agent in ["worker", "aggregator"] {
                let addr = addrs[i % addrs.len()];
                consumer_tasks.push(tokio::spawn(consume(
                    addr,
                    agent,
                    format!("{agent}-{i}"),
                    max_in_flight,
                    finished.clone(),
                    quiet,
                )));
            }
        }
        let mut producer_tasks = Vec::new();
        for p in 0..producers {
            let addr = addrs[p % addrs.len()];
            producer_tasks.push(tokio::spawn(produce(
                addr,
                p,
                stopped.clone(),
                progress_tx.clone(),
            )));
        }
        Load {
            stop,
            producers: producer_tasks,
            consumers: consumer_tasks,
            finished: finished_tx,
            addr: addrs[0],
            progress,
        }
    }

    /// Plain handoffs and fan-ins accepted so far.
    pub fn progress(&self) -> (usize, usize) {
        *self.progress.borrow()
    }

    /// Waits until at least `handoffs` plain handoffs have been accepted
    /// since the start (panics after 60 s).
    pub async fn accepted_at_least(&mut self, handoffs: usize) {
        let wait = self.progress.wait_for(|(h, _)| *h >= handoffs);
        tokio::time::timeout(Duration::from_secs(60), wait)
            .await
            .expect("the load made progress")
            .expect("progress");
    }

    /// Stops the producers, waits until both inboxes have nothing left to
    /// deliver or settle (read from JetStream through `nats_url`, for at
    /// most 60 s), stops the consumers, and returns both sides.
    pub async fn finish(self, nats_url: &str) -> (Produced, Consumed) {
        let _ = self.stop.send(true);
        let mut produced = Produced::default();
        eprintln!("load: stopping the producers");
        for p in self.producers {
            let mut one = tokio::time::timeout(Duration::from_secs(120), p)
                .await
                .expect("a producer stops within 120 s")
                .expect("producer");
            produced.handoffs.append(&mut one.handoffs);
            produced.barriers.append(&mut one.barriers);
            produced.calls.append(&mut one.calls);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        // Every fan-in's release published (one whose broker call failed
        // after the decision is published by its release check, 5 s on).
        let client = connect(self.addr).await;
        for (run_id, barrier_id) in &produced.barriers {
            loop {
                let mut raw = client.raw();
                let read = raw.get_barrier(pb::GetBarrierRequest {
                    run_id: run_id.clone(),
                    barrier_id: barrier_id.clone(),
                });
                let barrier = tokio::time::timeout(Duration::from_secs(45), read)
                    .await
                    .expect("GetBarrier answers within 45 s")
                    .ok()
                    .and_then(|r| r.into_inner().barrier);
                if barrier.as_ref().is_some_and(|b| b.release_published) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{run_id}/{barrier_id} never published its release: {barrier:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        loop {
            let worker = crate::inbox(nats_url, "worker").await;
            let aggregator = crate::inbox(nats_url, "aggregator").await;
            let settled = |i: &crate::Inbox| i.pending == 0 && i.unacked == 0;
            if settled(&worker) && settled(&aggregator) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the inboxes never settled: worker {worker:?}, aggregator {aggregator:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = self.finished.send(true);
        eprintln!("load: producers done, inboxes settled; waiting for the consumers");
        let mut consumed = Consumed::default();
        for c in self.consumers {
            let one = tokio::time::timeout(Duration::from_secs(120), c)
                .await
                .expect("a consumer stops within 120 s")
                .expect("consumer");
            for (id, n) in one.deliveries {
                *consumed.deliveries.entry(id).or_default() += n;
            }
            for (id, n) in one.releases {
                *consumed.releases.entry(id).or_default() += n;
            }
            consumed.failed_acks += one.failed_acks;
            consumed.broken_streams += one.broken_streams;
            if one.last_stream_error.is_some() {
                consumed.last_stream_error = one.last_stream_error;
            }
        }
        (produced, consumed)
    }
}

/// One attempt, recorded.
async fn attempt<T>(
    calls: &mut Vec<Call>,
    call: impl std::future::Future<Output = handoff_client::Result<T>>,
) -> Option<T> {
    let start = Instant::now();
    // Longer than the broker's own bound on a call (6 x nats_timeout): a
    // call that outlasts it hung, and fails the test.
    let result = match tokio::time::timeout(Duration::from_secs(45), call).await {
        Ok(r) => r,
        Err(_) => {
            calls.push(Call {
                start,
                end: Instant::now(),
                failed: Some((
                    tonic::Code::DeadlineExceeded,
                    "no answer in 45 s".to_string(),
                )),
            });
            return None;
        }
    };
    let end = Instant::now();
    match result {
        Ok(v) => {
            calls.push(Call {
                start,
                end,
                failed: None,
            });
            Some(v)
        }
        Err(e) => {
            let code = e.code().unwrap_or(tonic::Code::Unknown);
            let reason = e.reason().unwrap_or_default().to_string();
            calls.push(Call {
                start,
                end,
                failed: Some((code, reason)),
            });
            None
        }
    }
}

/// Retries one call (the same request: the same idempotency key) while it
/// answers UNAVAILABLE, until it is accepted; any other failure, or 60 s
/// of failures, fails the test.
macro_rules! until_accepted {
    ($calls:expr, $call:expr) => {{
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(v) = attempt($calls, $call).await {
                break v;
            }
            let last = $calls.last().and_then(|c: &Call| c.failed.clone());
            assert!(
                matches!(&last, Some((tonic::Code::Unavailable, _))),
                "a call failed with other than UNAVAILABLE: {last:?}"
            );
            assert!(
                Instant::now() < deadline,
                "a call failed for 60 s: {last:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }};
}

async fn connect(addr: SocketAddr) -> Client {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match Client::connect(format!("http://{addr}")).await {
            Ok(c) => return c,
            Err(e) => {
                assert!(Instant::now() < deadline, "cannot reach {addr}: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn produce(
    addr: SocketAddr,
    p: usize,
    stopped: watch::Receiver<bool>,
    progress: std::sync::Arc<watch::Sender<(usize, usize)>>,
) -> Produced {
    let client = connect(addr).await;
    let mut out = Produced::default();
    let run_id = format!("load-{p}");
    until_accepted!(
        &mut out.calls,
        client.start_run(RunConfig::new("load").id(&run_id))
    );
    let mut step = 0u32;
    while !*stopped.borrow() {
        step += 1;
        if step.is_multiple_of(4) {
            let barrier_id = format!("b{p}x{step}");
            let spec = pb::BarrierSpec {
                run_id: run_id.clone(),
                barrier_id: barrier_id.clone(),
                branch_count: 3,
                mode: pb::BarrierMode::All as i32,
                target_agent: "aggregator".into(),
                ..Default::default()
            };
            until_accepted!(&mut out.calls, async {
                client
                    .raw()
                    .open_barrier(pb::OpenBarrierRequest {
                        barrier: Some(spec.clone()),
                    })
                    .await
                    .map_err(handoff_client::Error::from)
            });
            for key in ["0", "1", "2"] {
                let branch = Handoff::to_barrier(&run_id, &barrier_id, key, &note(key, step))
                    .expect("encode")
                    .from_agent("worker")
                    .idempotency_key(format!("{barrier_id}-{key}"));
                until_accepted!(&mut out.calls, client.handoff(branch.clone()));
            }
            out.barriers.push((run_id.clone(), barrier_id));
        } else {
            let handoff = Handoff::to(&run_id, "worker", &note("job", step))
                .expect("encode")
                .idempotency_key(format!("h{p}x{step}"));
            let receipt = until_accepted!(&mut out.calls, client.handoff(handoff.clone()));
            out.handoffs.push(receipt.handoff_id);
        }
        progress.send_modify(|(h, b)| {
            if step.is_multiple_of(4) {
                *b += 1;
            } else {
                *h += 1;
            }
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    out
}

/// Acks everything `agent` is given until the producers have finished and
/// nothing arrived for `quiet`.
async fn consume(
    addr: SocketAddr,
    agent: &'static str,
    instance: String,
    max_in_flight: u32,
    finished: watch::Receiver<bool>,
    quiet: Duration,
) -> Consumed {
    let mut out = Consumed::default();
    let mut quiet_since: Option<Instant> = None;
    // Once the load is finished (the inboxes are settled: nothing more
    // comes), a consumer ends after `quiet` without a delivery, whether
    // its stream is open or broken; one still given deliveries a minute
    // after that says which (the verdict then judges them) and ends.
    let mut finished_at: Option<Instant> = None;
    let mut unconfirmed: Option<String> = None;
    let mut late: Vec<(String, u32)> = Vec::new();
    let mut done = |quiet_since: &mut Option<Instant>, late: &[(String, u32)]| {
        if !*finished.borrow() {
            return false;
        }
        if finished_at.get_or_insert_with(Instant::now).elapsed() > Duration::from_secs(60) {
            eprintln!(
                "load: {instance}: still given deliveries a minute after the inboxes settled: {late:?}"
            );
            return true;
        }
        quiet_since.get_or_insert_with(Instant::now).elapsed() > quiet
    };
    'session: loop {
        if done(&mut quiet_since, &late) {
            return out;
        }
        let client = connect(addr).await;
        let subscribed = tokio::time::timeout(
            Duration::from_secs(45),
            client.subscribe(agent, &instance, max_in_flight),
        )
        .await
        .unwrap_or_else(|_| panic!("{instance}: Subscribe had no answer in 45 s"));
        let mut sub = match subscribed {
            Ok(s) => s,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue 'session;
            }
        };
        // An ack whose session went silent is repeated here, as the SDK
        // says: applied or not, it is confirmed (or refused) on this one.
        if let Some(id) = unconfirmed.take() {
            match tokio::time::timeout(Duration::from_secs(45), sub.ack_id(&id)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) if e.code() == Some(tonic::Code::FailedPrecondition) => {}
                _ => {
                    out.failed_acks += 1;
                    unconfirmed = Some(id);
                    continue 'session;
                }
            }
        }
        loop {
            let next = tokio::time::timeout(Duration::from_millis(500), sub.next_delivery()).await;
            let delivery = match next {
                Ok(Some(Ok(d))) => d,
                // The stream ended or broke: open another.
                Ok(Some(Err(e))) => {
                    out.broken_streams += 1;
                    out.last_stream_error = Some(e.to_string());
                    continue 'session;
                }
                Ok(None) => {
                    out.broken_streams += 1;
                    continue 'session;
                }
                Err(_) => {
                    if done(&mut quiet_since, &late) {
                        return out;
                    }
                    continue;
                }
            };
            quiet_since = None;
            if *finished.borrow() {
                late.push((delivery.handoff_id().to_string(), delivery.attempt()));
                if done(&mut quiet_since, &late) {
                    return out;
                }
            }
            if agent == "aggregator" {
                let release: pb::BarrierRelease = delivery.payload().expect("a BarrierRelease");
                *out.releases.entry(release.barrier_id).or_default() += 1;
            } else {
                *out.deliveries
                    .entry(delivery.handoff_id().to_string())
                    .or_default() += 1;
            }
            let mut tries = 0;
            loop {
                let acked = tokio::time::timeout(Duration::from_secs(45), delivery.ack()).await;
                let Ok(acked) = acked else {
                    panic!("{instance}: an ack had no answer in 45 s");
                };
                let Err(e) = acked else { break };
                out.failed_acks += 1;
                tries += 1;
                // No answer on this session (it went silent, or closed):
                // the outcome is unknown; repeat the ack on a new one.
                if matches!(e.kind(), ErrorKind::Timeout | ErrorKind::Closed) {
                    unconfirmed = Some(delivery.id().to_string());
                    continue 'session;
                }
                // A delivery superseded or gone is redelivered or done:
                // stop retrying it.
                if tries > 50 || e.code() == Some(tonic::Code::FailedPrecondition) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// What [`verify`] found.
#[derive(Debug)]
pub struct Verdict {
    /// Accepted handoffs never delivered (always 0 once verified).
    pub lost: usize,
    /// Accepted handoffs delivered more than once (after an ack that did
    /// not reach the broker, or a lease that passed during an outage).
    pub delivered_again: usize,
    /// The longest window in which calls failed and none succeeded.
    pub longest_gap: Duration,
    /// Failed attempts.
    pub failed_calls: usize,
}

/// Checks, on the evidence of JetStream (through `nats_url`) and the run
/// timelines (through `client`), that nothing accepted was lost or done
/// twice: every accepted handoff stored once, delivered, and acked (its
/// inbox has nothing left to deliver); every fan-in released exactly once
/// (one release stored and delivered, one `barrier_released` event).
/// Panics on the first violation; prints and returns the figures.
pub async fn verify(
    client: &Client,
    nats_url: &str,
    produced: &Produced,
    consumed: &Consumed,
) -> Verdict {
    use std::collections::HashSet;
    let accepted: HashSet<&String> = produced.handoffs.iter().collect();
    assert_eq!(accepted.len(), produced.handoffs.len(), "ids are unique");
    let worker = crate::settled_inbox(nats_url, "worker").await;
    let lost = accepted
        .iter()
        .filter(|id| !consumed.deliveries.contains_key(**id))
        .count();
    assert_eq!(
        lost, 0,
        "accepted handoffs never delivered; inbox {worker:?}"
    );
    assert_eq!(
        worker.stored as usize,
        accepted.len(),
        "each accepted handoff stored once: {worker:?}"
    );
    let aggregator = crate::settled_inbox(nats_url, "aggregator").await;
    assert_eq!(
        aggregator.stored as usize,
        produced.barriers.len(),
        "one release stored per fan-in: {aggregator:?}"
    );
    for (run, barrier) in &produced.barriers {
        if consumed.releases.contains_key(barrier) {
            continue;
        }
        // Say what the run recorded, so that the failure can be told apart
        // (a dead letter after attempts ran out, a release never stored).
        let timeline = client.get_run(run).await.map(|r| r.timeline);
        let kinds: Vec<String> = timeline
            .iter()
            .flatten()
            .map(|e| format!("{:?} {} {} {}", e.kind(), e.agent, e.handoff_id, e.reason))
            .collect();
        panic!("the release of {run}/{barrier} was never delivered; its run recorded {kinds:#?}");
    }
    let runs: HashSet<&String> = produced.barriers.iter().map(|(r, _)| r).collect();
    for run in runs {
        let barriers: Vec<&String> = produced
            .barriers
            .iter()
            .filter(|(r, _)| r == run)
            .map(|(_, b)| b)
            .collect();
        let released = |t: &[pb::Event], b: &str| {
            crate::count(t, &[pb::EventKind::BarrierReleased], |e| e.barrier_id == b)
        };
        let timeline =
            crate::timeline_when(client, run, |t| barriers.iter().all(|b| released(t, b) > 0))
                .await;
        for b in &barriers {
            assert_eq!(released(&timeline, b), 1, "{b} released exactly once");
        }
    }
    let verdict = Verdict {
        lost,
        delivered_again: consumed.deliveries.values().filter(|n| **n > 1).count(),
        longest_gap: produced.longest_gap(),
        failed_calls: produced.failures().len(),
    };
    println!(
        "{} handoffs and {} fan-ins accepted: lost {}, delivered again {} ({} acks failed and were retried, {} Subscribe streams broke and were opened again: {:?}), every fan-in released once; {} attempts failed, the longest window without a successful call {:.2} s",
        accepted.len(),
        produced.barriers.len(),
        verdict.lost,
        verdict.delivered_again,
        consumed.failed_acks,
        consumed.broken_streams,
        consumed.last_stream_error,
        verdict.failed_calls,
        verdict.longest_gap.as_secs_f64()
    );
    verdict
}
