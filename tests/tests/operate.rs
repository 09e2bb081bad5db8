//! Operating runs: finding them (`ListRuns`) and stopping them
//! (`CancelRun`), with who may do either. Against a real `nats-server`.

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use futures::{stream, StreamExt as _, TryStreamExt as _};
use handoff_client::{pb, AgentConfig, Client, Handoff, RunConfig, WatchFilter};
use handoff_tests::{
    events_until, next_within, note,
    secured::{count, refused, Secured},
    stack,
};
use tonic::Code;

/// Every run `req` matches, page after page (`page_size` each).
async fn all_pages(client: &Client, mut req: pb::ListRunsRequest) -> Vec<pb::Run> {
    let mut out = Vec::new();
    loop {
        let page = client.list_runs(req.clone()).await.expect("list");
        assert!(page.runs.len() <= req.page_size.max(1) as usize);
        out.extend(page.runs.into_iter().filter_map(|s| s.run));
        if page.next_page_token.is_empty() {
            return out;
        }
        req.page_token = page.next_page_token;
    }
}

/// Ids of runs as the index orders them: newest start first, then id.
fn newest_first(runs: &[pb::Run]) -> Vec<String> {
    let mut keyed: Vec<_> = runs
        .iter()
        .map(|r| {
            let t = r.created_at.unwrap_or_default();
            ((t.seconds, t.nanos), r.id.clone())
        })
        .collect();
    keyed.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    keyed.into_iter().map(|(_, id)| id).collect()
}

fn ids(runs: &[pb::Run]) -> Vec<String> {
    runs.iter().map(|r| r.id.clone()).collect()
}

