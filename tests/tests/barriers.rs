//! Barriers: exactly-once fan-in under concurrency, duplicates, late and
//! early branches, quorum, failures and two broker replicas.

use std::time::Duration;

use handoff_client::{pb, AgentConfig, Client, Handoff, RunConfig};
use handoff_tests::{
    count, deliveries_of, kinds, next_within, note, seed, settled_inbox, stack, timeline_when,
    Broker, BrokerProcess, Nats, Note, XorShift,
};

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

/// The one release delivered to the aggregator, acked; asserts no second:
/// none arrives, the run's timeline records one release of the barrier and
/// one delivery of it, and the aggregator's inbox has nothing left to
/// deliver.
async fn the_release(
    nats: &Nats,
    client: &Client,
    sub: &mut handoff_client::Subscription,
) -> pb::BarrierRelease {
    let d = next_within(sub, Duration::from_secs(10))
        .await
        .expect("the release is delivered");
    let release: pb::BarrierRelease = d.payload().expect("a BarrierRelease");
    d.ack().await.unwrap();
    assert!(
        next_within(sub, Duration::from_millis(700)).await.is_none(),
        "a second release"
    );
    let timeline =
        timeline_when(client, d.run_id(), |t| deliveries_of(t, d.handoff_id()) > 0).await;
    assert_eq!(
        count(&timeline, &[pb::EventKind::BarrierReleased], |e| {
            e.barrier_id == release.barrier_id
        }),
        1,
        "one release recorded"
    );
    assert_eq!(
        deliveries_of(&timeline, d.handoff_id()),
        1,
        "delivered once"
    );
    settled_inbox(nats.url(), "aggregator").await;
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
    let (nats, _broker, client) = stack(|_| {}).await;
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
    let release = the_release(&nats, &client, &mut agg).await;
    assert_eq!(results(&release), (0..100).collect::<Vec<_>>());
    assert_eq!(release.confidence, 1.0);
    assert!(release.missing.is_empty() && !release.failure);
    let b = get(&client, "r100", "join").await;
    assert_eq!(b.state, pb::BarrierState::Released as i32);
    assert!(b.release_published);
    // The timeline: opened once, each branch arrived once, released once.
    let mut watch = client
        .watch(
            handoff_client::WatchFilter::all()
                .run("r100")
                .from_sequence(1),
        )
        .await
        .unwrap();
    let mut arrived = std::collections::BTreeSet::new();
    let mut counts = [0usize; 3];
    while counts[1] < 100 || counts[2] < 1 {
        let e = tokio::time::timeout(
            Duration::from_secs(10),
            futures::StreamExt::next(&mut watch),
        )
        .await
        .expect("the barrier's events")
        .expect("the watch goes on")
        .unwrap();
        match pb::EventKind::try_from(e.kind) {
            Ok(pb::EventKind::BarrierOpened) => counts[0] += 1,
            Ok(pb::EventKind::BranchArrived) => {
                counts[1] += 1;
                arrived.insert(e.branch_key.clone());
            }
            Ok(pb::EventKind::BarrierReleased) => counts[2] += 1,
            _ => {}
        }
    }
    assert_eq!(counts, [1, 100, 1]);
    assert_eq!(arrived.len(), 100);
}

