//! NATS going away under the broker: a restart of `nats-server` under load
//! is ridden out without a restart of the broker, calls during the outage
//! answer UNAVAILABLE within `nats_timeout`, health says NOT_SERVING while
//! it lasts; a broker starts from any server of its list; and two broker
//! replicas free each other's delivery slots at once.

use std::{
    collections::HashSet,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use handoff_client::{pb, AgentConfig, Handoff, RunConfig};
use handoff_tests::{
    count, inbox, load, next_within, note, settled_inbox, timeline_when, Broker, Nats,
};
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
    let before = load_progress(&load);
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
        "{} handoffs and {} fan-ins accepted; {} attempts failed, the slowest answered in {:.2} s; longest window without a successful call: {:.2} s",
        produced.handoffs.len(),
        produced.barriers.len(),
        failures.len(),
        slowest.as_secs_f64(),
        produced.longest_gap().as_secs_f64()
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

    check_nothing_lost(&client, nats.url(), &produced, &consumed).await;
}

/// The plain handoffs and fan-ins accepted so far.
fn load_progress(load: &load::Load) -> usize {
    load.progress().0
}

/// Every accepted handoff was stored once and delivered (acked: the inbox
/// has nothing left), and every fan-in released exactly once.
async fn check_nothing_lost(
    client: &handoff_client::Client,
    nats_url: &str,
    produced: &load::Produced,
    consumed: &load::Consumed,
) {
    let accepted: HashSet<&String> = produced.handoffs.iter().collect();
    assert_eq!(accepted.len(), produced.handoffs.len());
    let now = inbox(nats_url, "worker").await;
    for id in &accepted {
        assert!(
            consumed.deliveries.contains_key(*id),
            "accepted handoff {id} never delivered; the inbox: {now:?}"
        );
    }
    let worker = settled_inbox(nats_url, "worker").await;
    assert_eq!(
        worker.stored as usize,
        accepted.len(),
        "each accepted handoff stored once: {worker:?}"
    );
    let aggregator = settled_inbox(nats_url, "aggregator").await;
    assert_eq!(
        aggregator.stored as usize,
        produced.barriers.len(),
        "one release stored per fan-in: {aggregator:?}"
    );
    for barrier in &produced.barriers {
        assert!(
            consumed.releases.contains_key(barrier),
            "the release of {barrier} was delivered"
        );
    }
    let runs: HashSet<String> = produced
        .barriers
        .iter()
        .filter_map(|b| b.strip_prefix('b')?.split('x').next())
        .map(|p| format!("load-{p}"))
        .collect();
    for run in runs {
        let barriers: Vec<&String> = produced
            .barriers
            .iter()
            .filter(|b| format!("load-{}", &b[1..b.find('x').unwrap_or(1)]) == run)
            .collect();
        let released = |t: &[pb::Event], b: &str| {
            count(t, &[pb::EventKind::BarrierReleased], |e| e.barrier_id == b)
        };
        let timeline = timeline_when(client, &run, |t| {
            barriers.iter().all(|b| released(t, b) > 0)
        })
        .await;
        for b in &barriers {
            assert_eq!(released(&timeline, b), 1, "{b} released exactly once");
        }
    }
    let repeated: Vec<(&String, &u32)> = consumed
        .deliveries
        .iter()
        .filter(|(_, n)| **n > 1)
        .collect();
    println!(
        "lost 0 of {}; {} handoffs delivered again after an ack that did not reach the broker ({} failed acks)",
        accepted.len(),
        repeated.len(),
        consumed.failed_acks
    );
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
    // would stall the instance for 60 s.
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
    let jobs = 8;
    for i in 0..jobs {
        via_a
            .handoff(Handoff::to(&run.id, "worker", &note("job", i)).expect("encode"))
            .await
            .expect("accepted");
    }
    // One instance, one delivery at a time, on replica A. Each delivery is
    // completed by a handoff to `sink`, alternately through B and A.
    let mut sub = via_a
        .subscribe("worker", "one", 1)
        .await
        .expect("subscribe");
    let mut waits = Vec::new();
    let mut done = HashSet::new();
    let mut last = Instant::now();
    for i in 0..jobs {
        let d = next_within(&mut sub, Duration::from_secs(20))
            .await
            .expect("the next delivery comes before the lease of the last one ends");
        waits.push(last.elapsed());
        assert!(done.insert(d.handoff_id().to_string()), "delivered again");
        let client = if i % 2 == 0 { &via_b } else { &via_a };
        let next = Handoff::from_request(pb::HandoffRequest {
            run_id: run.id.clone(),
            source_agent: "worker".into(),
            target_agent: "sink".into(),
            consumes: d.id().to_string(),
            payload: Some(handoff_client::encode(&note("done", i)).expect("encode")),
            ..Default::default()
        });
        client.handoff(next).await.expect("complete-and-handoff");
        last = Instant::now();
    }
    let slowest = waits.iter().max().copied().unwrap_or_default();
    println!(
        "{jobs} deliveries to a max_in_flight = 1 instance, completed through either replica: the longest wait for the next was {:.3} s (lease {} s)",
        slowest.as_secs_f64(),
        lease.as_secs()
    );
    assert!(
        slowest < Duration::from_secs(20),
        "a delivery waited for a lease: {waits:?}"
    );
    let worker = settled_inbox(nats.url(), "worker").await;
    assert_eq!(
        (worker.stored, worker.deliveries),
        (jobs as u64, jobs as u64)
    );
}
