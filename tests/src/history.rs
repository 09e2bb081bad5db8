//! A history checker: clients drive runs through the SDK while a nemesis
//! breaks what they run on, every operation's invocation and outcome is
//! recorded, and at the end the history and the broker's own records
//! (timelines, state revisions, barriers) are checked against the
//! guarantees.
//!
//! The workload: owners start runs (with state) and hand each an ask,
//! keyed; one run in six is cancelled by its owner, when asked. Agents work the runs:
//! `planner` hands off to `researcher` (complete-and-handoff with a state
//! delta), `researcher` fans out three branches to `worker`, each worker
//! reports its branch to the barrier (with a delta), and `aggregator`
//! completes the run (with a delta). An agent's redo differs from its
//! first try (a new idempotency key per attempt, as a model's output
//! would), so only the broker's claim on a consumed delivery makes a redo
//! the same handoff. Now and then an instance stalls past its lease before
//! it answers (a paused process).
//!
//! [`check`] proves, from the history and the broker's records:
//! - every run ended exactly once, and its end names its owner;
//! - every acknowledged handoff was accepted exactly once (one
//!   `handoff_accepted`);
//! - no delivery's work was stored twice (one effective handoff, or one
//!   barrier, per consumed delivery; each agent delivered at most the
//!   handoffs a run makes for it, whatever the calls answered), and no
//!   instance's answer after its lease passed took effect;
//! - every barrier released at most once, exactly once in a completed
//!   run, with all three branches arrived;
//! - each run's state revisions form one history in which every
//!   acknowledged delta appears once, at the revision its receipt names,
//!   and no refused one appears.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use handoff_client::{
    pb, AgentConfig, Client, ErrorKind, Handoff, JoinMode, RunConfig, StateDelta,
};
use tokio::{sync::watch, task::JoinHandle};

use crate::{note, XorShift};

/// How long a run may take before the broker times it out.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(40);

/// The agents of the workload, in the order a run reaches them.
pub const AGENTS: [&str; 4] = ["planner", "researcher", "worker", "aggregator"];

/// What became of one call.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Accepted: the handoffs (or branches) it names, and whether the
    /// broker said it repeated one.
    Ok {
        /// Handoff ids with their state revisions.
        receipts: Vec<(String, u64)>,
        /// The broker answered it as a repeat.
        duplicate: bool,
    },
    /// Refused by the broker (nothing was done), with its reason.
    Refused(String),
    /// Not known (the call failed on the way, or the broker was
    /// unavailable): it may or may not have taken effect.
    Unknown(String),
}

/// One recorded call.
#[derive(Debug, Clone)]
pub struct Call {
    /// `start`, `kick`, `cancel`, or the agent that made it.
    pub op: String,
    /// The run.
    pub run: String,
    /// The handoff id the request makes (derived as the broker does;
    /// empty for a fan-out, a start or a cancel).
    pub id: String,
    /// The handoff of the delivery it consumes, if any.
    pub consumed: String,
    /// The barrier of a fan-out.
    pub barrier: String,
    /// Its instance and the attempt it worked on.
    pub instance: String,
    /// The delivery's attempt.
    pub attempt: u32,
    /// The delivery's lease deadline.
    pub lease_deadline: Option<SystemTime>,
    /// Whether it carried a state delta.
    pub delta: bool,
    /// When it was sent.
    pub sent: SystemTime,
    /// What came of it.
    pub outcome: Outcome,
}

impl Call {
    /// A call the run's owner made (`op`: `start`, `kick` or `cancel`).
    fn by_owner(
        op: &str,
        run: &str,
        id: &str,
        owner: &str,
        delta: bool,
        sent: SystemTime,
        outcome: Outcome,
    ) -> Call {
        Call {
            op: op.to_string(),
            run: run.to_string(),
            id: id.to_string(),
            consumed: String::new(),
            barrier: String::new(),
            instance: owner.to_string(),
            attempt: 0,
            lease_deadline: None,
            delta,
            sent,
            outcome,
        }
    }
}

/// The history: every call, and the runs started.
#[derive(Debug, Default)]
pub struct History {
    calls: Mutex<Vec<Call>>,
    runs: Mutex<Vec<String>>,
}

impl History {
    fn record(&self, call: Call) {
        if let Ok(mut calls) = self.calls.lock() {
            calls.push(call);
        }
    }

    /// The calls recorded.
    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// The runs started.
    pub fn runs(&self) -> Vec<String> {
        self.runs.lock().map(|c| c.clone()).unwrap_or_default()
    }
}

