//! Barriers: exactly-once fan-in under concurrency, duplicates, late and
//! early branches, quorum, failures and two broker replicas.

use std::time::Duration;

use handoff_client::{pb, AgentConfig, Client, Handoff, RunConfig};
use handoff_tests::{next_within, note, stack, Broker, Nats, Note};

fn spec(run: &str, barrier: &str, count: u32) -> pb::BarrierSpec {
    pb::BarrierSpec {
        run_id: run.to_string(),
        barrier_id: barrier.to_string(),
        branch_count: count,
        mode: pb::BarrierMode::All as i32,
        target_agent: "aggregator".into(),
        ..Default::default()
    }
}

async fn open(client: &Client, spec: pb::BarrierSpec) -> pb::Barrier {
    client
        .raw()
        .open_barrier(pb::OpenBarrierRequest {
            barrier: Some(spec),
        })
        .await
        .expect("open barrier")
        .into_inner()
        .barrier
        .expect("barrier")
}

async fn get(client: &Client, run: &str, barrier: &str) -> pb::Barrier {
    client
        .raw()
        .get_barrier(pb::GetBarrierRequest {
            run_id: run.to_string(),
            barrier_id: barrier.to_string(),
        })
        .await
        .expect("get barrier")
        .into_inner()
        .barrier
        .expect("barrier")
}

/// A branch result for `key`, straight to the barrier.
fn branch(run: &str, barrier: &str, key: &str, n: u32) -> Handoff {
    Handoff::from_request(pb::HandoffRequest {
        run_id: run.to_string(),
        source_agent: "worker".into(),
        to_barrier: true,
        barrier_id: barrier.to_string(),
        branch_key: key.to_string(),
        payload: Some(handoff_client::encode(&note("result", n)).expect("encode")),
        idempotency_key: format!("{barrier}-{key}"),
        ..Default::default()
    })
}

async fn setup(client: &Client, run: &str) {
    for a in ["worker", "aggregator"] {
        client.register_agent(AgentConfig::new(a)).await.unwrap();
    }
    client
        .start_run(RunConfig::new("owner").id(run))
        .await
        .unwrap();
}