/// Lists with `req` until the answer has `expected` (the index follows
/// the store within moments), for at most 20 s; the last answer either way.
async fn list_until(client: &Client, req: pb::ListRunsRequest, expected: &[String]) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let found = ids(&all_pages(client, req.clone()).await);
        if found == expected || Instant::now() >= deadline {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn list_runs_finds_exactly_the_matching_runs_in_order_across_pages() {
    let (_nats, _broker, client) = stack(|_| {}).await;
    client
        .register_agent(AgentConfig::new("worker"))
        .await
        .expect("register");
    // 1,000 runs of three owners, in two batches a known instant apart;
    // a quarter completed, a quarter cancelled, a quarter handed to
    // `worker` (running, with an agent), a quarter left running.
    let start = |i: usize| {
        let client = client.clone();
        async move {
            let run = client
                .start_run(RunConfig::new(format!("owner{}", i % 3)).id(format!("run-{i:04}")))
                .await?;
            match i % 4 {
                0 => {
                    client
                        .handoff(Handoff::final_result(&run.id, &note("done", 0))?)
                        .await?;
                }
                1 => {
                    client.cancel_run(&run.id, "not needed").await?;
                }
                2 => {
                    client
                        .handoff(Handoff::to(&run.id, "worker", &note("work", 1))?)
                        .await?;
                }
                _ => {}
            }
            Ok::<_, handoff_client::Error>((i, run))
        }
    };
    let first: Vec<(usize, pb::Run)> = stream::iter(0..500)
        .map(start)
        .buffer_unordered(16)
        .try_collect()
        .await
        .expect("first batch");
    tokio::time::sleep(Duration::from_millis(20)).await;
    let middle: prost_types::Timestamp = std::time::SystemTime::now().into();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let second: Vec<(usize, pb::Run)> = stream::iter(500..1000)
        .map(start)
        .buffer_unordered(16)
        .try_collect()
        .await
        .expect("second batch");
    let all: Vec<(usize, pb::Run)> = first.into_iter().chain(second).collect();
    let expect = |keep: &dyn Fn(usize) -> bool| {
        let runs: Vec<pb::Run> = all
            .iter()
            .filter(|(i, _)| keep(*i))
            .map(|(_, r)| r.clone())
            .collect();
        newest_first(&runs)
    };
    let page = |size: u32| pb::ListRunsRequest {
        page_size: size,
        ..Default::default()
    };

    // Everything, 7 pages of 150.
    let everything = expect(&|_| true);
    assert_eq!(everything.len(), 1000);
    assert_eq!(
        list_until(&client, page(150), &everything).await,
        everything
    );
    // By owner.
    let by_owner = pb::ListRunsRequest {
        owner: "owner1".to_string(),
        ..page(100)
    };
    assert_eq!(
        list_until(&client, by_owner, &expect(&|i| i % 3 == 1)).await,
        expect(&|i| i % 3 == 1)
    );
    // By status: completed or cancelled, and running.
    let ended = pb::ListRunsRequest {
        status: vec![
            pb::RunStatus::Completed as i32,
            pb::RunStatus::Cancelled as i32,
        ],
        ..page(500)
    };
    assert_eq!(
        list_until(&client, ended, &expect(&|i| i % 4 < 2)).await,
        expect(&|i| i % 4 < 2)
    );
    let cancelled = pb::ListRunsRequest {
        status: vec![pb::RunStatus::Cancelled as i32],
        owner: "owner2".to_string(),
        ..page(40)
    };
    let want = expect(&|i| i % 4 == 1 && i % 3 == 2);
    assert_eq!(list_until(&client, cancelled, &want).await, want);
    // By agent that took part.
    let worker = pb::ListRunsRequest {
        agent: "worker".to_string(),
        ..page(64)
    };
    assert_eq!(
        list_until(&client, worker, &expect(&|i| i % 4 == 2)).await,
        expect(&|i| i % 4 == 2)
    );
    // By time range: the second batch, and the first.
    let later = pb::ListRunsRequest {
        started_after: Some(middle),
        ..page(77)
    };
    assert_eq!(
        list_until(&client, later, &expect(&|i| i >= 500)).await,
        expect(&|i| i >= 500)
    );
    let earlier = pb::ListRunsRequest {
        started_before: Some(middle),
        status: vec![pb::RunStatus::Running as i32],
        ..page(500)
    };
    let want = expect(&|i| i < 500 && i % 4 >= 2);
    assert_eq!(list_until(&client, earlier, &want).await, want);
    // A summary carries what the events said and leaves the pinned
    // context out.
    let one = client
        .list_runs(pb::ListRunsRequest {
            agent: "worker".to_string(),
            page_size: 1,
            ..Default::default()
        })
        .await
        .expect("list");
    assert_eq!(one.runs[0].agents, ["worker"]);
    assert!(one.runs[0].run.as_ref().is_some_and(|r| r.pinned.is_none()));

    // Bad input is refused with its reason.
    for bad in [
        pb::ListRunsRequest {
            page_size: 501,
            ..Default::default()
        },
        pb::ListRunsRequest {
            page_token: "not-a-token".to_string(),
            ..Default::default()
        },
        pb::ListRunsRequest {
            status: vec![99],
            ..Default::default()
        },
    ] {
        refused(
            client.list_runs(bad).await,
            Code::InvalidArgument,
            "MALFORMED_REQUEST",
        );
    }
    refused(
        client
            .list_runs(pb::ListRunsRequest {
                owner: "no spaces".to_string(),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "INVALID_NAME",
    );
}

#[tokio::test]
async fn a_principal_lists_only_the_runs_it_may_read_and_cancels_only_its_own() {
    let s = Secured::start(Duration::from_secs(5), |_| {}).await;
    let mut expected: Vec<pb::Run> = Vec::new();
    for i in 0..6 {
        let owner = if i % 2 == 0 { "alice" } else { "bob" };
        let run = s
            .admin
            .start_run(RunConfig::new(owner).id(format!("r{i}")))
            .await
            .expect("start");
        if owner == "alice" {
            expected.push(run);
        }
    }
    let (alice, _) = s
        .principal("alice-svc", &[(pb::GrantAction::Own, "alice", false)])
        .await;
    let (reader, _) = s
        .principal("reader", &[(pb::GrantAction::Read, "", false)])
        .await;
    let (nobody, _) = s
        .principal("nobody", &[(pb::GrantAction::SendAs, "planner", false)])
        .await;
    let everything = pb::ListRunsRequest {
        page_size: 2,
        ..Default::default()
    };
    assert_eq!(
        list_until(&alice, everything.clone(), &newest_first(&expected)).await,
        newest_first(&expected)
    );
    assert_eq!(all_pages(&reader, everything.clone()).await.len(), 6);
    // Asking by another owner's name shows nothing either.
    let bobs = pb::ListRunsRequest {
        owner: "bob".to_string(),
        ..everything.clone()
    };
    assert!(all_pages(&alice, bobs).await.is_empty());
    assert!(all_pages(&nobody, everything).await.is_empty());

    // Cancelling: only with `own` on the run's owner. Without any right
    // to the run it does not exist; with `read` it is not granted.
    refused(
        nobody.cancel_run("r1", "").await,
        Code::NotFound,
        "RUN_NOT_FOUND",
    );
    refused(
        alice.cancel_run("r1", "").await,
        Code::NotFound,
        "RUN_NOT_FOUND",
    );
    refused(
        reader.cancel_run("r1", "").await,
        Code::PermissionDenied,
        "NOT_GRANTED",
    );
    let view = s.admin.get_run("r1").await.expect("run");
    assert_eq!(
        view.run.expect("run").status,
        pb::RunStatus::Running as i32,
        "a refused cancel changes nothing"
    );
    let cancelled = alice.cancel_run("r0", "").await.expect("cancel own run");
    assert_eq!(cancelled.status, pb::RunStatus::Cancelled as i32);
    assert_eq!(cancelled.failure, "cancelled by alice-svc");
}

#[tokio::test]
async fn cancel_tells_the_instance_in_flight_drops_the_pending_handoff_and_closes_the_run() {
    let (_nats, _broker, client) = stack(|_| {}).await;
    for agent in ["a", "b", "c"] {
        client
            .register_agent(AgentConfig::new(agent))
            .await
            .expect("register");
    }
    let run = client
        .start_run(RunConfig::new("dana").id("to-cancel"))
        .await
        .expect("start");
    let mut owner = client
        .watch(WatchFilter::all().owner("dana"))
        .await
        .expect("watch");
    // Hop 1: a hands off to b (hop 2, held in flight) and to c (pending:
    // no instance of c is there yet).
    client
        .handoff(Handoff::to(&run.id, "a", &note("start", 0)).expect("handoff"))
        .await
        .expect("to a");
    let mut sub_a = client.subscribe("a", "a1", 1).await.expect("a");
    let at_a = next_within(&mut sub_a, Duration::from_secs(5))
        .await
        .expect("a's delivery");
    at_a.handoff(Handoff::to("", "b", &note("hop", 1)).expect("handoff"))
        .await
        .expect("to b");
    let to_c = client
        .handoff(Handoff::to(&run.id, "c", &note("later", 2)).expect("handoff"))
        .await
        .expect("to c");
    // A barrier of the run, open with one of its two branches arrived.
    client
        .raw()
        .open_barrier(pb::OpenBarrierRequest {
            barrier: Some(pb::BarrierSpec {
                run_id: run.id.clone(),
                barrier_id: "join".to_string(),
                branch_keys: vec!["x".to_string(), "y".to_string()],
                target_agent: "c".to_string(),
                ..Default::default()
            }),
        })
        .await
        .expect("open barrier");
    client
        .handoff(Handoff::to_barrier(&run.id, "join", "x", &note("x", 5)).expect("branch"))
        .await
        .expect("branch x");
    let mut sub_b = client.subscribe("b", "b1", 1).await.expect("b");
    let at_b = next_within(&mut sub_b, Duration::from_secs(5))
        .await
        .expect("b's delivery");
    assert!(!at_b.is_cancelled());

    let ended = client
        .cancel_run(&run.id, "the user changed their mind")
        .await
        .expect("cancel");
    assert_eq!(ended.status, pb::RunStatus::Cancelled as i32);
    assert_eq!(ended.failure, "the user changed their mind");

    // The handler in flight observes its cancellation.
    let reason = tokio::time::timeout(Duration::from_secs(5), at_b.cancelled())
        .await
        .expect("the delivery in flight is told");
    assert_eq!(reason, "the user changed their mind");
    assert!(at_b.is_cancelled());
    // What it would hand off now is refused, and its ack is taken.
    refused(
        at_b.handoff(Handoff::to("", "c", &note("too late", 3)).expect("handoff"))
            .await,
        Code::FailedPrecondition,
        "RUN_CLOSED",
    );
    at_b.ack().await.expect("ack after cancel");

    // The owner is told.
    let told = events_until(&mut owner, Duration::from_secs(5), |e| {
        e.kind == pb::EventKind::RunCancelled as i32
    })
    .await;
    assert!(told
        .iter()
        .any(|e| e.kind == pb::EventKind::RunCancelled as i32 && e.run_id == run.id));

    // The pending handoff is never delivered: an instance of c that comes
    // now gets nothing, and the run's timeline says it was discarded.
    let mut sub_c = client.subscribe("c", "c1", 1).await.expect("c");
    let deadline = Instant::now() + Duration::from_secs(10);
    let timeline = loop {
        let timeline = client.get_run(&run.id).await.expect("run").timeline;
        let discarded = timeline
            .iter()
            .any(|e| e.kind == pb::EventKind::Discarded as i32 && e.handoff_id == to_c.handoff_id);
        if discarded || Instant::now() >= deadline {
            break timeline;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        timeline
            .iter()
            .any(|e| e.kind == pb::EventKind::Discarded as i32 && e.handoff_id == to_c.handoff_id),
        "the pending handoff is discarded"
    );
    assert!(
        !timeline
            .iter()
            .any(|e| e.kind == pb::EventKind::Delivered as i32 && e.handoff_id == to_c.handoff_id),
        "the pending handoff was never delivered"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(500), sub_c.next_delivery())
            .await
            .is_err(),
        "c receives nothing"
    );
    assert_eq!(count(&timeline, pb::EventKind::RunCancelled), 1);

    // The open barrier is closed: it releases nothing, and its other
    // branch is RUN_CLOSED.
    let join = client.get_barrier(&run.id, "join").await.expect("barrier");
    assert_eq!(join.state, pb::BarrierState::Closed as i32);
    refused(
        client
            .handoff(Handoff::to_barrier(&run.id, "join", "y", &note("y", 6)).expect("branch"))
            .await,
        Code::FailedPrecondition,
        "RUN_CLOSED",
    );
    assert_eq!(count(&timeline, pb::EventKind::BarrierReleased), 0);

    // Later handoffs, and a second cancel, are RUN_CLOSED.
    refused(
        client
            .handoff(Handoff::to(&run.id, "a", &note("again", 4)).expect("handoff"))
            .await,
        Code::FailedPrecondition,
        "RUN_CLOSED",
    );
    refused(
        client.cancel_run(&run.id, "").await,
        Code::FailedPrecondition,
        "RUN_CLOSED",
    );
    refused(
        client.cancel_run("no-such-run", "").await,
        Code::NotFound,
        "RUN_NOT_FOUND",
    );
    let listed: HashSet<String> = ids(&all_pages(
        &client,
        pb::ListRunsRequest {
            status: vec![pb::RunStatus::Cancelled as i32],
            page_size: 10,
            ..Default::default()
        },
    )
    .await)
    .into_iter()
    .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut listed = listed;
    while !listed.contains(&run.id) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        listed = ids(&all_pages(
            &client,
            pb::ListRunsRequest {
                status: vec![pb::RunStatus::Cancelled as i32],
                page_size: 10,
                ..Default::default()
            },
        )
        .await)
        .into_iter()
        .collect();
    }
    assert!(
        listed.contains(&run.id),
        "a cancelled run is listed as such"
    );
}

/// Polls run `id` until `done` holds, for at most 10 s; the run either way.
async fn run_until(client: &Client, id: &str, done: impl Fn(&pb::Run) -> bool) -> pb::Run {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let run = client.get_run(id).await.expect("run").run.expect("run");
        if done(&run) || Instant::now() >= deadline {
            return run;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Hands a note to `agent` (registered with one attempt) in run `run_id`
/// and nacks its delivery, then waits for its dead letter: the receipt,
/// the letter, and the subscription (kept open: the nacked attempt comes
/// back to an instance, which finds it out of attempts).
async fn dead_letter(
    client: &Client,
    run_id: &str,
    agent: &str,
) -> (
    handoff_client::Receipt,
    pb::DeadLetter,
    handoff_client::Subscription,
) {
    let sent = client
        .handoff(Handoff::to(run_id, agent, &note("work", 1)).expect("handoff"))
        .await
        .expect("handoff");
    let mut sub = client.subscribe(agent, "dl1", 1).await.expect("subscribe");
    next_within(&mut sub, Duration::from_secs(5))
        .await
        .expect("delivery")
        .nack(None)
        .await
        .expect("nack");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let letters = client.dead_letters(agent, 100).await.expect("letters");
        if let Some(letter) = letters
            .into_iter()
            .find(|d| d.handoff.as_ref().is_some_and(|h| h.id == sent.handoff_id))
        {
            return (sent, letter, sub);
        }
        assert!(Instant::now() < deadline, "no dead letter");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn kinds_of(timeline: &[pb::Event], wanted: &[pb::EventKind]) -> Vec<pb::EventKind> {
    timeline
        .iter()
        .filter_map(|e| pb::EventKind::try_from(e.kind).ok())
        .filter(|k| wanted.contains(k))
        .collect()
}

#[tokio::test]
async fn a_dead_letter_redriven_to_a_fixed_agent_completes_its_failed_run_once() {
    let (_nats, _broker, client) = stack(|_| {}).await;
    client
        .register_agent(AgentConfig::new("flaky").max_attempts(1))
        .await
        .expect("register");
    client
        .register_agent(AgentConfig::new("fixed"))
        .await
        .expect("register");
    client
        .register_contract(handoff_client::ContractSpec::of::<
            handoff_proto::demo::Subtask,
        >(handoff_proto::DEMO_FILE_DESCRIPTOR_SET))
        .await
        .expect("contract");
    client
        .register_agent(AgentConfig::new("picky").accepts::<handoff_proto::demo::Subtask>())
        .await
        .expect("register");
    let run = client
        .start_run(RunConfig::new("erin").id("redriven"))
        .await
        .expect("start");
    let (sent, letter, _flaky) = dead_letter(&client, &run.id, "flaky").await;
    let failed = run_until(&client, &run.id, |r| {
        r.status == pb::RunStatus::Failed as i32
    })
    .await;
    assert_eq!(failed.status, pb::RunStatus::Failed as i32);
    let seen = client
        .get_handoff(&sent.handoff_id, "")
        .await
        .expect("get handoff");
    assert_eq!(seen.status, pb::HandoffStatus::DeadLettered as i32);
    assert_eq!(seen.attempts, 1);
    assert_eq!(seen.run.expect("run").id, run.id);
    assert_eq!(
        seen.handoff.expect("envelope").target_agent,
        "flaky",
        "the envelope as stored"
    );

    // Refusals first: an unknown letter, a target that does not take it.
    refused(
        client
            .redrive_dead_letter(letter.sequence + 1000, None)
            .await,
        Code::NotFound,
        "DEAD_LETTER_NOT_FOUND",
    );
    refused(
        client
            .redrive_dead_letter(letter.sequence, Some("picky"))
            .await,
        Code::FailedPrecondition,
        "CONTRACT_MISMATCH",
    );
    refused(
        client
            .redrive_dead_letter(letter.sequence, Some("nobody"))
            .await,
        Code::NotFound,
        "AGENT_NOT_FOUND",
    );

    let redriven = client
        .redrive_dead_letter(letter.sequence, Some("fixed"))
        .await
        .expect("redrive");
    assert!(redriven.resumed);
    let resumed = redriven.run.expect("run");
    assert_eq!(resumed.status, pb::RunStatus::Running as i32);
    assert_eq!(resumed.resumed, 1);
    assert!(resumed.failure.is_empty());
    assert_eq!(
        redriven.handoff.expect("receipt").handoff_id,
        sent.handoff_id,
        "a new attempt of the same handoff"
    );
    // A second redrive of the same letter is refused.
    refused(
        client.redrive_dead_letter(letter.sequence, None).await,
        Code::FailedPrecondition,
        "ALREADY_SETTLED",
    );

    let mut fixed = client.subscribe("fixed", "x1", 1).await.expect("fixed");
    let again = next_within(&mut fixed, Duration::from_secs(5))
        .await
        .expect("the redriven delivery");
    assert_eq!(again.handoff_id(), sent.handoff_id);
    again
        .handoff(Handoff::final_result("", &note("done", 2)).expect("final"))
        .await
        .expect("complete");
    let done = run_until(&client, &run.id, |r| {
        r.status == pb::RunStatus::Completed as i32
    })
    .await;
    assert_eq!(done.status, pb::RunStatus::Completed as i32);
    // FAILED -> RUNNING -> COMPLETED, in the timeline, each told once.
    let timeline = client.get_run(&run.id).await.expect("run").timeline;
    assert_eq!(
        kinds_of(
            &timeline,
            &[
                pb::EventKind::RunFailed,
                pb::EventKind::HandoffRedriven,
                pb::EventKind::RunResumed,
                pb::EventKind::RunCompleted,
            ]
        ),
        [
            pb::EventKind::RunFailed,
            pb::EventKind::RunResumed,
            pb::EventKind::HandoffRedriven,
            pb::EventKind::RunCompleted,
        ]
    );
    let seen = client
        .get_handoff(&sent.handoff_id, &run.id)
        .await
        .expect("get handoff");
    assert_eq!(seen.status, pb::HandoffStatus::Acked as i32);
    assert_eq!(seen.handoff.expect("envelope").target_agent, "fixed");
    refused(
        client.get_handoff("no-such-handoff", "").await,
        Code::NotFound,
        "HANDOFF_NOT_FOUND",
    );
    refused(
        client.get_handoff("no-such-handoff", &run.id).await,
        Code::NotFound,
        "HANDOFF_NOT_FOUND",
    );
}

#[tokio::test]
async fn fork_at_revision_three_starts_from_that_state_and_leaves_the_parent_as_it_was() {
    let (_nats, _broker, client) = stack(|_| {}).await;
    client
        .register_agent(AgentConfig::new("worker"))
        .await
        .expect("register");
    let parent = client
        .start_run(
            RunConfig::new("fay")
                .id("parent")
                .ask("plan a trip")
                .state("step", 0.0),
        )
        .await
        .expect("start");
    // Revisions 2 to 5, one per handoff.
    for i in 1..=4u32 {
        client
            .handoff(
                Handoff::to(&parent.id, "worker", &note("step", i))
                    .expect("handoff")
                    .state_delta(
                        handoff_client::StateDelta::new()
                            .set("step", f64::from(i))
                            .set(format!("k{i}"), f64::from(i)),
                    ),
            )
            .await
            .expect("handoff");
    }
    let before = client.get_state(&parent.id, 0).await.expect("state");
    assert_eq!(before.state.as_ref().expect("state").revision, 5);
    let at3 = client.get_state(&parent.id, 3).await.expect("revision 3");

    let fork = client
        .fork_run(
            &parent.id,
            3,
            Some("child"),
            Handoff::to("", "worker", &note("again", 9))
                .expect("handoff")
                .idempotency_key("first"),
        )
        .await
        .expect("fork");
    let child = fork.run.expect("child");
    assert_eq!(child.id, "child");
    // Retried, the fork answers the same run and the same first handoff.
    let again = client
        .fork_run(
            &parent.id,
            3,
            Some("child"),
            Handoff::to("", "worker", &note("again", 9))
                .expect("handoff")
                .idempotency_key("first"),
        )
        .await
        .expect("fork again");
    assert_eq!(again.run.expect("run").id, child.id);
    let (first, retried) = (
        fork.handoff.clone().expect("receipt"),
        again.handoff.expect("receipt"),
    );
    assert_eq!(retried.handoff_id, first.handoff_id);
    assert!(retried.duplicate && !first.duplicate);
    // A first handoff that would be refused makes no run.
    refused(
        client
            .fork_run(
                &parent.id,
                3,
                Some("orphan"),
                Handoff::to("", "nobody", &note("again", 9)).expect("handoff"),
            )
            .await,
        Code::NotFound,
        "AGENT_NOT_FOUND",
    );
    refused(
        client.get_run("orphan").await,
        Code::NotFound,
        "RUN_NOT_FOUND",
    );
    assert_eq!(child.parent_run_id, parent.id);
    assert_eq!(child.forked_at_revision, 3);
    assert_eq!(child.owner, "fay");
    assert_eq!(
        child.pinned.as_ref().map(|p| p.ask.as_str()),
        Some("plan a trip")
    );
    let child_state = client.get_state(&child.id, 0).await.expect("child state");
    assert_eq!(
        child_state.state.expect("state").values,
        at3.state.expect("state").values,
        "the child's state is the parent's at revision 3"
    );
    let view = client.get_run(&child.id).await.expect("child run");
    assert!(view.timeline.iter().any(|e| {
        e.kind == pb::EventKind::HandoffAccepted as i32
            && e.handoff_id == fork.handoff.as_ref().expect("receipt").handoff_id
    }));

    // The parent is as it was, and names its fork.
    let after = client.get_state(&parent.id, 0).await.expect("state");
    assert_eq!(after.state, before.state);
    let parent_view = client.get_run(&parent.id).await.expect("parent");
    assert_eq!(
        parent_view.run.expect("run").status,
        pb::RunStatus::Running as i32
    );
    let forked: Vec<&pb::Event> = parent_view
        .timeline
        .iter()
        .filter(|e| e.kind == pb::EventKind::RunForked as i32)
        .collect();
    assert_eq!(forked.len(), 1);
    assert_eq!(forked[0].related_run_id, child.id);
    let children = pb::ListRunsRequest {
        parent_run_id: parent.id.clone(),
        page_size: 10,
        ..Default::default()
    };
    let only_child = std::slice::from_ref(&child.id);
    assert_eq!(list_until(&client, children, only_child).await, only_child);

    refused(
        client
            .fork_run(
                &parent.id,
                9,
                None,
                Handoff::to("", "worker", &note("again", 9)).expect("handoff"),
            )
            .await,
        Code::NotFound,
        "STATE_REVISION_NOT_FOUND",
    );
    refused(
        client
            .fork_run(
                "no-such-run",
                0,
                None,
                Handoff::to("", "worker", &note("again", 9)).expect("handoff"),
            )
            .await,
        Code::NotFound,
        "RUN_NOT_FOUND",
    );
}

const BIN: &str = env!("CARGO_BIN_EXE_handoffd-under-test");

/// The contract an answer must keep: a demo `Subtask` with an
/// instruction.
async fn answer_contract(client: &Client) -> pb::ContractRef {
    client
        .register_contract(
            handoff_client::ContractSpec::of::<Subtask>(handoff_proto::DEMO_FILE_DESCRIPTOR_SET)
                .require("instruction"),
        )
        .await
        .expect("contract");
    pb::ContractRef {
        message_type: "handoff.demo.v1.Subtask".to_string(),
        ..Default::default()
    }
}

use handoff_proto::demo::Subtask;

#[tokio::test]
async fn an_input_request_parks_the_run_until_its_answer_resumes_the_agent_even_across_a_kill() {
    let nats = handoff_tests::Nats::start().await;
    let first = handoff_tests::BrokerProcess::spawn(BIN, nats.url(), &[]).await;
    let client = first.client().await;
    for agent in ["asker", "standby"] {
        client
            .register_agent(AgentConfig::new(agent))
            .await
            .expect("register");
    }
    let contract = answer_contract(&client).await;
    let run = client
        .start_run(
            RunConfig::new("gail")
                .id("asks")
                .ask("book a hotel")
                .state("nights", "3"),
        )
        .await
        .expect("start");
    let mut owner = client
        .watch(WatchFilter::all().owner("gail"))
        .await
        .expect("watch");
    client
        .handoff(Handoff::to(&run.id, "asker", &note("find a hotel", 1)).expect("handoff"))
        .await
        .expect("to asker");
    let mut asker = client.subscribe("asker", "a1", 1).await.expect("asker");
    let asking = next_within(&mut asker, Duration::from_secs(5))
        .await
        .expect("delivery");
    let request = asking
        .await_input(
            "Which city?",
            Some(contract),
            Duration::from_secs(600),
            None,
        )
        .await
        .expect("await input");
    // Repeating it (its answer lost) answers the same request.
    let again = asking
        .await_input("Which city?", None, Duration::from_secs(600), None)
        .await
        .expect("await input again");
    assert_eq!(again.id, request.id);
    let waiting = run_until(&client, &run.id, |r| {
        r.status == pb::RunStatus::WaitingInput as i32
    })
    .await;
    assert_eq!(waiting.status, pb::RunStatus::WaitingInput as i32);
    assert_eq!(waiting.waiting.len(), 1);
    assert_eq!(waiting.waiting[0].prompt, "Which city?");
    let asked = events_until(&mut owner, Duration::from_secs(5), |e| {
        e.kind == pb::EventKind::InputRequested as i32
    })
    .await;
    assert!(asked.iter().any(|e| e.input_request_id == request.id));
    // The asking delivery was acked: no lease is held while waiting.
    let seen = client
        .get_handoff(asking.handoff_id(), &run.id)
        .await
        .expect("handoff");
    assert_eq!(seen.status, pb::HandoffStatus::Acked as i32);
    drop(asker);

    // The broker dies while the run waits; another takes over.
    first.kill9().await;
    let second = handoff_tests::BrokerProcess::spawn(BIN, nats.url(), &[]).await;
    let client = second.client().await;
    let mut asker = client.subscribe("asker", "a2", 1).await.expect("asker");

    // An answer breaking its contract is refused and changes nothing.
    refused(
        client
            .provide_input(&run.id, &request.id, &note("paris", 0))
            .await,
        Code::FailedPrecondition,
        "CONTRACT_MISMATCH",
    );
    refused(
        client
            .provide_input(&run.id, &request.id, &Subtask::default())
            .await,
        Code::FailedPrecondition,
        "MISSING_REQUIRED_FIELDS",
    );
    refused(
        client
            .provide_input(&run.id, "no-such-request", &note("x", 0))
            .await,
        Code::NotFound,
        "INPUT_NOT_FOUND",
    );
    let answer = Subtask {
        instruction: "Paris".to_string(),
        ..Default::default()
    };
    let provided = client
        .provide_input(&run.id, &request.id, &answer)
        .await
        .expect("answer");
    assert_eq!(
        provided.run.expect("run").status,
        pb::RunStatus::Running as i32
    );
    refused(
        client.provide_input(&run.id, &request.id, &answer).await,
        Code::FailedPrecondition,
        "ALREADY_SETTLED",
    );
    // The asking agent gets the answer, with its run's pinned context.
    let answered = next_within(&mut asker, Duration::from_secs(5))
        .await
        .expect("the answer");
    let envelope = answered.envelope();
    assert_eq!(envelope.input_request_id, request.id);
    assert_eq!(answered.pinned().ask, "book a hotel");
    // ...and the run's state, to go on from.
    assert_eq!(answered.state_str("nights"), Some("3"));
    let got: Subtask = answered.payload().expect("decodes");
    assert_eq!(got.instruction, "Paris");
    answered
        .handoff(Handoff::final_result("", &note("booked", 2)).expect("final"))
        .await
        .expect("complete");
    let done = run_until(&client, &run.id, |r| {
        r.status == pb::RunStatus::Completed as i32
    })
    .await;
    assert_eq!(done.status, pb::RunStatus::Completed as i32);
    let timeline = client.get_run(&run.id).await.expect("run").timeline;
    assert_eq!(
        kinds_of(
            &timeline,
            &[
                pb::EventKind::InputRequested,
                pb::EventKind::InputProvided,
                pb::EventKind::RunCompleted
            ]
        ),
        [
            pb::EventKind::InputRequested,
            pb::EventKind::InputProvided,
            pb::EventKind::RunCompleted
        ]
    );

    // Unanswered: its timeout hands the asking payload to the fallback,
    // or, without one, fails the run. The timers outlive a broker too.
    let mut ids = Vec::new();
    for (id, fallback) in [("falls-back", Some("standby")), ("times-out", None)] {
        let run = client
            .start_run(RunConfig::new("gail").id(id))
            .await
            .expect("start");
        client
            .handoff(Handoff::to(&run.id, "asker", &note(id, 3)).expect("handoff"))
            .await
            .expect("to asker");
        let d = next_within(&mut asker, Duration::from_secs(5))
            .await
            .expect("delivery");
        d.await_input("Anyone?", None, Duration::from_secs(2), fallback)
            .await
            .expect("await");
        ids.push(run.id);
    }
    drop(asker);
    second.kill9().await;
    let third = handoff_tests::BrokerProcess::spawn(BIN, nats.url(), &[]).await;
    let client = third.client().await;
    let mut standby_again = client.subscribe("standby", "s2", 1).await.expect("standby");
    let fell_back = next_within(&mut standby_again, Duration::from_secs(15))
        .await
        .expect("the fallback gets the asking payload");
    let got: handoff_tests::Note = fell_back.payload().expect("note");
    assert_eq!(got.text, "falls-back");
    assert_eq!(fell_back.run_id(), ids[0]);
    let failed = run_until(&client, &ids[1], |r| {
        r.status == pb::RunStatus::Failed as i32
    })
    .await;
    assert_eq!(failed.status, pb::RunStatus::Failed as i32);
    assert!(
        failed.failure.contains("not answered in time"),
        "{}",
        failed.failure
    );
    for id in &ids {
        let timeline = client.get_run(id).await.expect("run").timeline;
        assert_eq!(count(&timeline, pb::EventKind::InputTimedOut), 1, "{id}");
    }
}

#[tokio::test]
async fn the_operate_calls_refuse_who_may_not_make_them() {
    let s = Secured::start(Duration::from_secs(5), |_| {}).await;
    let admin = &s.admin;
    admin
        .register_agent(AgentConfig::new("flaky").max_attempts(1))
        .await
        .expect("register");
    let run = admin
        .start_run(RunConfig::new("hank").id("guarded"))
        .await
        .expect("start");
    let (sent, letter, _flaky) = dead_letter(admin, &run.id, "flaky").await;
    // A second run, waiting for input.
    let asking_run = admin
        .start_run(RunConfig::new("hank").id("guarded-input"))
        .await
        .expect("start");
    admin
        .handoff(Handoff::to(&asking_run.id, "worker", &note("ask", 2)).expect("handoff"))
        .await
        .expect("handoff");
    let mut worker = admin.subscribe("worker", "w1", 1).await.expect("worker");
    let asking = next_within(&mut worker, Duration::from_secs(5))
        .await
        .expect("delivery");

    let (reader, _) = s
        .principal("reader", &[(pb::GrantAction::Read, "", false)])
        .await;
    let (nobody, _) = s
        .principal("nobody", &[(pb::GrantAction::SendAs, "planner", false)])
        .await;
    // Waiting for input needs the delivery's agent.
    refused(
        nobody
            .raw()
            .await_input(pb::AwaitInputRequest {
                delivery_id: asking.id().to_string(),
                prompt: "mine now?".to_string(),
                timeout: Some(prost_types::Duration {
                    seconds: 60,
                    nanos: 0,
                }),
                ..Default::default()
            })
            .await
            .map_err(handoff_client::Error::from),
        Code::PermissionDenied,
        "NOT_GRANTED",
    );
    let request = asking
        .await_input("Which?", None, Duration::from_secs(600), None)
        .await
        .expect("await");

    // Without any right to the run, it does not exist; with `read`, acting
    // is not granted.
    refused(
        nobody.get_handoff(&sent.handoff_id, "").await,
        Code::NotFound,
        "HANDOFF_NOT_FOUND",
    );
    refused(
        nobody.get_handoff(&sent.handoff_id, &run.id).await,
        Code::NotFound,
        "RUN_NOT_FOUND",
    );
    reader
        .get_handoff(&sent.handoff_id, "")
        .await
        .expect("a reader reads it");
    for (who, code, reason) in [
        (&nobody, Code::NotFound, "RUN_NOT_FOUND"),
        (&reader, Code::PermissionDenied, "NOT_GRANTED"),
    ] {
        refused(
            who.redrive_dead_letter(letter.sequence, None).await,
            code,
            if reason == "RUN_NOT_FOUND" {
                "DEAD_LETTER_NOT_FOUND"
            } else {
                reason
            },
        );
        refused(
            who.fork_run(
                &run.id,
                0,
                None,
                Handoff::to("", "worker", &note("fork", 3)).expect("handoff"),
            )
            .await,
            code,
            reason,
        );
        refused(
            who.provide_input(&asking_run.id, &request.id, &note("answer", 4))
                .await,
            code,
            reason,
        );
        refused(who.cancel_run(&asking_run.id, "").await, code, reason);
    }
    // Nothing changed: the letter is still there to redrive, the request
    // still waits.
    let still = admin.get_run(&asking_run.id).await.expect("run");
    assert_eq!(still.run.expect("run").waiting.len(), 1);
    let timeline = admin.get_run(&run.id).await.expect("run").timeline;
    assert_eq!(count(&timeline, pb::EventKind::RunForked), 0);
    assert_eq!(count(&timeline, pb::EventKind::HandoffRedriven), 0);
    admin
        .redrive_dead_letter(letter.sequence, Some("worker"))
        .await
        .expect("the owner's right redrives it");
}
