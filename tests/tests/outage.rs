//! NATS going away under the broker: a restart of `nats-server` under load
//! is ridden out without a restart of the broker, calls during the outage
//! answer UNAVAILABLE within `nats_timeout`, health says NOT_SERVING while
//! it lasts; a broker starts from any server of its list; and two broker
//! replicas free each other's delivery slots at once.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use handoff_client::{pb, AgentConfig, Handoff, RunConfig};
use handoff_tests::{inbox, load, next_within, note, settled_inbox, Broker, Nats};
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

/// Polls the broker's health every 50 ms, keeping (when, status).
fn watch_health(addr: SocketAddr) -> Arc<Mutex<Vec<(Instant, i32)>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let out = seen.clone();
    tokio::spawn(async move {
        let Ok(channel) = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .connect()
            .await
        else {
            return;
        };
        let mut health = HealthClient::new(channel);
        loop {
            let status = health
                .check(HealthCheckRequest {
                    service: "handoff.v1.HandoffBroker".into(),
                })
                .await
                .map(|r| r.into_inner().status)
                .unwrap_or(-1);
            if let Ok(mut s) = out.lock() {
                s.push((Instant::now(), status));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    seen
}

#[tokio::test]
async fn a_nats_restart_under_load_is_ridden_out_and_loses_nothing() {
    let bound = Duration::from_secs(2);
    let lease = Duration::from_secs(2);
    let mut nats = Nats::start().await;
    let broker = Broker::start(nats.url(), |c| c.nats_timeout = bound).await;
    let client = broker.client().await;
    load::register_agents(&client, lease).await;
    let health = watch_health(broker.addr);
    let mut load = load::Load::start(&[broker.addr], 3, 1, 16).await;
    load.accepted_at_least(40).await;

    let killed = Instant::now();
    nats.kill9().await;
    // Longer than the bound, so calls made during it must give up.
    tokio::time::sleep(bound + Duration::from_secs(2)).await;
    nats.restart().await;
    let back = Instant::now();
    println!(
        "nats-server down for {:.1} s",
        (back - killed).as_secs_f64()
    );
    // Served again without a restart of the broker: more is accepted.
    let before = load.progress().0;
    load.accepted_at_least(before + 40).await;
    let (produced, consumed) = load.finish(nats.url()).await;

    // Calls during the outage answered UNAVAILABLE (NATS_UNAVAILABLE)
    // within the bound (and a little for the call itself).
    let failures = produced.failures();
    assert!(
        failures.iter().any(|c| c.start > killed && c.start < back),
        "calls were made and failed during the outage"
    );
    for c in &failures {
        let (code, reason) = c.failed.clone().unwrap_or((tonic::Code::Ok, String::new()));
        assert_eq!(
            (code, reason.as_str()),
            (tonic::Code::Unavailable, "NATS_UNAVAILABLE")
        );
        assert!(
            c.end - c.start <= bound + Duration::from_secs(1),
            "a call answered after {:?}, over the bound {bound:?}",
            c.end - c.start
        );
    }
    let slowest = failures
        .iter()
        .map(|c| c.end - c.start)
        .max()
        .unwrap_or_default();
    println!(
        "the slowest failed call answered in {:.2} s (nats_timeout {bound:?})",
        slowest.as_secs_f64()
    );

    // Health: NOT_SERVING while NATS was down, SERVING after.
    let samples = health.lock().map(|s| s.clone()).unwrap_or_default();
    assert!(
        samples
            .iter()
            .any(|(t, s)| *t > killed && *t < back && *s == ServingStatus::NotServing as i32),
        "NOT_SERVING during the outage: {samples:?}"
    );
    assert_eq!(
        samples.last().map(|(_, s)| *s),
        Some(ServingStatus::Serving as i32),
        "SERVING once NATS is back"
    );
    assert!(
        samples
            .iter()
            .filter(|(t, _)| *t < killed)
            .all(|(_, s)| *s == ServingStatus::Serving as i32),
        "SERVING before the outage"
    );

    load::verify(&client, nats.url(), &produced, &consumed).await;
}

#[tokio::test]
async fn a_broker_starts_from_any_server_of_its_list() {
    let nats = Nats::start().await;
    // Ports bound and released: nothing listens there.
    let closed = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| format!("nats://{a}"))
            .expect("a free port")
    };
    let list = format!("{},{},{}", closed(), nats.url(), closed());
    let broker = Broker::start(&list, |_| {}).await;
    let client = broker.client().await;
    client
        .register_agent(AgentConfig::new("worker"))
        .await
        .expect("serves");
    let run = client.start_run(RunConfig::new("o")).await.expect("run");
    client
        .handoff(Handoff::to(&run.id, "worker", &note("job", 1)).expect("encode"))
        .await
        .expect("accepted");
    assert_eq!(inbox(nats.url(), "worker").await.stored, 1);
}

#[tokio::test]
async fn two_replicas_free_each_others_slots_at_once() {
    // A lease far longer than the test: a slot freed only by its lease
    // would stall an instance for 60 s.
    let lease = Duration::from_secs(60);
    let nats = Nats::start().await;
    let a = Broker::start(nats.url(), |_| {}).await;
    let b = Broker::start(nats.url(), |_| {}).await;
    let (via_a, via_b) = (a.client().await, b.client().await);
    for agent in ["worker", "sink"] {
        via_a
            .register_agent(AgentConfig::new(agent).lease(lease))
            .await
            .expect("register");
    }
    let run = via_a.start_run(RunConfig::new("o")).await.expect("run");
    let jobs = 16;
    for i in 0..jobs {
        via_a
            .handoff(Handoff::to(&run.id, "worker", &note("job", i)).expect("encode"))
            .await
            .expect("accepted");
    }
    // Two instances taking one delivery at a time, one on each replica.
    // Each completes its delivery by a handoff to `sink` made through the
    // other replica, so every slot is freed by a settlement made elsewhere.
    let taken = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let instance = |sub_client: handoff_client::Client, other: handoff_client::Client, name| {
        let run_id = run.id.clone();
        let taken = taken.clone();
        tokio::spawn(async move {
            use std::sync::atomic::Ordering;
            let mut sub = sub_client
                .subscribe("worker", name, 1)
                .await
                .expect("subscribe");
            let mut waits = Vec::new();
            let mut done = Vec::new();
            let mut last = Instant::now();
            while taken.load(Ordering::SeqCst) < jobs {
                let Some(d) = next_within(&mut sub, Duration::from_millis(200)).await else {
                    assert!(
                        last.elapsed() < Duration::from_secs(20),
                        "{name}: no delivery for 20 s while jobs were left"
                    );
                    continue;
                };
                taken.fetch_add(1, Ordering::SeqCst);
                waits.push(last.elapsed());
                done.push(d.handoff_id().to_string());
                let next = Handoff::from_request(pb::HandoffRequest {
                    run_id: run_id.clone(),
                    source_agent: "worker".into(),
                    target_agent: "sink".into(),
                    consumes: d.id().to_string(),
                    payload: Some(handoff_client::encode(&note("done", 0)).expect("encode")),
                    ..Default::default()
                });
                other.handoff(next).await.expect("complete-and-handoff");
                last = Instant::now();
            }
            (done, waits)
        })
    };
    let on_a = instance(via_a.clone(), via_b.clone(), "on-a");
    let on_b = instance(via_b.clone(), via_a.clone(), "on-b");
    let (done_a, waits_a) = on_a.await.expect("instance on A");
    let (done_b, waits_b) = on_b.await.expect("instance on B");
    let mut all: Vec<String> = done_a.iter().chain(&done_b).cloned().collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), jobs as usize, "every job done once");
    assert_eq!(done_a.len() + done_b.len(), jobs as usize, "none twice");
    let slowest = waits_a
        .iter()
        .chain(&waits_b)
        .max()
        .copied()
        .unwrap_or_default();
    println!(
        "{jobs} deliveries to two max_in_flight = 1 instances on two replicas, each completed through the other replica: {} and {} taken, the longest wait for the next was {:.3} s (lease {} s)",
        done_a.len(),
        done_b.len(),
        slowest.as_secs_f64(),
        lease.as_secs()
    );
    assert!(
        slowest < Duration::from_secs(20),
        "a delivery waited for a lease: {waits_a:?} {waits_b:?}"
    );
    let worker = settled_inbox(nats.url(), "worker").await;
    assert_eq!(
        (worker.stored, worker.deliveries),
        (jobs as u64, jobs as u64)
    );
}

#[tokio::test]
async fn replicas_a_single_server_cannot_hold_stop_the_start_with_a_clear_error() {
    let nats = Nats::start().await;
    let mut config = handoff_tests::test_config(nats.url());
    config.replicas = 3;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let started = tokio::time::timeout(
        Duration::from_secs(30),
        handoffd::run(config, listener, std::future::pending()),
    )
    .await
    .expect("the start ends");
    let error = started.expect_err("refused").to_string();
    println!("{error}");
    assert!(error.contains("cannot hold replicas = 3"), "{error}");
}