/// The brokers a client may use now (the nemesis changes them).
#[derive(Clone, Default)]
pub struct Targets {
    addrs: Arc<Mutex<Vec<SocketAddr>>>,
    clients: Arc<Mutex<HashMap<SocketAddr, Client>>>,
}

impl Targets {
    /// Targets `addrs`.
    pub fn new(addrs: Vec<SocketAddr>) -> Targets {
        let t = Targets::default();
        t.set(addrs);
        t
    }

    /// Replaces the live brokers.
    pub fn set(&self, addrs: Vec<SocketAddr>) {
        if let Ok(mut a) = self.addrs.lock() {
            *a = addrs;
        }
    }

    /// A client of the `n`-th live broker (modulo their number).
    pub async fn client(&self, n: usize) -> Option<Client> {
        let addr = {
            let addrs = self.addrs.lock().ok()?;
            if addrs.is_empty() {
                return None;
            }
            addrs[n % addrs.len()]
        };
        if let Some(c) = self.clients.lock().ok()?.get(&addr) {
            return Some(c.clone());
        }
        let c = Client::connect(format!("http://{addr}")).await.ok()?;
        self.clients.lock().ok()?.insert(addr, c.clone());
        Some(c)
    }
}

/// Registers the workload's agents (lease `lease`), retrying.
pub async fn register(targets: &Targets, lease: Duration) {
    for agent in AGENTS {
        for n in 0.. {
            let Some(c) = targets.client(n).await else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            match c
                .register_agent(AgentConfig::new(agent).lease(lease).max_attempts(50))
                .await
            {
                Ok(_) => break,
                Err(_) if n < 100 => tokio::time::sleep(Duration::from_millis(200)).await,
                Err(e) => panic!("registering {agent}: {e}"),
            }
        }
    }
}

/// The running workload.
pub struct Workload {
    stop: watch::Sender<bool>,
    owners: Vec<JoinHandle<()>>,
    agents: Vec<JoinHandle<()>>,
    /// The history recorded.
    pub history: Arc<History>,
}

impl Workload {
    /// Starts `owners` owners (one run in six cancelled when `cancels`)
    /// and two instances of each agent, against `targets`, seeded by
    /// `seed`; `lease` is the agents' lease.
    pub fn start(
        targets: &Targets,
        owners: usize,
        seed: u64,
        lease: Duration,
        cancels: bool,
    ) -> Workload {
        let (stop, stopped) = watch::channel(false);
        let history = Arc::new(History::default());
        let owners = (0..owners)
            .map(|i| {
                tokio::spawn(owner(
                    targets.clone(),
                    history.clone(),
                    stopped.clone(),
                    i,
                    seed.wrapping_add(i as u64 * 7919),
                    cancels,
                ))
            })
            .collect();
        let mut agents = Vec::new();
        for (a, agent) in AGENTS.iter().enumerate() {
            for i in 0..2 {
                agents.push(tokio::spawn(instance(
                    targets.clone(),
                    history.clone(),
                    agent,
                    i,
                    seed.wrapping_mul(31).wrapping_add((a * 2 + i) as u64),
                    lease,
                )));
            }
        }
        Workload {
            stop,
            owners,
            agents,
            history,
        }
    }

    /// Stops the owners (no new runs); the agents go on.
    pub async fn stop_owners(&mut self) {
        let _ = self.stop.send(true);
        for o in self.owners.drain(..) {
            let _ = o.await;
        }
    }

    /// Stops the agents.
    pub async fn stop_agents(self) {
        for a in self.agents {
            a.abort();
            let _ = a.await;
        }
    }
}

fn outcome<T>(r: &handoff_client::Result<T>, ok: impl FnOnce(&T) -> Outcome) -> Outcome {
    match r {
        Ok(v) => ok(v),
        // A refusal is an answer: nothing was done.
        Err(e) => match e.kind() {
            ErrorKind::InvalidArgument
            | ErrorKind::NotFound
            | ErrorKind::AlreadyExists
            | ErrorKind::FailedPrecondition
            | ErrorKind::PermissionDenied
            | ErrorKind::Conflict => Outcome::Refused(e.reason().unwrap_or("").to_string()),
            _ => Outcome::Unknown(e.to_string()),
        },
    }
}

fn receipt(r: &handoff_client::Receipt) -> Outcome {
    Outcome::Ok {
        receipts: vec![(r.handoff_id.clone(), r.state_revision)],
        duplicate: r.duplicate,
    }
}

