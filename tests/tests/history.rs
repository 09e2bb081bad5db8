//! Histories under faults (see `handoff_tests::history`): runs driven
//! through the SDK on a three-node NATS cluster and two broker processes
//! while a nemesis kills (SIGKILL) and pauses (SIGSTOP, then SIGCONT)
//! broker replicas and NATS nodes, restarts NATS nodes, and partitions a
//! replica from some nodes (each replica reaches each node through a
//! proxy of [`handoff_tests::proxy`] that the nemesis cuts); then every
//! guarantee is checked on the history and the broker's records. A
//! broker built to skip its claims is caught by the same checker.
//!
//! `HANDOFF_CHAOS_SECS` sets how long the nemesis runs (default 40 s; `./dev
//! chaos` runs it for 30 minutes), `HANDOFF_CHAOS_SEED` the seed (printed;
//! the same seed makes the same choices of faults and timings), and
//! `HANDOFF_CHAOS_PAUSES=1` adds the pauses (SIGSTOP) of brokers and NATS
//! nodes to the kills and restarts, and `HANDOFF_CHAOS_CANCELS=1` the
//! owners' cancels (`./dev chaos` sets both). The run under the nemesis
//! is left to `./dev chaos` (it takes minutes, and its faults need time
//! to settle); the checker's test against a broker that skips its claims
//! runs in `./dev test`.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use handoff_tests::{
    cluster,
    history::{self, Targets, Workload},
    proxy::Proxy,
    BrokerProcess, Cluster, Nats, XorShift,
};
use nix::{sys::signal, unistd::Pid};

const BIN: &str = env!("CARGO_BIN_EXE_handoffd-under-test");
const LEASE: Duration = Duration::from_secs(3);

