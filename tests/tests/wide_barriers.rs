//! Wide barriers: the cap on branches, 10,000 branches released once in
//! key order on two replicas, and a 2,000-branch fan-in surviving kill -9.

use std::{
    collections::BTreeSet,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use futures::StreamExt;
use handoff_client::{pb, AgentConfig, Client, Handoff, RunConfig};
use handoff_tests::{
    count, next_within, note, seed, settled_inbox, Broker, BrokerProcess, Nats, Note, XorShift,
};

const BIN: &str = env!("CARGO_BIN_EXE_handoffd-under-test");

fn spec(run: &str, barrier: &str, count: u32) -> pb::BarrierSpec {
    pb::BarrierSpec {
        run_id: run.to_string(),
        barrier_id: barrier.to_string(),
        branch_count: count,
        target_agent: "aggregator".into(),
        ..Default::default()
    }
}

async fn setup(client: &Client, run: &str) {
    for a in ["worker", "aggregator"] {
        client
            .register_agent(AgentConfig::new(a).lease(Duration::from_secs(2)))
            .await
            .unwrap();
    }
    client
        .start_run(RunConfig::new("owner").id(run))
        .await
        .unwrap();
}

fn results(release: &pb::BarrierRelease) -> Vec<u32> {
    release
        .branches
        .iter()
        .filter_map(|b| b.payload.as_ref())
        .map(|p| handoff_client::decode::<Note>(p).expect("note").n)
        .collect()
}

/// The one release the aggregator receives, acked; then none other.
async fn only_release(sub: &mut handoff_client::Subscription) -> pb::BarrierRelease {
    let d = next_within(sub, Duration::from_secs(60))
        .await
        .expect("the release is delivered");
    let release: pb::BarrierRelease = d.payload().expect("a BarrierRelease");
    d.ack().await.unwrap();
    assert!(
        next_within(sub, Duration::from_millis(700)).await.is_none(),
        "a second release"
    );
    release
}

#[tokio::test]
async fn a_barrier_over_the_cap_is_refused_naming_it() {
    let nats = Nats::start().await;
    let broker = Broker::start(nats.url(), |_| {}).await;
    let client = broker.client().await;
    setup(&client, "cap").await;

    let over = |n: u32| pb::OpenBarrierRequest {
        barrier: Some(spec("cap", "wide", n)),
    };
    let err: handoff_client::Error = client
        .raw()
        .open_barrier(over(10_001))
        .await
        .expect_err("over the cap")
        .into();
    assert_eq!(err.code(), Some(tonic::Code::InvalidArgument), "{err}");
    assert_eq!(err.reason(), Some("TOO_MANY_BRANCHES"), "{err}");
    assert_eq!(
        err.metadata().get("limit").map(String::as_str),
        Some("10000")
    );
    assert_eq!(
        err.metadata().get("count").map(String::as_str),
        Some("10001")
    );

    // FanOut checks the same cap before anything is handed off.
    let fan: handoff_client::Error = client
        .raw()
        .fan_out(pb::FanOutRequest {
            barrier: Some(spec("cap", "wide", 10_001)),
            branches: vec![pb::HandoffRequest {
                target_agent: "worker".into(),
                branch_key: "0".into(),
                payload: Some(handoff_client::encode(&note("task", 0)).unwrap()),
                ..Default::default()
            }],
        })
        .await
        .expect_err("over the cap")
        .into();
    assert_eq!(fan.reason(), Some("TOO_MANY_BRANCHES"), "{fan}");

    // 10,000 named keys are within the cap, but 128-character keys do not
    // fit in one NATS message together.
    let long: Vec<String> = (0..10_000).map(|i| format!("{i:0>128}")).collect();
    let named: handoff_client::Error = client
        .raw()
        .open_barrier(pb::OpenBarrierRequest {
            barrier: Some(pb::BarrierSpec {
                branch_count: 0,
                branch_keys: long,
                ..spec("cap", "named", 0)
            }),
        })
        .await
        .expect_err("keys too large")
        .into();
    assert_eq!(named.code(), Some(tonic::Code::InvalidArgument), "{named}");
    assert_eq!(named.reason(), Some("INVALID_BARRIER_SPEC"), "{named}");

    // Nothing was opened by the refusals.
    for id in ["wide", "named"] {
        let missing: handoff_client::Error = client
            .raw()
            .get_barrier(pb::GetBarrierRequest {
                run_id: "cap".into(),
                barrier_id: id.into(),
            })
            .await
            .expect_err("not opened")
            .into();
        assert_eq!(missing.reason(), Some("BARRIER_NOT_FOUND"));
    }

    // At the cap, with short named keys: opened.
    let keys: Vec<String> = (0..10_000).map(|i| format!("k{i}")).collect();
    let opened = client
        .raw()
        .open_barrier(pb::OpenBarrierRequest {
            barrier: Some(pb::BarrierSpec {
                branch_keys: keys.clone(),
                ..spec("cap", "at_cap", 0)
            }),
        })
        .await
        .expect("10,000 short keys")
        .into_inner();
    assert!(opened.created);
    let read = client
        .raw()
        .get_barrier(pb::GetBarrierRequest {
            run_id: "cap".into(),
            barrier_id: "at_cap".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .barrier
        .unwrap();
    assert_eq!(read.spec.unwrap().branch_keys, keys, "the whole spec");
    assert_eq!(read.expected, 10_000);
}

/// 10,000 branch results sent to two replicas at once: the barrier is
/// released once, every result in key order, and each key counted once.
#[tokio::test]
async fn ten_thousand_branches_release_once_in_key_order_on_two_replicas() {
    const N: u32 = 10_000;
    let nats = Nats::start().await;
    let one = Broker::start(nats.url(), |_| {}).await;
    let two = Broker::start(nats.url(), |_| {}).await;
    let (a, b) = (one.client().await, two.client().await);
    setup(&a, "wide").await;
    a.raw()
        .open_barrier(pb::OpenBarrierRequest {
            barrier: Some(spec("wide", "join", N)),
        })
        .await
        .unwrap();
    let clients = [a.clone(), b.clone()];
    let clients = &clients;
    let answered: Vec<bool> = futures::stream::iter(0..N)
        .map(|i| {
            let c = clients[(i % 2) as usize].clone();
            async move {
                let h = Handoff::from_request(pb::HandoffRequest {
                    run_id: "wide".into(),
                    source_agent: "worker".into(),
                    to_barrier: true,
                    barrier_id: "join".into(),
                    branch_key: i.to_string(),
                    payload: Some(handoff_client::encode(&note("r", i)).unwrap()),
                    idempotency_key: format!("join-{i}"),
                    ..Default::default()
                });
                let first = c.handoff(h.clone()).await.expect("branch accepted");
                // The same branch again, on the other replica: a duplicate.
                if i % 1000 == 0 {
                    let other = clients[((i + 1) % 2) as usize].clone();
                    let again = other.handoff(h).await.expect("repeat answered");
                    assert!(again.duplicate, "branch {i} counted twice");
                    assert_eq!(again.handoff_id, first.handoff_id);
                }
                !first.duplicate
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    assert!(answered.iter().all(|fresh| *fresh));
    let mut agg = a.subscribe("aggregator", "agg", 4).await.unwrap();
    let release = only_release(&mut agg).await;
    assert_eq!(results(&release), (0..N).collect::<Vec<_>>());
    assert_eq!(release.branches.len(), N as usize);
    assert!(release.missing.is_empty() && !release.failure);
    // The evidence: one release stored and delivered once; one
    // `barrier_released` and one `branch_arrived` per key in the timeline.
    let inbox = settled_inbox(nats.url(), "aggregator").await;
    assert_eq!((inbox.stored, inbox.deliveries), (1, 1), "{inbox:?}");
    let timeline = a.get_run("wide").await.unwrap().timeline;
    assert_eq!(
        count(&timeline, &[pb::EventKind::BarrierReleased], |_| true),
        1
    );
    let arrived: Vec<&str> = timeline
        .iter()
        .filter(|e| e.kind == pb::EventKind::BranchArrived as i32)
        .map(|e| e.branch_key.as_str())
        .collect();
    let distinct: BTreeSet<&str> = arrived.iter().copied().collect();
    assert_eq!((arrived.len(), distinct.len()), (N as usize, N as usize));
    let barrier = b
        .raw()
        .get_barrier(pb::GetBarrierRequest {
            run_id: "wide".into(),
            barrier_id: "join".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .barrier
        .unwrap();
    assert_eq!(barrier.arrived, N);
    assert_eq!(barrier.branches.len(), N as usize);
    assert!(barrier.release_published && barrier.late.is_empty());
}

/// A 2,000-branch fan-in worked by two worker instances while the broker
/// is killed with SIGKILL twice: the barrier is released exactly once,
/// with every branch's result in key order.
#[tokio::test]
async fn kill_9_during_a_2000_branch_fan_in_releases_once() {
    const N: u32 = 2_000;
    let mut rng = XorShift::new(seed(
        module_path!(),
        "kill_9_during_a_2000_branch_fan_in_releases_once",
    ));
    let nats = Nats::start().await;
    let mut broker = BrokerProcess::spawn(BIN, nats.url(), &[]).await;
    let client = broker.client().await;
    let (restarted, current) = tokio::sync::watch::channel(client.clone());
    setup(&client, "crash").await;
    let stop = Arc::new(AtomicBool::new(false));

    // The planner fans out, retried until a broker answers (a retry opens
    // the same barrier and repeats the same branches).
    let planner = {
        let current = current.clone();
        tokio::spawn(async move {
            let req = pb::FanOutRequest {
                barrier: Some(spec("crash", "join", N)),
                branches: (0..N)
                    .map(|k| pb::HandoffRequest {
                        target_agent: "worker".into(),
                        branch_key: k.to_string(),
                        payload: Some(handoff_client::encode(&note("task", k)).unwrap()),
                        ..Default::default()
                    })
                    .collect(),
            };
            loop {
                let client = current.borrow().clone();
                if client.raw().fan_out(req.clone()).await.is_ok() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    // Two worker instances, 8 in flight each, complete each task into the
    // barrier; a handoff lost in a crash is redone when the task comes back.
    let mut workers = Vec::new();
    for w in 0..2 {
        let (current, stop) = (current.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let client = current.borrow().clone();
                let Ok(mut sub) = client.subscribe("worker", &format!("w{w}"), 8).await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let mut inflight = futures::stream::FuturesUnordered::new();
                loop {
                    tokio::select! {
                        next = tokio::time::timeout(Duration::from_millis(500), sub.next_delivery()), if inflight.len() < 8 => {
                            let Ok(Some(Ok(d))) = next else { break };
                            inflight.push(async move {
                                let task: Note = d.payload().unwrap();
                                let req = pb::HandoffRequest {
                                    run_id: "crash".into(),
                                    to_barrier: true,
                                    payload: Some(handoff_client::encode(&note("done", task.n)).unwrap()),
                                    ..Default::default()
                                };
                                let _ = d.handoff(Handoff::from_request(req)).await;
                            });
                        }
                        Some(()) = inflight.next(), if !inflight.is_empty() => {}
                    }
                }
                while inflight.next().await.is_some() {}
            }
        }));
    }
    // The aggregator records every release delivered (handoff id and inbox
    // sequence: a redelivery repeats both, a second release would not).
    let seen: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let release_seen: Arc<Mutex<Option<pb::BarrierRelease>>> = Arc::default();
    let aggregator = {
        let (current, stop, seen, release_seen) = (
            current.clone(),
            stop.clone(),
            seen.clone(),
            release_seen.clone(),
        );
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let client = current.borrow().clone();
                let Ok(mut sub) = client.subscribe("aggregator", "agg", 4).await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                while let Ok(Some(Ok(d))) =
                    tokio::time::timeout(Duration::from_millis(500), sub.next_delivery()).await
                {
                    let release: pb::BarrierRelease = d.payload().unwrap();
                    seen.lock()
                        .unwrap()
                        .insert(format!("{}@{}", d.handoff_id(), d.raw().sequence));
                    if d.ack().await.is_ok() {
                        *release_seen.lock().unwrap() = Some(release);
                    }
                }
            }
        })
    };
    // Two kill -9s while the branches come in.
    for crash in 0..2 {
        let wait = 300 + rng.below(900);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        println!("kill -9 #{crash} after {wait} ms");
        broker.kill9().await;
        broker = BrokerProcess::spawn(BIN, nats.url(), &[]).await;
        restarted.send_replace(broker.client().await);
    }
    let client = broker.client().await;
    planner.await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while release_seen.lock().unwrap().is_none() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let inbox = settled_inbox(nats.url(), "aggregator").await;
    stop.store(true, Ordering::Relaxed);
    aggregator.await.unwrap();
    for w in workers {
        w.await.unwrap();
    }
    let release = release_seen
        .lock()
        .unwrap()
        .clone()
        .expect("the barrier released");
    assert_eq!(results(&release), (0..N).collect::<Vec<_>>());
    assert!(release.missing.is_empty() && !release.failure);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "one release, got {seen:?}");
    // The evidence: one release in the aggregator's inbox, one
    // `barrier_released` in the timeline.
    assert_eq!(inbox.stored, 1, "{inbox:?}");
    let timeline = client.get_run("crash").await.unwrap().timeline;
    assert_eq!(
        count(&timeline, &[pb::EventKind::BarrierReleased], |_| true),
        1
    );
    assert_eq!(broker.terminate().await, Some(0));
}