#[tokio::test]
async fn duplicates_and_late_branches_never_release_twice() {
    let (nats, _broker, client) = stack(|_| {}).await;
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
    let release = the_release(&nats, &client, &mut agg).await;
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
async fn no_branch_result_is_dropped_silently() {
    let (nats, _broker, client) = stack(|_| {}).await;
    setup(&client, "silent").await;
    open(&client, spec("silent", "join", 2)).await;
    // A key the barrier does not have: refused, nothing stored.
    let typo = client.handoff(branch("silent", "join", "2", 9)).await;
    let err = typo.expect_err("unknown key");
    assert_eq!(err.code(), Some(tonic::Code::InvalidArgument));
    assert_eq!(err.reason(), Some("UNKNOWN_BRANCH_KEY"));
    assert_eq!(err.field_violations()[0].field, "branch_key");
    let first = client
        .handoff(branch("silent", "join", "0", 1))
        .await
        .unwrap();
    // A second, different result for the key that arrived: answered as a
    // duplicate of the first, with its id; the release carries the first.
    let mut other = branch("silent", "join", "0", 7).request().clone();
    other.idempotency_key = "another-attempt".into();
    let second = client.handoff(Handoff::from_request(other)).await.unwrap();
    assert!(second.duplicate);
    assert_eq!(second.handoff_id, first.handoff_id);
    client
        .handoff(branch("silent", "join", "1", 2))
        .await
        .unwrap();
    let mut agg = client.subscribe("aggregator", "a", 5).await.unwrap();
    let release = the_release(&nats, &client, &mut agg).await;
    assert_eq!(
        results(&release),
        [1, 2],
        "nothing of the typo or the second result"
    );
    // Evidence in the stream: two branch results stored, not four.
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let mut stream = js.get_stream("HANDOFF_BRANCHES").await.unwrap();
    let stored = stream.info().await.unwrap().state.messages;
    assert_eq!(stored, 2);
    let b = get(&client, "silent", "join").await;
    assert!(b.late.is_empty());
}

#[tokio::test]
async fn a_branch_before_its_barrier_is_held_and_counted() {
    let (nats, _broker, client) = stack(|_| {}).await;
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
    let release = the_release(&nats, &client, &mut agg).await;
    assert_eq!(results(&release), [10, 11]);
}

#[tokio::test]
async fn skipped_failed_and_chained_branches_are_listed_by_key() {
    let (nats, _broker, client) = stack(|_| {}).await;
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
    let release = the_release(&nats, &client, &mut agg).await;
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
    // The evidence: ten releases stored and delivered once each, none left
    // to deliver, and one release of each barrier in the run's timeline.
    let inbox = settled_inbox(nats.url(), "aggregator").await;
    assert_eq!((inbox.stored, inbox.deliveries), (10, 10), "{inbox:?}");
    let timeline = a.get_run("pair").await.unwrap().timeline;
    for j in &expected {
        assert_eq!(barrier_events(&timeline, j).0, 1, "barrier {j}");
    }
}

/// The release of `barrier` from a timeline, as (released, timed out) counts.
fn barrier_events(timeline: &[pb::Event], barrier: &str) -> (usize, usize) {
    let count = |kind: pb::EventKind| {
        timeline
            .iter()
            .filter(|e| e.kind == kind as i32 && e.barrier_id == barrier)
            .count()
    };
    (
        count(pb::EventKind::BarrierReleased),
        count(pb::EventKind::BarrierTimedOut),
    )
}

#[tokio::test]
async fn quorum_releases_at_the_kth_arrival_and_the_rest_are_late() {
    let (nats, _broker, client) = stack(|_| {}).await;
    setup(&client, "q").await;
    let mut s = spec("q", "join", 5);
    s.mode = pb::BarrierMode::Quorum as i32;
    s.quorum = 3;
    open(&client, s).await;
    for key in ["4", "0"] {
        client.handoff(branch("q", "join", key, 1)).await.unwrap();
    }
    let b = get(&client, "q", "join").await;
    assert_eq!(b.state, pb::BarrierState::Open as i32, "2 of quorum 3");
    client.handoff(branch("q", "join", "2", 1)).await.unwrap();
    let b = get(&client, "q", "join").await;
    assert_eq!(
        b.state,
        pb::BarrierState::Released as i32,
        "the 3rd arrival"
    );
    for key in ["1", "3"] {
        client.handoff(branch("q", "join", key, 1)).await.unwrap();
    }
    let mut agg = client.subscribe("aggregator", "a", 5).await.unwrap();
    let release = the_release(&nats, &client, &mut agg).await;
    let arrived: Vec<&str> = release
        .branches
        .iter()
        .filter(|b| b.status == pb::BranchStatus::Arrived as i32)
        .map(|b| b.key.as_str())
        .collect();
    assert_eq!(arrived, ["0", "2", "4"]);
    assert_eq!(release.missing, ["1", "3"]);
    assert!((release.confidence - 0.6).abs() < 1e-9);
    assert!(release
        .warnings
        .contains(&"released at quorum 3 of 5".to_string()));
    let b = get(&client, "q", "join").await;
    assert_eq!(b.late, ["1", "3"]);
    let timeline = client.get_run("q").await.unwrap().timeline;
    let late: Vec<&str> = timeline
        .iter()
        .filter(|e| e.kind == pb::EventKind::BranchLate as i32)
        .map(|e| e.branch_key.as_str())
        .collect();
    assert_eq!(late.len(), 2);
    assert!(late.contains(&"1") && late.contains(&"3"));
    assert_eq!(barrier_events(&timeline, "join"), (1, 0));
}

#[tokio::test]
async fn fail_fast_releases_a_failure_at_the_first_failed_branch_and_tells_the_owner() {
    let (nats, _broker, client) = stack(|_| {}).await;
    setup(&client, "ff").await;
    let mut owner = client
        .watch(handoff_client::WatchFilter::all().owner("owner"))
        .await
        .unwrap();
    let mut s = spec("ff", "join", 3);
    s.fail_fast = true;
    open(&client, s).await;
    client.handoff(branch("ff", "join", "0", 0)).await.unwrap();
    let mut failed = branch("ff", "join", "1", 1).request().clone();
    failed.branch_status = pb::BranchStatus::Failed as i32;
    failed.warnings = vec!["source unreadable".into()];
    client.handoff(Handoff::from_request(failed)).await.unwrap();
    let b = get(&client, "ff", "join").await;
    assert_eq!(b.state, pb::BarrierState::Failed as i32, "released at once");
    let mut agg = client.subscribe("aggregator", "a", 5).await.unwrap();
    let release = the_release(&nats, &client, &mut agg).await;
    assert!(release.failure && !release.timed_out);
    assert_eq!(release.failed, ["1"]);
    assert_eq!(release.missing, ["2"]);
    // The failed branch's own report travels with it.
    assert_eq!(results(&release), [0, 1]);
    assert!(release
        .warnings
        .contains(&"branch 1 failed: source unreadable".to_string()));
    // The owner's watch sees the failed release, naming the failure.
    let seen = handoff_tests::events_until(&mut owner, Duration::from_secs(5), |e| {
        e.kind == pb::EventKind::BarrierReleased as i32
    })
    .await;
    let released = seen.last().unwrap();
    assert_eq!(released.owner, "owner");
    assert!(
        released
            .reason
            .starts_with("failure: branch 1 failed: source unreadable"),
        "{}",
        released.reason
    );
    // The last branch comes late; the run itself is the owner's to end.
    client.handoff(branch("ff", "join", "2", 2)).await.unwrap();
    assert_eq!(get(&client, "ff", "join").await.late, ["2"]);
    let run = client.get_run("ff").await.unwrap().run.unwrap();
    assert_eq!(run.status, pb::RunStatus::Running as i32);
}

#[tokio::test]
async fn barriers_do_not_wait_on_each_other() {
    let (nats, _broker, client) = stack(|_| {}).await;
    setup(&client, "ind").await;
    // A slow join: one of its two branches is still being worked on.
    open(&client, spec("ind", "slow", 2)).await;
    client.handoff(branch("ind", "slow", "0", 0)).await.unwrap();
    let mut agg = client.subscribe("aggregator", "a", 20).await.unwrap();
    // Ten other joins open after it and complete, each released while the
    // slow one waits.
    for j in 0..10 {
        let id = format!("fast{j}");
        open(&client, spec("ind", &id, 2)).await;
        for key in ["1", "0"] {
            client.handoff(branch("ind", &id, key, j)).await.unwrap();
        }
        let d = next_within(&mut agg, Duration::from_secs(5))
            .await
            .expect("a fast join is released while the slow one waits");
        let release: pb::BarrierRelease = d.payload().unwrap();
        assert_eq!(release.barrier_id, id);
        assert_eq!(results(&release), [j, j]);
        d.ack().await.unwrap();
    }
    assert_eq!(
        get(&client, "ind", "slow").await.state,
        pb::BarrierState::Open as i32
    );
    client.handoff(branch("ind", "slow", "1", 1)).await.unwrap();
    let release = the_release(&nats, &client, &mut agg).await;
    assert_eq!(release.barrier_id, "slow");
    assert_eq!(results(&release), [0, 1]);
}

const NOTE_PROTO: &str = "syntax = \"proto3\";\npackage handoff.test;\nmessage Note { string text = 1; uint32 n = 2; }\n";

#[tokio::test]
async fn branches_meet_the_aggregator_contract_and_the_release_fits_one_message() {
    // The branch budget is the largest payload (a release over one NATS
    // message goes by reference): 1 MiB here, one NATS message.
    let (nats, _broker, client) = stack(|c| c.max_payload_size = 1 << 20).await;
    client
        .raw()
        .register_contract(pb::RegisterContractRequest {
            message_type: "handoff.test.Note".into(),
            version: 1,
            rules: Some(pb::ContractRules {
                required_fields: vec!["text".into()],
                ..Default::default()
            }),
            file_descriptor_set: handoff_tests::compile_proto(&[("note.proto", NOTE_PROTO)]),
            ..Default::default()
        })
        .await
        .unwrap();
    client
        .register_agent(AgentConfig::new("worker").emits_type("handoff.test.Note"))
        .await
        .unwrap();
    client
        .register_agent(AgentConfig::new("aggregator").accepts_type("handoff.test.Note"))
        .await
        .unwrap();
    client
        .start_run(RunConfig::new("owner").id("big"))
        .await
        .unwrap();
    open(&client, spec("big", "join", 6)).await;
    // A branch result without the aggregator's required field is refused
    // at the door, and nothing is recorded for its key.
    let err = client
        .handoff(with_payload(branch("big", "join", "0", 0), &note("", 0)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::FailedPrecondition), "{err}");
    assert!(err.message().contains("text"), "{err}");
    assert!(get(&client, "big", "join").await.branches.is_empty());
    // Four results of 250,000 bytes fit in one release; a fifth does not.
    let text = "x".repeat(250_000);
    for key in 0..5u32 {
        let r = client
            .handoff(with_payload(
                branch("big", "join", &key.to_string(), key),
                &note(&text, key),
            ))
            .await;
        if key < 4 {
            r.unwrap();
        } else {
            let err = r.unwrap_err();
            assert_eq!(err.code(), Some(tonic::Code::FailedPrecondition), "{err}");
            assert!(err.message().contains("hand off a smaller result"), "{err}");
        }
    }
    // The fifth is reported skipped instead, the sixth is small: released.
    let mut skip = branch("big", "join", "4", 4).request().clone();
    skip.branch_status = pb::BranchStatus::Skipped as i32;
    skip.idempotency_key = "skip-4".into();
    client.handoff(Handoff::from_request(skip)).await.unwrap();
    client.handoff(branch("big", "join", "5", 5)).await.unwrap();
    // The entry keeps no payloads; the release carries every one.
    let b = get(&client, "big", "join").await;
    assert_eq!(b.state, pb::BarrierState::Released as i32);
    assert!(b.branches.iter().all(|r| r.payload.is_none()));
    let mut agg = client.subscribe("aggregator", "a", 5).await.unwrap();
    let release = the_release(&nats, &client, &mut agg).await;
    assert_eq!(results(&release), [0, 1, 2, 3, 4, 5]);
    let texts: Vec<usize> = release
        .branches
        .iter()
        .filter_map(|b| b.payload.as_ref())
        .map(|p| handoff_client::decode::<Note>(p).unwrap().text.len())
        .collect();
    assert_eq!(texts, [250_000, 250_000, 250_000, 250_000, 6, 6]);
    assert_eq!(release.skipped, ["4"]);
}

fn with_payload(h: Handoff, payload: &Note) -> Handoff {
    let mut req = h.request().clone();
    req.payload = Some(handoff_client::encode(payload).unwrap());
    Handoff::from_request(req)
}

const BIN: &str = env!("CARGO_BIN_EXE_handoffd-under-test");

#[tokio::test]
async fn timeouts_are_durable_and_fire_once_on_whichever_replica_is_up() {
    let nats = Nats::start().await;
    let a = BrokerProcess::spawn(BIN, nats.url(), &[]).await;
    let b = BrokerProcess::spawn(BIN, nats.url(), &[]).await;
    let ca = a.client().await;
    setup(&ca, "tmo").await;
    let timeout = Duration::from_secs(2);
    let mut partial = spec("tmo", "partial", 3);
    partial.timeout = Some(timeout.try_into().unwrap());
    partial.on_timeout = pb::OnTimeout::ReleasePartial as i32;
    let mut fail = spec("tmo", "fail", 2);
    fail.timeout = Some(timeout.try_into().unwrap());
    fail.on_timeout = pb::OnTimeout::Fail as i32;
    let opened = [open(&ca, partial).await, open(&ca, fail).await];
    for id in ["partial", "fail"] {
        ca.handoff(branch("tmo", id, "0", 7)).await.unwrap();
    }
    // The broker that opened both barriers dies; the other fires them.
    a.kill9().await;
    let cb = b.client().await;
    let mut agg = cb.subscribe("aggregator", "a", 5).await.unwrap();
    let mut releases = std::collections::BTreeMap::new();
    for _ in 0..2 {
        let d = next_within(&mut agg, Duration::from_secs(15))
            .await
            .expect("the timeout fires on the surviving replica");
        let release: pb::BarrierRelease = d.payload().unwrap();
        d.ack().await.unwrap();
        releases.insert(release.barrier_id.clone(), release);
    }
    let p = &releases["partial"];
    assert!(p.timed_out && !p.failure);
    assert_eq!(results(p), [7]);
    assert_eq!(p.missing, ["1", "2"]);
    assert!((p.confidence - 1.0 / 3.0).abs() < 1e-9);
    assert!(p
        .warnings
        .contains(&"branch 2 missing at timeout".to_string()));
    let f = &releases["fail"];
    assert!(f.timed_out && f.failure);
    assert_eq!(f.missing, ["1"]);
    for (id, opened) in ["partial", "fail"].iter().zip(&opened) {
        let now = get(&cb, "tmo", id).await;
        let (from, to) = (
            std::time::SystemTime::try_from(opened.opened_at.unwrap()).unwrap(),
            std::time::SystemTime::try_from(now.released_at.unwrap()).unwrap(),
        );
        assert!(
            to.duration_since(from).unwrap_or_default() >= timeout,
            "{id} released before its timeout"
        );
    }
    // The first broker comes back: nothing fires a second time. A second
    // firing would store a second release in the aggregator's inbox and
    // record a second release in the run's timeline.
    let again = BrokerProcess::spawn(BIN, nats.url(), &[]).await;
    assert!(next_within(&mut agg, Duration::from_secs(3))
        .await
        .is_none());
    let timeline = cb.get_run("tmo").await.unwrap().timeline;
    assert_eq!(barrier_events(&timeline, "partial"), (1, 1));
    assert_eq!(barrier_events(&timeline, "fail"), (1, 1));
    let inbox = settled_inbox(nats.url(), "aggregator").await;
    assert_eq!(inbox.stored, 2, "{inbox:?}");
    assert_eq!(again.terminate().await, Some(0));
    assert_eq!(b.terminate().await, Some(0));
}

#[tokio::test]
async fn kill_9_during_50_fan_ins_releases_every_barrier_once() {
    use std::{
        collections::{BTreeMap, BTreeSet},
        sync::{Arc, Mutex},
    };
    const FAN_INS: usize = 50;
    const BRANCHES: u32 = 4;
    let mut rng = XorShift::new(seed(
        module_path!(),
        "kill_9_during_50_fan_ins_releases_every_barrier_once",
    ));
    let nats = Nats::start().await;
    let mut broker = BrokerProcess::spawn(BIN, nats.url(), &[]).await;
    let client = broker.client().await;
    // Each restarted broker binds a new port: every task takes its client
    // from here, and the latest one is the restarted broker's.
    let (restarted, current) = tokio::sync::watch::channel(client.clone());
    for a in ["worker", "aggregator"] {
        client
            .register_agent(AgentConfig::new(a).lease(Duration::from_secs(1)))
            .await
            .unwrap();
    }
    client
        .start_run(RunConfig::new("owner").id("crash"))
        .await
        .unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = {
        let stop = stop.clone();
        move || stop.load(std::sync::atomic::Ordering::Relaxed)
    };

    // The planner side: 50 fan-ins, each retried until the broker answers
    // (a retry re-opens the same barrier and repeats the same branches).
    let planner = {
        let current = current.clone();
        tokio::spawn(async move {
            use futures::StreamExt;
            futures::stream::iter(0..FAN_INS)
                .for_each_concurrent(8, |i| {
                    let current = current.clone();
                    async move {
                        let req = pb::FanOutRequest {
                            barrier: Some(spec("crash", &format!("f{i}"), BRANCHES)),
                            branches: (0..BRANCHES)
                                .map(|k| pb::HandoffRequest {
                                    target_agent: "worker".into(),
                                    branch_key: k.to_string(),
                                    payload: Some(
                                        handoff_client::encode(&note("task", k)).unwrap(),
                                    ),
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
                    }
                })
                .await;
        })
    };
    // Two worker instances answer each branch to its barrier; a handoff
    // lost in a crash is redone when the delivery comes back.
    let mut workers = Vec::new();
    for w in 0..2 {
        let current = current.clone();
        let stopped = stopped.clone();
        workers.push(tokio::spawn(async move {
            while !stopped() {
                let client = current.borrow().clone();
                let Ok(mut sub) = client.subscribe("worker", &format!("w{w}"), 8).await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                while let Ok(Some(Ok(d))) =
                    tokio::time::timeout(Duration::from_millis(500), sub.next_delivery()).await
                {
                    let task: Note = d.payload().unwrap();
                    let req = pb::HandoffRequest {
                        run_id: "crash".into(),
                        to_barrier: true,
                        payload: Some(handoff_client::encode(&note("done", task.n)).unwrap()),
                        ..Default::default()
                    };
                    let _ = d.handoff(Handoff::from_request(req)).await;
                }
            }
        }));
    }
    // The aggregator records every release delivered (its handoff id and
    // inbox sequence: a redelivery repeats both, a second release would
    // not), and the ones whose ack the broker confirmed. An ack whose
    // answer was lost with a killed broker may or may not have been
    // applied: it is repeated by delivery id through the next
    // subscription until one is confirmed, as a user would.
    let seen: Arc<Mutex<BTreeMap<String, BTreeSet<String>>>> = Arc::default();
    let acked: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
    let aggregator = {
        let (current, stopped, seen, acked) = (
            current.clone(),
            stopped.clone(),
            seen.clone(),
            acked.clone(),
        );
        tokio::spawn(async move {
            let mut unconfirmed: Vec<(String, String)> = Vec::new();
            while !stopped() {
                let client = current.borrow().clone();
                let Ok(mut sub) = client.subscribe("aggregator", "agg", 16).await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let mut still = Vec::new();
                for (barrier, delivery) in unconfirmed.drain(..) {
                    match sub.ack_id(&delivery).await {
                        Ok(()) => {
                            println!("release of {barrier}: repeated ack confirmed");
                            *acked.lock().unwrap().entry(barrier).or_default() += 1;
                        }
                        Err(e) => {
                            println!("release of {barrier}: repeated ack failed: {e}");
                            still.push((barrier, delivery));
                        }
                    }
                }
                unconfirmed = still;
                while let Ok(Some(Ok(d))) =
                    tokio::time::timeout(Duration::from_millis(500), sub.next_delivery()).await
                {
                    let release: pb::BarrierRelease = d.payload().unwrap();
                    assert_eq!(results(&release), (0..BRANCHES).collect::<Vec<_>>());
                    assert!(release.missing.is_empty() && !release.failure);
                    seen.lock()
                        .unwrap()
                        .entry(release.barrier_id.clone())
                        .or_default()
                        .insert(format!("{}@{}", d.handoff_id(), d.raw().sequence));
                    if d.ack().await.is_ok() {
                        *acked.lock().unwrap().entry(release.barrier_id).or_default() += 1;
                    } else {
                        println!("release of {}: ack unconfirmed", release.barrier_id);
                        unconfirmed.push((release.barrier_id, d.id().to_string()));
                    }
                }
            }
        })
    };
    // Three kill -9s at random moments while the fan-ins run.
    for crash in 0..3 {
        let wait = 100 + rng.below(700);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        println!("kill -9 #{crash} after {wait} ms");
        broker.kill9().await;
        broker = BrokerProcess::spawn(BIN, nats.url(), &[]).await;
        restarted.send_replace(broker.client().await);
    }
    let client = broker.client().await;
    planner.await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while acked.lock().unwrap().len() < FAN_INS && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Long enough for any second release to be delivered; then the
    // aggregator's inbox must have nothing left to deliver, so none can
    // arrive after the aggregator stops.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let aggregator_inbox = settled_inbox(nats.url(), "aggregator").await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    aggregator.await.unwrap();
    for w in workers {
        w.await.unwrap();
    }
    let seen = seen.lock().unwrap().clone();
    let acked = acked.lock().unwrap().clone();
    // What a barrier that was not released went through, for the failure.
    for i in 0..FAN_INS {
        let id = format!("f{i}");
        if acked.contains_key(&id) {
            continue;
        }
        let b = get(&client, "crash", &id).await;
        println!(
            "barrier {id}: state {}, recorded {:?}, release published {}, seen {:?}",
            b.state,
            b.branches.iter().map(|r| &r.key).collect::<Vec<_>>(),
            b.release_published,
            seen.get(&id)
        );
        let run = client.get_run("crash").await.expect("get run");
        let release = &b.release_handoff_id;
        for e in run
            .timeline
            .iter()
            .filter(|e| e.barrier_id == id || !release.is_empty() && &e.handoff_id == release)
        {
            println!(
                "  {} {} agent {} key {:?} attempt {} {}",
                kinds(std::slice::from_ref(e))[0],
                e.handoff_id,
                e.agent,
                e.branch_key,
                e.attempt,
                e.reason
            );
        }
    }
    assert_eq!(
        acked.len(),
        FAN_INS,
        "every barrier released; acked: {acked:?}"
    );
    assert_eq!(seen.len(), FAN_INS);
    for (barrier, ids) in &seen {
        assert_eq!(ids.len(), 1, "barrier {barrier}: one release, got {ids:?}");
    }
    // The evidence besides what the aggregator saw: one release stored per
    // barrier (a second would be a second inbox message), and one
    // `barrier_released` per barrier in the run's timeline.
    assert_eq!(
        aggregator_inbox.stored, FAN_INS as u64,
        "{aggregator_inbox:?}"
    );
    let timeline = client.get_run("crash").await.unwrap().timeline;
    for i in 0..FAN_INS {
        let id = format!("f{i}");
        assert!(
            barrier_events(&timeline, &id).0 <= 1,
            "barrier {id} released twice"
        );
    }
    // A broker killed between publishing a release and marking it
    // published leaves the mark to the durable release check, due 5 s
    // after the release: wait for it.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    for i in 0..FAN_INS {
        let mut b = get(&client, "crash", &format!("f{i}")).await;
        while !b.release_published && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
            b = get(&client, "crash", &format!("f{i}")).await;
        }
        assert_eq!(b.state, pb::BarrierState::Released as i32);
        assert!(
            b.release_published,
            "barrier f{i}: release never marked published"
        );
    }
    assert_eq!(broker.terminate().await, Some(0));
}

#[tokio::test]
async fn sdk_fans_out_joins_and_hands_the_aggregator_typed_results() {
    use handoff_client::JoinMode;
    let (nats, _broker, client) = stack(|_| {}).await;
    for a in ["planner", "worker", "aggregator"] {
        client.register_agent(AgentConfig::new(a)).await.unwrap();
    }
    let run = client
        .start_run(RunConfig::new("owner").id("sdk"))
        .await
        .unwrap();
    client
        .handoff(Handoff::to(&run.id, "planner", &note("ask", 0)).unwrap())
        .await
        .unwrap();
    let mut planner = client.subscribe("planner", "p", 1).await.unwrap();
    let ask = next_within(&mut planner, Duration::from_secs(5))
        .await
        .unwrap();
    let fanned = ask
        .fan_out("worker", (0..4).map(|n| note("task", n)))
        .keys(["a", "b", "c", "d"])
        .join("aggregator", JoinMode::All)
        .await
        .unwrap();
    assert_eq!(fanned.keys, ["a", "b", "c", "d"]);
    assert_eq!(fanned.branches.len(), 4);
    // The planner's delivery was settled by the fan-out: not redelivered,
    // and its inbox has nothing left to deliver.
    assert!(next_within(&mut planner, Duration::from_millis(700))
        .await
        .is_none());
    let inbox = settled_inbox(nats.url(), "planner").await;
    assert_eq!((inbox.stored, inbox.deliveries), (1, 1), "{inbox:?}");
    let mut workers = client.subscribe("worker", "w", 4).await.unwrap();
    for _ in 0..4 {
        let d = next_within(&mut workers, Duration::from_secs(5))
            .await
            .unwrap();
        let task: Note = d.payload().unwrap();
        let (barrier, key) = d.barrier_branch().unwrap();
        assert_eq!(barrier, fanned.barrier_id);
        match key {
            "b" => d.skip_branch("nothing to summarise").await.unwrap(),
            "c" => d.fail_branch("source unreadable").await.unwrap(),
            _ => d.to_barrier(&note("done", task.n * 10)).await.unwrap(),
        };
    }
    let mut agg = client.subscribe("aggregator", "a", 1).await.unwrap();
    let release = next_within(&mut agg, Duration::from_secs(5)).await.unwrap();
    let join = release.join::<Note>().unwrap();
    let keys: Vec<&str> = join.branches.iter().map(|b| b.key.as_str()).collect();
    assert_eq!(keys, ["a", "b", "c", "d"]);
    let statuses: Vec<pb::BranchStatus> = join.branches.iter().map(|b| b.status).collect();
    assert_eq!(
        statuses,
        [
            pb::BranchStatus::Arrived,
            pb::BranchStatus::Skipped,
            pb::BranchStatus::Failed,
            pb::BranchStatus::Arrived
        ]
    );
    let results: Vec<(&str, u32)> = join.results().map(|(k, r)| (k, r.n)).collect();
    assert_eq!(results, [("a", 0), ("d", 30)]);
    assert_eq!(
        (join.skipped.clone(), join.failed.clone()),
        (vec!["b".to_string()], vec!["c".to_string()])
    );
    assert!((join.confidence - 0.5).abs() < 1e-9);
    assert!(join.branches[2]
        .warnings
        .contains(&"source unreadable".to_string()));
    // Results are typed: reading them as another type names the branch.
    let err = release.join::<pb::Run>().unwrap_err();
    assert_eq!(err.kind(), handoff_client::ErrorKind::Decode);
    assert!(err.message().contains("\"a\""), "{err}");
    release
        .handoff(Handoff::final_result("", &note("report", 2)).unwrap())
        .await
        .unwrap();
    let run = client.get_run("sdk").await.unwrap().run.unwrap();
    assert_eq!(run.status, pb::RunStatus::Completed as i32);
}

#[tokio::test]
async fn a_fan_out_redone_after_the_dedupe_window_with_other_items_releases_the_first_once() {
    use handoff_client::JoinMode;
    // The broker stores the branches but dies before acking the planner's
    // input; the planner's redo comes 7 s later, past the 2 s window, and
    // (an LLM) plans other items.
    let (nats, _broker, client) = stack(|c| {
        c.faults.skip_consume_ack = true;
        c.dedupe_window = Duration::from_secs(2);
    })
    .await;
    client
        .register_agent(AgentConfig::new("planner").lease(Duration::from_secs(5)))
        .await
        .unwrap();
    for a in ["worker", "aggregator"] {
        client.register_agent(AgentConfig::new(a)).await.unwrap();
    }
    let run = client.start_run(RunConfig::new("owner")).await.unwrap();
    client
        .handoff(Handoff::to(&run.id, "planner", &note("ask", 0)).unwrap())
        .await
        .unwrap();
    let mut planner = client.subscribe("planner", "p1", 1).await.unwrap();
    let ask = next_within(&mut planner, Duration::from_secs(5))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let first = ask
        .fan_out("worker", (0..2).map(|n| note("first plan", n)))
        .join("aggregator", JoinMode::All)
        .await
        .unwrap();
    drop(planner);
    tokio::time::sleep(Duration::from_secs(7).saturating_sub(started.elapsed())).await;
    let mut planner = client.subscribe("planner", "p2", 1).await.unwrap();
    let again = next_within(&mut planner, Duration::from_secs(10))
        .await
        .expect("the input comes back");
    assert_eq!(again.attempt(), 2);
    let redo = again
        .fan_out("worker", (0..3).map(|n| note("second plan", n + 10)))
        .join("aggregator", JoinMode::All)
        .await
        .unwrap();
    assert_eq!(redo.barrier_id, first.barrier_id, "one barrier");
    let ids = |r: &handoff_client::FanOutReceipt| -> Vec<String> {
        r.branches.iter().map(|b| b.handoff_id.clone()).collect()
    };
    assert_eq!(ids(&redo), ids(&first), "the first branches");
    assert!(redo.branches.iter().all(|b| b.duplicate));
    let mut workers = client.subscribe("worker", "w", 4).await.unwrap();
    for _ in 0..2 {
        let d = next_within(&mut workers, Duration::from_secs(5))
            .await
            .expect("a branch");
        let task: Note = d.payload().unwrap();
        d.to_barrier(&note("done", task.n)).await.unwrap();
    }
    let mut agg = client.subscribe("aggregator", "a", 5).await.unwrap();
    let release = the_release(&nats, &client, &mut agg).await;
    assert_eq!(results(&release), [0, 1], "the first plan's results");
    let workers_inbox = settled_inbox(nats.url(), "worker").await;
    assert_eq!(workers_inbox.stored, 2, "no branch of the second plan");
}