fn seconds() -> u64 {
    std::env::var("HANDOFF_CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40)
}

fn seed() -> u64 {
    std::env::var("HANDOFF_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        })
}

fn pauses() -> bool {
    std::env::var("HANDOFF_CHAOS_PAUSES").is_ok_and(|v| v == "1")
}

fn cancels() -> bool {
    std::env::var("HANDOFF_CHAOS_CANCELS").is_ok_and(|v| v == "1")
}

fn signal_pid(pid: Option<u32>, sig: signal::Signal) {
    if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
        let _ = signal::kill(Pid::from_raw(pid), sig);
    }
}

/// A broker replica, started against every node through its own proxies.
async fn replica(links: &[Proxy]) -> BrokerProcess {
    let urls: Vec<String> = links.iter().map(Proxy::url).collect();
    BrokerProcess::spawn(BIN, &urls.join(","), &[("HANDOFF_REPLICAS", "3")]).await
}

/// One proxy per NATS node, through which one replica reaches it (the
/// nemesis cuts some to partition that replica from those nodes).
async fn links(cluster: &Cluster) -> Vec<Proxy> {
    let mut links = Vec::new();
    for url in cluster.urls() {
        let addr = url
            .trim_start_matches("nats://")
            .parse()
            .expect("a node's address");
        links.push(Proxy::start(addr).await.expect("a proxy"));
    }
    links
}

fn print_report(report: &history::Report, faults: &HashMap<&str, usize>, took: Duration) {
    println!(
        "history: {} calls ({} accepted, {} refused, {} unknown) in {} runs {:?}; faults {:?}; {:.0} s; {} anomalies",
        report.calls,
        report.outcomes.0,
        report.outcomes.1,
        report.outcomes.2,
        report.runs,
        report.ends,
        faults,
        took.as_secs_f64(),
        report.anomalies.len()
    );
    for a in report.anomalies.iter().take(50) {
        println!("anomaly: {a}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes long: run by ./dev chaos"]
async fn a_history_under_kills_pauses_restarts_and_partitions_of_brokers_and_nats_has_no_anomaly() {
    let seed = seed();
    let budget = Duration::from_secs(seconds());
    println!("seed {seed} (HANDOFF_CHAOS_SEED), nemesis for {budget:?}");
    let mut rng = XorShift::new(seed | 1);
    // Nodes do not tell clients of each other: a replica reaches each only
    // through its proxy.
    let mut cluster = Cluster::start_with(3, |plan| {
        let mut args = cluster::default_args(plan);
        args.push("--no_advertise".into());
        args
    })
    .await
    .expect("a cluster");
    let links = [links(&cluster).await, links(&cluster).await];
    let mut replicas = vec![
        Some(replica(&links[0]).await),
        Some(replica(&links[1]).await),
    ];
    let live = |r: &[Option<BrokerProcess>]| r.iter().flatten().map(|b| b.addr).collect();
    let targets = Targets::new(live(&replicas));
    history::register(&targets, LEASE).await;
    let mut workload = Workload::start(&targets, 4, seed, LEASE, cancels());

    // The nemesis: one fault at a time, then healed.
    let started = Instant::now();
    let mut faults: HashMap<&str, usize> = HashMap::new();
    while started.elapsed() < budget {
        tokio::time::sleep(Duration::from_millis(2000 + rng.below(4000))).await;
        let hold = Duration::from_millis(1000 + rng.below(4000));
        let fault = rng.below(6);
        // Without pauses, a pause's turn is a kill of the same target.
        let fault = match fault {
            1 | 3 if !pauses() => fault - 1,
            f => f,
        };
        match fault {
            0 => {
                let i = rng.below(2) as usize;
                if let Some(b) = replicas[i].take() {
                    b.kill9().await;
                    targets.set(live(&replicas));
                    tokio::time::sleep(hold).await;
                    replicas[i] = Some(replica(&links[i]).await);
                    targets.set(live(&replicas));
                    *faults.entry("broker kill -9").or_default() += 1;
                }
            }
            1 => {
                let i = rng.below(2) as usize;
                let pid = replicas[i].as_ref().and_then(BrokerProcess::pid);
                signal_pid(pid, signal::Signal::SIGSTOP);
                tokio::time::sleep(hold).await;
                signal_pid(pid, signal::Signal::SIGCONT);
                *faults.entry("broker pause").or_default() += 1;
            }
            2 => {
                let n = rng.below(3) as usize;
                cluster.kill9(n).await;
                tokio::time::sleep(hold).await;
                cluster.restart(n).await.expect("the node restarts");
                *faults.entry("nats kill -9").or_default() += 1;
            }
            3 => {
                let n = rng.below(3) as usize;
                signal_pid(cluster.pid(n), signal::Signal::SIGSTOP);
                tokio::time::sleep(hold).await;
                signal_pid(cluster.pid(n), signal::Signal::SIGCONT);
                *faults.entry("nats pause").or_default() += 1;
            }
            5 => {
                // A replica cut off from one, two or all three nodes.
                let i = rng.below(2) as usize;
                let cut: Vec<usize> = {
                    let nodes = 1 + rng.below(7);
                    (0..3).filter(|n| nodes & (1 << n) != 0).collect()
                };
                for &n in &cut {
                    links[i][n].cut();
                }
                tokio::time::sleep(hold).await;
                for &n in &cut {
                    links[i][n].heal();
                }
                *faults.entry("partition").or_default() += 1;
            }
            _ => {
                let n = rng.below(3) as usize;
                signal_pid(cluster.pid(n), signal::Signal::SIGTERM);
                for _ in 0..100 {
                    if !cluster.is_running(n) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                if cluster.is_running(n) {
                    cluster.kill9(n).await;
                }
                cluster.restart(n).await.expect("the node restarts");
                *faults.entry("nats restart").or_default() += 1;
            }
        }
    }
    // Healed: every node and replica up. The runs end (completed,
    // cancelled, or timed out by the broker), then the history is checked.
    workload.stop_owners().await;
    let client = targets.client(0).await.expect("a broker");
    history::settle_runs(&client, &workload.history, history::RUN_TIMEOUT * 3).await;
    tokio::time::sleep(LEASE * 2).await;
    let history = workload.history.clone();
    workload.stop_agents().await;
    let report = history::check(&client, &history).await;
    print_report(&report, &faults, started.elapsed());
    assert!(report.runs > 0 && report.outcomes.0 > 0, "{report:?}");
    assert!(
        report.anomalies.is_empty(),
        "seed {seed}: {:#?}",
        report.anomalies
    );
}

/// A short history against one in-process broker on `nats` (its consumed
/// deliveries left unacked, so every one is redone with other content),
/// checked.
async fn redone(nats: &Nats, skip_claim: bool) -> history::Report {
    let broker = handoff_tests::Broker::start(nats.url(), |c| {
        c.faults.skip_consume_ack = true;
        c.faults.skip_claim = skip_claim;
    })
    .await;
    let targets = Targets::new(vec![broker.addr]);
    history::register(&targets, LEASE).await;
    let mut workload = Workload::start(&targets, 2, seed(), LEASE, false);
    tokio::time::sleep(Duration::from_secs(12)).await;
    workload.stop_owners().await;
    let client = broker.client().await;
    history::settle_runs(&client, &workload.history, history::RUN_TIMEOUT * 2).await;
    let history = workload.history.clone();
    workload.stop_agents().await;
    let report = history::check(&client, &history).await;
    print_report(&report, &HashMap::new(), Duration::ZERO);
    broker.stop().await;
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_skips_its_claims_is_caught_by_the_checker() {
    // Every consumed delivery comes back and is redone differently: with
    // its claims, the broker answers each redo with the first handoff.
    let nats = Nats::start().await;
    let sound = redone(&nats, false).await;
    assert!(sound.outcomes.0 > 0, "{sound:?}");
    assert!(sound.anomalies.is_empty(), "{:#?}", sound.anomalies);
    // Without them, the redo is stored again: the checker says so.
    let nats = Nats::start().await;
    let broken = redone(&nats, true).await;
    assert!(
        broken
            .anomalies
            .iter()
            .any(|a| a.contains("was stored 2 times") || a.contains("applied at revisions")),
        "{:#?}",
        broken.anomalies
    );
}