/// The id the broker gives a handoff of `req` (consuming `consumed`).
fn derived(req: pb::HandoffRequest, consumed: Option<&str>) -> String {
    handoffd::rules::handoff::handoff_id(&req, consumed)
}

async fn owner(
    targets: Targets,
    history: Arc<History>,
    stopped: watch::Receiver<bool>,
    i: usize,
    seed: u64,
    cancels: bool,
) {
    let mut rng = XorShift::new(seed | 1);
    let owner = format!("owner-{i}");
    for n in 0u64.. {
        if *stopped.borrow() {
            return;
        }
        let run = format!("h{seed:x}-{i}-{n}");
        // Started (a retry of the same id is the same run).
        let mut started = false;
        for t in 0..50 {
            let Some(c) = targets.client(t + i).await else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            let sent = SystemTime::now();
            let r = c
                .start_run(
                    RunConfig::new(&owner)
                        .id(&run)
                        .state("n", n as f64)
                        .timeout(RUN_TIMEOUT),
                )
                .await;
            let o = outcome(&r, |_| Outcome::Ok {
                receipts: Vec::new(),
                duplicate: false,
            });
            history.record(Call::by_owner(
                "start",
                &run,
                "",
                &owner,
                false,
                sent,
                o.clone(),
            ));
            match o {
                Outcome::Ok { .. } => {
                    started = true;
                    break;
                }
                Outcome::Refused(_) => break,
                Outcome::Unknown(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        if !started {
            continue;
        }
        if let Ok(mut runs) = history.runs.lock() {
            runs.push(run.clone());
        }
        // The ask, keyed: retried until answered.
        let id = derived(
            pb::HandoffRequest {
                run_id: run.clone(),
                target_agent: "planner".into(),
                idempotency_key: "kick".into(),
                ..Default::default()
            },
            None,
        );
        for t in 0..50 {
            let Some(c) = targets.client(t + i).await else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            let sent = SystemTime::now();
            let r = match Handoff::to(&run, "planner", &note("ask", n as u32)) {
                Ok(h) => {
                    c.handoff(
                        h.idempotency_key("kick")
                            .state_delta(StateDelta::new().set("kick", n as f64)),
                    )
                    .await
                }
                Err(e) => Err(e),
            };
            let o = outcome(&r, receipt);
            history.record(Call::by_owner(
                "kick",
                &run,
                &id,
                &owner,
                true,
                sent,
                o.clone(),
            ));
            match o {
                Outcome::Unknown(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                _ => break,
            }
        }
        if rng.below(6) == 0 && cancels {
            tokio::time::sleep(Duration::from_millis(rng.below(2000))).await;
            for t in 0..50 {
                let Some(c) = targets.client(t + i).await else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                let sent = SystemTime::now();
                let r = c.cancel_run(&run, "changed my mind").await;
                let o = outcome(&r, |_| Outcome::Ok {
                    receipts: Vec::new(),
                    duplicate: false,
                });
                history.record(Call::by_owner(
                    "cancel",
                    &run,
                    "",
                    &owner,
                    false,
                    sent,
                    o.clone(),
                ));
                match o {
                    Outcome::Unknown(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                    _ => break,
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(400 + rng.below(800))).await;
    }
}

async fn instance(
    targets: Targets,
    history: Arc<History>,
    agent: &'static str,
    i: usize,
    seed: u64,
    lease: Duration,
) {
    let name = format!("{agent}-{i}");
    let mut taken = 0u64;
    for n in 0usize.. {
        let Some(c) = targets.client(n + i).await else {
            tokio::time::sleep(Duration::from_millis(300)).await;
            continue;
        };
        let Ok(mut sub) = c.subscribe(agent, &name, IN_FLIGHT).await else {
            tokio::time::sleep(Duration::from_millis(300)).await;
            continue;
        };
        loop {
            let next = tokio::time::timeout(Duration::from_secs(2), sub.next_delivery()).await;
            let d = match next {
                Ok(Some(Ok(d))) => d,
                // Nothing for a while: look again.
                Err(_) => continue,
                // The stream broke (its broker went away): subscribe again.
                Ok(_) => break,
            };
            // Each delivery worked on at once, with choices of its own.
            taken += 1;
            let mut rng = XorShift::new(seed.wrapping_add(taken.wrapping_mul(0x9e37_79b9)) | 1);
            let (history, name) = (history.clone(), name.clone());
            tokio::spawn(async move { work(&history, &name, agent, &d, &mut rng, lease).await });
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Deliveries each instance works on at once.
const IN_FLIGHT: u32 = 8;

async fn work(
    history: &History,
    instance: &str,
    agent: &str,
    d: &handoff_client::Delivery,
    rng: &mut XorShift,
    lease: Duration,
) {
    let attempt = d.attempt();
    let lease_deadline = d
        .raw()
        .lease_deadline
        .and_then(|t| SystemTime::try_from(t).ok());
    // Now and then a stall past the lease, as a paused process has.
    if rng.below(25) == 0 {
        tokio::time::sleep(lease + Duration::from_secs(1)).await;
    }
    let key = format!("a{attempt}-{:x}", rng.below(u64::MAX >> 1));
    let run = d.run_id().to_string();
    let consumed = d.handoff_id().to_string();
    let base = |target: &str, r#final: bool, to_barrier: bool| pb::HandoffRequest {
        run_id: run.clone(),
        target_agent: target.to_string(),
        r#final,
        to_barrier,
        idempotency_key: key.clone(),
        source_agent: agent.to_string(),
        ..Default::default()
    };
    let sent = SystemTime::now();
    let (id, barrier, delta, o) = match agent {
        "planner" => {
            let r = match Handoff::to("", "researcher", &note("plan", attempt)) {
                Ok(h) => {
                    d.handoff(
                        h.idempotency_key(&key)
                            .state_delta(StateDelta::new().set("plan", f64::from(attempt))),
                    )
                    .await
                }
                Err(e) => Err(e),
            };
            let id = derived(base("researcher", false, false), Some(&consumed));
            (id, String::new(), true, outcome(&r, receipt))
        }
        "researcher" => {
            let items = (0..3).map(|k| note("part", k));
            let r = d
                .fan_out("worker", items)
                .join("aggregator", JoinMode::All)
                .await;
            let barrier = r.as_ref().map(|f| f.barrier_id.clone()).unwrap_or_default();
            let o = outcome(&r, |f| Outcome::Ok {
                receipts: f
                    .branches
                    .iter()
                    .map(|b| (b.handoff_id.clone(), b.state_revision))
                    .collect(),
                duplicate: f.branches.iter().all(|b| b.duplicate),
            });
            (String::new(), barrier, false, o)
        }
        "worker" => {
            let branch = d
                .barrier_branch()
                .map(|(_, k)| k.to_string())
                .unwrap_or_default();
            let r = match Handoff::to_barrier("", "", "", &note("found", attempt)) {
                Ok(h) => {
                    d.handoff(h.idempotency_key(&key).state_delta(
                        StateDelta::new().set(format!("w{branch}"), f64::from(attempt)),
                    ))
                    .await
                }
                Err(e) => Err(e),
            };
            let id = derived(base("", false, true), Some(&consumed));
            (id, String::new(), true, outcome(&r, receipt))
        }
        _ => {
            let r = match Handoff::final_result("", &note("report", attempt)) {
                Ok(h) => {
                    d.handoff(
                        h.idempotency_key(&key)
                            .state_delta(StateDelta::new().set("done", f64::from(attempt))),
                    )
                    .await
                }
                Err(e) => Err(e),
            };
            let id = derived(base("", true, false), Some(&consumed));
            (id, String::new(), true, outcome(&r, receipt))
        }
    };
    history.record(Call {
        op: agent.to_string(),
        run,
        id,
        consumed,
        barrier,
        instance: instance.to_string(),
        attempt,
        lease_deadline,
        delta,
        sent,
        outcome: o,
    });
}

/// What [`check`] found.
#[derive(Debug, Default)]
pub struct Report {
    /// Calls by kind, and by outcome (ok, refused, unknown).
    pub calls: usize,
    /// Calls accepted, refused and of unknown outcome.
    pub outcomes: (usize, usize, usize),
    /// Runs started, and how they ended.
    pub runs: usize,
    /// Runs by their end (completed, cancelled, failed, timed out).
    pub ends: HashMap<String, usize>,
    /// Every anomaly found, described.
    pub anomalies: Vec<String>,
}

const ENDS: [pb::EventKind; 4] = [
    pb::EventKind::RunCompleted,
    pb::EventKind::RunCancelled,
    pb::EventKind::RunFailed,
    pb::EventKind::RunTimedOut,
];

/// Checks `history` against the records of the broker `client` speaks to
/// (every run must have ended; see [`settle_runs`]).
pub async fn check(client: &Client, history: &History) -> Report {
    let calls = history.calls();
    let mut report = Report {
        calls: calls.len(),
        runs: history.runs().len(),
        ..Default::default()
    };
    for c in &calls {
        match c.outcome {
            Outcome::Ok { .. } => report.outcomes.0 += 1,
            Outcome::Refused(_) => report.outcomes.1 += 1,
            Outcome::Unknown(_) => report.outcomes.2 += 1,
        }
    }
    let mut by_run: HashMap<&str, Vec<&Call>> = HashMap::new();
    for c in &calls {
        by_run.entry(c.run.as_str()).or_default().push(c);
    }
    let anomalies = &mut report.anomalies;
    // No delivery's work stored twice; nothing settled after its lease.
    let mut effects: HashMap<&str, HashSet<String>> = HashMap::new();
    for c in &calls {
        let Outcome::Ok {
            receipts,
            duplicate,
        } = &c.outcome
        else {
            continue;
        };
        if c.consumed.is_empty() || *duplicate {
            continue;
        }
        let effect = if c.barrier.is_empty() {
            receipts
                .first()
                .map(|(id, _)| id.clone())
                .unwrap_or_default()
        } else {
            c.barrier.clone()
        };
        effects
            .entry(c.consumed.as_str())
            .or_default()
            .insert(effect);
        if let Some(deadline) = c.lease_deadline {
            if c.sent > deadline + Duration::from_secs(1) {
                anomalies.push(format!(
                    "{} {} of run {} took effect though sent {:?} after its lease passed",
                    c.op,
                    c.instance,
                    c.run,
                    c.sent.duration_since(deadline).unwrap_or_default()
                ));
            }
        }
    }
    for (consumed, made) in &effects {
        if made.len() > 1 {
            anomalies.push(format!(
                "the work of delivery {consumed} was stored {} times: {made:?}",
                made.len()
            ));
        }
    }
    for run in history.runs() {
        let got = match client.get_run(&run).await {
            Ok(g) => g,
            Err(e) => {
                anomalies.push(format!("run {run}: not readable: {e}"));
                continue;
            }
        };
        let status = got.run.as_ref().map_or(0, |r| r.status);
        let owner = got
            .run
            .as_ref()
            .map(|r| r.owner.clone())
            .unwrap_or_default();
        let ends: Vec<&pb::Event> = got
            .timeline
            .iter()
            .filter(|e| ENDS.iter().any(|k| e.kind == *k as i32))
            .collect();
        if ends.len() != 1 {
            anomalies.push(format!("run {run} ended {} times", ends.len()));
        }
        if let Some(end) = ends.first() {
            *report.ends.entry(format!("{:?}", end.kind())).or_default() += 1;
            let matches = [
                (pb::EventKind::RunCompleted, pb::RunStatus::Completed),
                (pb::EventKind::RunCancelled, pb::RunStatus::Cancelled),
                (pb::EventKind::RunFailed, pb::RunStatus::Failed),
                (pb::EventKind::RunTimedOut, pb::RunStatus::TimedOut),
            ]
            .iter()
            .any(|(k, s)| end.kind == *k as i32 && status == *s as i32);
            if !matches {
                anomalies.push(format!(
                    "run {run}: ended {:?} but its status is {status}",
                    end.kind()
                ));
            }
            if end.owner != owner {
                anomalies.push(format!("run {run}: its end does not name its owner"));
            }
        }
        if !pb::RunStatus::try_from(status).is_ok_and(|s| s.is_terminal()) {
            anomalies.push(format!("run {run} never ended ({status})"));
        }
        let completed = status == pb::RunStatus::Completed as i32;
        // Every acknowledged handoff accepted once.
        let accepted = |id: &str| {
            got.timeline
                .iter()
                .filter(|e| e.kind == pb::EventKind::HandoffAccepted as i32 && e.handoff_id == id)
                .count()
        };
        let mine = by_run.get(run.as_str()).cloned().unwrap_or_default();
        // Each stage's work reached the next once, whatever its calls
        // answered: the handoffs each agent was delivered in the run.
        for (agent, most) in [("researcher", 1), ("worker", 3), ("aggregator", 1)] {
            let delivered: HashSet<&str> = mine
                .iter()
                .filter(|c| c.op == agent)
                .map(|c| c.consumed.as_str())
                .collect();
            if delivered.len() > most {
                anomalies.push(format!(
                    "run {run}: {agent} was delivered {} handoffs, not at most {most}: {delivered:?}",
                    delivered.len()
                ));
            }
        }
        let mut acknowledged: Vec<(String, u64)> = Vec::new();
        let mut refused: HashMap<String, String> = HashMap::new();
        for c in &mine {
            match &c.outcome {
                Outcome::Ok {
                    receipts,
                    duplicate,
                } => {
                    for (id, revision) in receipts {
                        // (A repeat answered by a barrier with its first
                        // result names no revision.)
                        if c.delta && !(*duplicate && *revision == 0) {
                            acknowledged.push((id.clone(), *revision));
                        }
                        if accepted(id) != 1 {
                            anomalies.push(format!(
                                "run {run}: handoff {id} ({}) acknowledged, accepted {} times",
                                c.op,
                                accepted(id)
                            ));
                        }
                    }
                }
                Outcome::Refused(reason) if !c.id.is_empty() => {
                    refused.insert(c.id.clone(), format!("{} refused {reason}", c.op));
                }
                _ => {}
            }
        }
        // Barriers: released at most once; once in a completed run, with
        // its three branches arrived.
        let barriers: HashSet<&str> = got
            .timeline
            .iter()
            .filter(|e| e.kind == pb::EventKind::BarrierOpened as i32)
            .map(|e| e.barrier_id.as_str())
            .chain(
                mine.iter()
                    .filter(|c| !c.barrier.is_empty())
                    .map(|c| c.barrier.as_str()),
            )
            .collect();
        if barriers.len() > 1 {
            anomalies.push(format!(
                "run {run}: {} barriers opened: {barriers:?}",
                barriers.len()
            ));
        }
        for b in &barriers {
            let released = got
                .timeline
                .iter()
                .filter(|e| e.kind == pb::EventKind::BarrierReleased as i32 && e.barrier_id == *b)
                .count();
            if released > 1 || (completed && released != 1) {
                anomalies.push(format!("run {run}: barrier {b} released {released} times"));
            }
            if completed {
                match client.get_barrier(&run, b).await {
                    Ok(barrier) => {
                        let arrived = barrier
                            .branches
                            .iter()
                            .filter(|r| r.status == pb::BranchStatus::Arrived as i32)
                            .count();
                        if arrived != 3 {
                            anomalies.push(format!(
                                "run {run}: barrier {b} released with {arrived} of 3 branches"
                            ));
                        }
                    }
                    Err(e) => anomalies.push(format!("run {run}: barrier {b} not readable: {e}")),
                }
            }
        }
        // State: one history of revisions; each acknowledged delta once,
        // at its receipt's revision; no refused one.
        let latest = match client.get_state(&run, 0).await {
            Ok(s) => s.latest_revision,
            Err(e) => {
                anomalies.push(format!("run {run}: state not readable: {e}"));
                continue;
            }
        };
        let mut appliers: HashMap<String, u64> = HashMap::new();
        for revision in 2..=latest {
            match client.get_state(&run, revision).await {
                Ok(s) => {
                    if let Some(before) = appliers.insert(s.handoff_id.clone(), revision) {
                        anomalies.push(format!(
                            "run {run}: the delta of {} applied at revisions {before} and {revision}",
                            s.handoff_id
                        ));
                    }
                    if let Some(how) = refused.get(&s.handoff_id) {
                        let end = ends.first().map(|e| format!("{:?}", e.kind()));
                        anomalies.push(format!(
                            "run {run} (ended {end:?}): handoff {} ({how}) changed the state (revision {revision})",
                            s.handoff_id
                        ));
                    }
                }
                Err(e) => anomalies.push(format!("run {run}: revision {revision}: {e}")),
            }
        }
        // (A request refused once may have taken effect in an attempt of
        // unknown outcome, or been accepted: only one never answered
        // otherwise counts as refused.)
        for c in &mine {
            if !matches!(c.outcome, Outcome::Refused(_)) {
                refused.remove(&c.id);
            }
        }
        for (id, revision) in &acknowledged {
            if appliers.get(id) != Some(revision) {
                anomalies.push(format!(
                    "run {run}: acknowledged delta of {id} (revision {revision}) found at {:?}",
                    appliers.get(id)
                ));
            }
        }
    }
    report
}

/// Waits until every run of `history` has ended (within `within`).
pub async fn settle_runs(client: &Client, history: &History, within: Duration) {
    let end = std::time::Instant::now() + within;
    for run in history.runs() {
        loop {
            let status = client
                .get_run(&run)
                .await
                .ok()
                .and_then(|g| g.run)
                .map_or(0, |r| r.status);
            if pb::RunStatus::try_from(status).is_ok_and(|s| s.is_terminal())
                || std::time::Instant::now() > end
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