/// The one release delivered to the aggregator, acked; asserts no second.
async fn the_release(sub: &mut handoff_client::Subscription) -> pb::BarrierRelease {
    let d = next_within(sub, Duration::from_secs(10))
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

fn results(release: &pb::BarrierRelease) -> Vec<u32> {
    release
        .branches
        .iter()
        .filter_map(|b| b.payload.as_ref())
        .map(|p| handoff_client::decode::<Note>(p).expect("note").n)
        .collect()
}

#[tokio::test]
async fn a_hundred_concurrent_branches_release_once_with_all_in_key_order() {
    let (_nats, _broker, client) = stack(|_| {}).await;
    setup(&client, "r100").await;
    open(&client, spec("r100", "join", 100)).await;
    let mut tasks = Vec::new();
    for i in 0..100u32 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            client
                .handoff(branch("r100", "join", &i.to_string(), i))
                .await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let mut agg = client.subscribe("aggregator", "a", 5).await.unwrap();
    let release = the_release(&mut agg).await;
    assert_eq!(results(&release), (0..100).collect::<Vec<_>>());
    assert_eq!(release.confidence, 1.0);
    assert!(release.missing.is_empty() && !release.failure);
    let b = get(&client, "r100", "join").await;
    assert_eq!(b.state, pb::BarrierState::Released as i32);
    assert!(b.release_published);
}

#[tokio::test]
async fn duplicates_and_late_branches_never_release_twice() {
    let (_nats, _broker, client) = stack(|_| {}).await;
    setup(&client, "dup").await;
    let mut s = spec("dup", "join", 0);
    s.branch_keys = vec!["b".into(), "a".into(), "c".into()];
    s.mode = pb::BarrierMode::Quorum as i32;
    s.quorum = 2;
    open(&client, s).await;
    client.handoff(branch("dup", "join", "a", 1)).await.unwrap();
    // The same branch again: a duplicate, not a second arrival.
    let again = client.handoff(branch("dup", "join", "a", 1)).await.unwrap();
    assert!(again.duplicate);
    client.handoff(branch("dup", "join", "b", 2)).await.unwrap();
    // Quorum reached; "c" is late.
    client.handoff(branch("dup", "join", "c", 3)).await.unwrap();
    let mut agg = client.subscribe("aggregator", "a", 5).await.unwrap();
    let release = the_release(&mut agg).await;
    // Branch-key order is the spec's: b, a, c.
    assert_eq!(results(&release), [2, 1]);
    assert_eq!(release.missing, ["c"]);
    let b = get(&client, "dup", "join").await;
    assert_eq!(b.late, ["c"]);
    let timeline = client.get_run("dup").await.unwrap().timeline;
    let late = timeline
        .iter()
        .filter(|e| e.kind == pb::EventKind::BranchLate as i32)
        .count();
    assert_eq!(late, 1);
}

#[tokio::test]
async fn a_branch_before_its_barrier_is_held_and_counted() {
    let (_nats, _broker, client) = stack(|_| {}).await;
    setup(&client, "early").await;
    client
        .handoff(branch("early", "join", "0", 10))
        .await
        .unwrap();
    client
        .handoff(branch("early", "join", "1", 11))
        .await
        .unwrap();
    let opened = open(&client, spec("early", "join", 2)).await;
    assert_eq!(opened.state, pb::BarrierState::Released as i32);
    let mut agg = client.subscribe("aggregator", "a", 5).await.unwrap();
    let release = the_release(&mut agg).await;
    assert_eq!(results(&release), [10, 11]);
}

#[tokio::test]
async fn skipped_failed_and_chained_branches_are_listed_by_key() {
    let (_nats, _broker, client) = stack(|_| {}).await;
    setup(&client, "mixed").await;
    client
        .register_agent(AgentConfig::new("reviewer"))
        .await
        .unwrap();
    // Branch "0" goes worker -> reviewer -> barrier; "1" is skipped; "2"
    // is rejected by its worker.
    let fan = client
        .raw()
        .fan_out(pb::FanOutRequest {
            barrier: Some(spec("mixed", "join", 3)),
            branches: (0..3)
                .map(|i| pb::HandoffRequest {
                    target_agent: "worker".into(),
                    branch_key: i.to_string(),
                    payload: Some(handoff_client::encode(&note("task", i)).unwrap()),
                    ..Default::default()
                })
                .collect(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fan.branches.len(), 3);
    let mut workers = client.subscribe("worker", "w", 5).await.unwrap();
    let mut reviewer = client.subscribe("reviewer", "r", 5).await.unwrap();
    for _ in 0..3 {
        let d = next_within(&mut workers, Duration::from_secs(5))
            .await
            .unwrap();
        match d.envelope().branch_key.as_str() {
            "0" => {
                d.handoff(Handoff::to("", "reviewer", &note("draft", 0)).unwrap())
                    .await
                    .unwrap();
            }
            "1" => {
                let mut req = pb::HandoffRequest {
                    to_barrier: true,
                    branch_status: pb::BranchStatus::Skipped as i32,
                    payload: Some(handoff_client::encode(&note("skip", 1)).unwrap()),
                    warnings: vec!["nothing to do".into()],
                    ..Default::default()
                };
                req.run_id = "mixed".into();
                d.handoff(Handoff::from_request(req)).await.unwrap();
            }
            _ => d.reject("source unreadable").await.unwrap(),
        }
    }
    let r = next_within(&mut reviewer, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(r.envelope().branch_key, "0", "the branch key travels along");
    let req = pb::HandoffRequest {
        run_id: "mixed".into(),
        to_barrier: true,
        payload: Some(handoff_client::encode(&note("reviewed", 100)).unwrap()),
        ..Default::default()
    };
    r.handoff(Handoff::from_request(req)).await.unwrap();
    let mut agg = client.subscribe("aggregator", "a", 5).await.unwrap();
    let release = the_release(&mut agg).await;
    let statuses: Vec<i32> = release.branches.iter().map(|b| b.status).collect();
    assert_eq!(
        statuses,
        [
            pb::BranchStatus::Arrived as i32,
            pb::BranchStatus::Skipped as i32,
            pb::BranchStatus::Failed as i32
        ]
    );
    assert_eq!(release.skipped, ["1"]);
    assert_eq!(release.failed, ["2"]);
    assert!((release.confidence - 1.0 / 3.0).abs() < 1e-9);
    assert_eq!(results(&release)[0], 100);
    // A rejected branch fails the branch, not the run.
    let run = client.get_run("mixed").await.unwrap().run.unwrap();
    assert_eq!(run.status, pb::RunStatus::Running as i32);
}

#[tokio::test]
async fn two_replicas_release_each_barrier_once() {
    let nats = Nats::start().await;
    let one = Broker::start(nats.url(), |_| {}).await;
    let two = Broker::start(nats.url(), |_| {}).await;
    let (a, b) = (one.client().await, two.client().await);
    setup(&a, "pair").await;
    for j in 0..10 {
        open(&a, spec("pair", &format!("j{j}"), 20)).await;
    }
    let mut tasks = Vec::new();
    for j in 0..10 {
        for i in 0..20u32 {
            let c = if (i + j) % 2 == 0 {
                a.clone()
            } else {
                b.clone()
            };
            tasks.push(tokio::spawn(async move {
                c.handoff(branch("pair", &format!("j{j}"), &i.to_string(), i))
                    .await
            }));
        }
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let mut agg = a.subscribe("aggregator", "a", 20).await.unwrap();
    let mut barriers = Vec::new();
    while let Some(d) = next_within(&mut agg, Duration::from_secs(3)).await {
        let release: pb::BarrierRelease = d.payload().unwrap();
        assert_eq!(release.branches.len(), 20);
        barriers.push(release.barrier_id.clone());
        d.ack().await.unwrap();
    }
    barriers.sort();
    let expected: Vec<String> = {
        let mut v: Vec<String> = (0..10).map(|j| format!("j{j}")).collect();
        v.sort();
        v
    };
    assert_eq!(barriers, expected, "each barrier released exactly once");
}
