//! A run belongs to its owner: only the owner, or an agent working in the
//! run through a live delivery it receives, acts in it; a delivery id is a
//! capability only while its lease lives and only in the one encoding the
//! broker issues; open streams stop as soon as their credentials do; and
//! calls without credentials cost a counter, never a stored event. Against
//! real brokers (two replicas where it matters) and `nats-server`. Every
//! refusal is checked by code and `ErrorInfo.reason`, and "nothing
//! changed" by what the broker and JetStream hold: the run's timeline, its
//! state revision, its barriers, the inboxes and the events stream.

use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use handoff_client::{
    pb, AgentConfig, Client, ContractSpec, Delivery, Error, Handoff, JoinMode, RunConfig,
    StateDelta, Subscription, WatchFilter,
};
use handoff_proto::{demo::Subtask, DEMO_FILE_DESCRIPTOR_SET};
use handoff_tests::{
    deliveries_of, events_until, inbox, kinds, next_within, note, scrape_parsed,
    secured::{connect, count, decode_token, id_bytes, id_of, refused, Secured, BOOTSTRAP},
    timeline_when, Broker,
};
use handoffd::store::jetstream::EVENTS_STREAM;
use tonic::Code;

use pb::GrantAction::{Own, Read, ReceiveAs, SendAs};

/// A run id no run has.
const MISSING_RUN: &str = "0190f0e2-dead-7000-8000-00000000beef";

/// A timeline as (sequence, kind) pairs: what "the same events" compares.
fn events_of(timeline: &[pb::Event]) -> Vec<(u64, i32)> {
    timeline.iter().map(|e| (e.sequence, e.kind)).collect()
}

/// The events stream, read from NATS rather than through the broker.
async fn events_stream(nats_url: &str) -> async_nats::jetstream::stream::Stream {
    let client = async_nats::connect(nats_url)
        .await
        .expect("connect to NATS");
    async_nats::jetstream::new(client)
        .get_stream(EVENTS_STREAM)
        .await
        .expect("the events stream")
}

/// Messages in HANDOFF_EVENTS.
async fn stored_events(nats_url: &str) -> u64 {
    events_stream(nats_url)
        .await
        .get_info()
        .await
        .expect("events stream info")
        .state
        .messages
}

/// Messages in HANDOFF_EVENTS on subjects matching `filter`.
async fn stored_events_on(nats_url: &str, filter: &str) -> u64 {
    let stream = events_stream(nats_url).await;
    let mut subjects = stream
        .info_with_subjects(filter)
        .await
        .expect("events subjects");
    let mut n = 0;
    while let Some(entry) = subjects.next().await {
        n += entry.expect("events subject count").1 as u64;
    }
    n
}

/// `handoff.v1.events._.access_denied`: where refusals of authenticated
/// principals are published.
const DENIALS: &str = "handoff.v1.events._.access_denied";

/// Waits (at most 5 s) until `want` denials are stored, and checks that
/// there are no more.
async fn denials_reach(nats_url: &str, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n = stored_events_on(nats_url, DENIALS).await;
        assert!(n <= want, "{n} access_denied events on run `_`, not {want}");
        if n == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{n} access_denied events on run `_` after 5 s, not {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The HANDOFF_EVENTS message count once it stopped moving (the same for
/// 300 ms; the outbox publishes asynchronously).
async fn quiet_events(nats_url: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = stored_events(nats_url).await;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = stored_events(nats_url).await;
        if now == last {
            return now;
        }
        assert!(Instant::now() < deadline, "the events stream never settled");
        last = now;
    }
}

/// An open barrier spec: branches `a` and `b` released to `planner`.
fn barrier_spec(run: &str, barrier_id: &str) -> pb::BarrierSpec {
    pb::BarrierSpec {
        run_id: run.to_string(),
        barrier_id: barrier_id.to_string(),
        branch_keys: vec!["a".into(), "b".into()],
        mode: pb::BarrierMode::All as i32,
        target_agent: "planner".into(),
        ..Default::default()
    }
}

/// Every way of acting in run `run` that the test principals try: a final
/// result, a handoff with a state delta, a branch result to `barrier`, a
/// fan-out, an OpenBarrier and a plain handoff to `worker`.
async fn act_in(c: &Client, run: &str, barrier: &str) -> Vec<(&'static str, Result<(), Error>)> {
    let final_result = c
        .handoff(
            Handoff::final_result(run, &note("done", 1))
                .expect("final")
                .from_agent("planner"),
        )
        .await
        .map(drop);
    let with_delta = c
        .handoff(
            Handoff::to(run, "worker", &note("with a delta", 2))
                .expect("handoff")
                .from_agent("planner")
                .state_delta(StateDelta::new().set("topic", "hijacked")),
        )
        .await
        .map(drop);
    let branch = c
        .handoff(
            Handoff::to_barrier(run, barrier, "a", &note("branch a", 3))
                .expect("branch")
                .from_agent("worker"),
        )
        .await
        .map(drop);
    let fan_out = c
        .fan_out(run, "worker", [note("x", 1), note("y", 2)])
        .keys(["x", "y"])
        .barrier_id("fanned")
        .from_agent("planner")
        .join("planner", JoinMode::All)
        .await
        .map(drop);
    let open_barrier = c
        .raw()
        .open_barrier(pb::OpenBarrierRequest {
            barrier: Some(barrier_spec(run, "opened-by-a-stranger")),
        })
        .await
        .map(drop)
        .map_err(Error::from);
    let handoff = c
        .handoff(
            Handoff::to(run, "worker", &note("task", 4))
                .expect("handoff")
                .from_agent("planner"),
        )
        .await
        .map(drop);
    vec![
        ("final result", final_result),
        ("handoff with a state delta", with_delta),
        ("branch result", branch),
        ("fan-out", fan_out),
        ("open barrier", open_barrier),
        ("handoff to worker", handoff),
    ]
}

/// The run as the admin sees it: status, latest state revision, the
/// barrier and the timeline.
async fn snapshot(
    s: &Secured,
    run: &str,
    barrier: &str,
) -> (i32, u64, pb::Barrier, Vec<(u64, i32)>) {
    let got = s.admin.get_run(run).await.expect("run");
    let status = got.run.expect("run").status;
    let revision = s
        .admin
        .get_state(run, 0)
        .await
        .expect("state")
        .latest_revision;
    let barrier = s.admin.get_barrier(run, barrier).await.expect("barrier");
    (status, revision, barrier, events_of(&got.timeline))
}

// ------------------------------------------------------------ 1 and 2

#[tokio::test]
async fn sending_as_agents_is_no_right_to_act_in_another_owners_run() {
    let s = Secured::start(Duration::from_secs(10), |_| {}).await;
    let (stranger, _) = s
        .principal(
            "stranger",
            &[
                (SendAs, "planner", false),
                (SendAs, "worker", false),
                (ReceiveAs, "worker", false),
            ],
        )
        .await;
    let run = s
        .admin
        .start_run(RunConfig::new("alice").state("topic", "ownership"))
        .await
        .expect("run")
        .id;
    let opened = s
        .admin
        .raw()
        .open_barrier(pb::OpenBarrierRequest {
            barrier: Some(barrier_spec(&run, "join-1")),
        })
        .await
        .expect("barrier")
        .into_inner();
    assert!(opened.created);
    timeline_when(&s.admin, &run, |t| {
        count(t, pb::EventKind::RunStarted) == 1 && count(t, pb::EventKind::BarrierOpened) == 1
    })
    .await;
    let before = snapshot(&s, &run, "join-1").await;
    assert_eq!(before.0, pb::RunStatus::Running as i32);
    assert_eq!(before.1, 1, "seeded: revision 1");
    let run_subjects = format!("handoff.v1.events.{run}.>");
    let run_events = stored_events_on(s.nats.url(), &run_subjects).await;
    let denials = stored_events_on(s.nats.url(), DENIALS).await;
    let mut sub = stranger.subscribe("worker", "s1", 4).await.expect("sub");

    for (what, result) in act_in(&stranger, &run, "join-1").await {
        let err = result.expect_err(what);
        assert_eq!(err.code(), Some(Code::NotFound), "{what}: {err}");
        assert_eq!(err.reason(), Some("RUN_NOT_FOUND"), "{what}: {err}");
    }

    // Refusals are announced on run `_`, never in the run's timeline.
    // One per refusal of the existing run (6, under the rate limit of 10
    // per principal); a missing run is refused before anyone is named.
    denials_reach(s.nats.url(), denials + 6).await;
    assert_eq!(
        stored_events_on(s.nats.url(), &run_subjects).await,
        run_events,
        "nothing published on the run's subjects"
    );
    let after = snapshot(&s, &run, "join-1").await;
    assert_eq!(after.0, pb::RunStatus::Running as i32, "status unchanged");
    assert_eq!(after.1, 1, "state revision unchanged");
    assert_eq!(after.2.state, pb::BarrierState::Open as i32);
    assert_eq!(after.2.arrived, 0, "no arrival");
    assert!(after.2.branches.is_empty(), "{:?}", after.2.branches);
    assert_eq!(after.2, before.2, "the barrier is as it was");
    assert_eq!(after.3, before.3, "the same events as before");
    refused(
        s.admin.get_barrier(&run, "opened-by-a-stranger").await,
        Code::NotFound,
        "BARRIER_NOT_FOUND",
    );
    refused(
        s.admin.get_barrier(&run, "fanned").await,
        Code::NotFound,
        "BARRIER_NOT_FOUND",
    );
    let worker = inbox(s.nats.url(), "worker").await;
    assert_eq!(worker.stored, 0, "the worker's inbox holds nothing");
    assert_eq!(inbox(s.nats.url(), "planner").await.stored, 0);
    assert!(
        next_within(&mut sub, Duration::from_millis(500))
            .await
            .is_none(),
        "the stranger's subscription got nothing"
    );

    // A run that does not exist answers the same.
    for (what, result) in act_in(&stranger, MISSING_RUN, "join-1").await {
        let err = result.expect_err(what);
        assert_eq!(err.code(), Some(Code::NotFound), "{what}: {err}");
        assert_eq!(err.reason(), Some("RUN_NOT_FOUND"), "{what}: {err}");
    }
    assert_eq!(inbox(s.nats.url(), "worker").await.stored, 0);
}

#[tokio::test]
async fn a_stranger_learns_nothing_of_the_targets_contract() {
    let s = Secured::start(Duration::from_secs(10), |_| {}).await;
    s.admin
        .register_contract(ContractSpec::of::<Subtask>(DEMO_FILE_DESCRIPTOR_SET))
        .await
        .expect("contract");
    s.admin
        .register_agent(
            AgentConfig::new("worker")
                .lease(Duration::from_secs(10))
                .accepts::<Subtask>(),
        )
        .await
        .expect("worker accepts Subtask");
    let same = [
        (SendAs, "planner", false),
        (SendAs, "worker", false),
        (ReceiveAs, "worker", false),
    ];
    let (stranger, _) = s.principal("stranger", &same).await;
    let mut with_read = same.to_vec();
    with_read.push((Read, "", false));
    let (auditor, _) = s.principal("auditor", &with_read).await;
    let run = s
        .admin
        .start_run(RunConfig::new("alice"))
        .await
        .expect("run")
        .id;
    let before = events_of(
        &timeline_when(&s.admin, &run, |t| count(t, pb::EventKind::RunStarted) == 1).await,
    );
    let run_subjects = format!("handoff.v1.events.{run}.>");
    let run_events = stored_events_on(s.nats.url(), &run_subjects).await;
    let denials = stored_events_on(s.nats.url(), DENIALS).await;

    let valid = Subtask {
        index: 0,
        of: 1,
        instruction: "summarise".into(),
        sources: vec![],
    };
    let breaking = Handoff::to(&run, "worker", &note("not a Subtask", 1))
        .expect("handoff")
        .from_agent("planner");
    let fitting = Handoff::to(&run, "worker", &valid)
        .expect("handoff")
        .from_agent("planner");
    // Without read: as if the run did not exist, whatever the payload.
    let a = refused(
        stranger.handoff(breaking.clone()).await,
        Code::NotFound,
        "RUN_NOT_FOUND",
    );
    let b = refused(
        stranger.handoff(fitting.clone()).await,
        Code::NotFound,
        "RUN_NOT_FOUND",
    );
    assert_eq!(a.kind(), b.kind());
    // With read: not granted, whatever the payload.
    refused(
        auditor.handoff(breaking.clone()).await,
        Code::PermissionDenied,
        "NOT_GRANTED",
    );
    refused(
        auditor.handoff(fitting).await,
        Code::PermissionDenied,
        "NOT_GRANTED",
    );

    denials_reach(s.nats.url(), denials + 4).await;
    let after = s.admin.get_run(&run).await.expect("run").timeline;
    assert_eq!(count(&after, pb::EventKind::ContractRejected), 0);
    assert_eq!(
        events_of(&after),
        before,
        "no new event: {:?}",
        kinds(&after)
    );
    assert_eq!(
        stored_events_on(s.nats.url(), &run_subjects).await,
        run_events
    );
    assert_eq!(inbox(s.nats.url(), "worker").await.stored, 0);

    // The contract is in force: the run's owner sending the same payload
    // is refused by it, and that is recorded.
    let err = s
        .admin
        .handoff(breaking)
        .await
        .expect_err("the contract refuses a Note");
    assert_eq!(err.code(), Some(Code::FailedPrecondition), "{err}");
    timeline_when(&s.admin, &run, |t| {
        count(t, pb::EventKind::ContractRejected) == 1
    })
    .await;
}

// ------------------------------------------------------------ 3

/// Reads `sub` until it ends with an error (panics after 5 s, or if a
/// delivery comes first): the error and when it came.
async fn subscription_end(sub: &mut Subscription, since: Instant) -> (Error, Duration) {
    match tokio::time::timeout(Duration::from_secs(5), sub.next_delivery()).await {
        Ok(Some(Err(e))) => (e, since.elapsed()),
        Ok(Some(Ok(d))) => panic!("a delivery instead of the end: {d:?}"),
        Ok(None) => panic!("the subscription ended without an error"),
        Err(_) => panic!("the subscription did not end within 5 s"),
    }
}

/// Reads `watch` until it ends with an error (panics after 5 s): the error,
/// when it came, and the events before it.
async fn watch_end<S>(watch: &mut S, since: Instant) -> (Error, Duration, Vec<pb::Event>)
where
    S: Stream<Item = handoff_client::Result<pb::Event>> + Unpin,
{
    let deadline = since + Duration::from_secs(5);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, watch.next()).await {
            Ok(Some(Ok(e))) => seen.push(e),
            Ok(Some(Err(e))) => return (e, since.elapsed(), seen),
            Ok(None) => panic!("the watch ended without an error"),
            Err(_) => panic!("the watch did not end within 5 s; seen {:?}", kinds(&seen)),
        }
    }
}

/// One scenario of the stream test: `name` subscribes as `agent` and
/// watches everything through replica `b`; `cut` (made through the first
/// replica) takes its credentials away; both streams must end with
/// `code`/`reason` within 2 s, and stay ended.
async fn streams_end_when(
    s: &Secured,
    b: &Broker,
    name: &str,
    agent: &str,
    cut: impl AsyncFnOnce(&pb::ApiToken),
    code: Code,
    reason: &str,
) {
    let (secret, token) = s
        .principal_token(name, &[(ReceiveAs, agent, false), (Read, "", false)])
        .await;
    let on_b = connect(b, Some(&secret)).await;
    let mut sub = on_b.subscribe(agent, "on-b", 1).await.expect("sub on B");
    let mut watch = on_b.watch(WatchFilter::all()).await.expect("watch on B");
    let run = s
        .admin
        .start_run(RunConfig::new("ops"))
        .await
        .expect("run")
        .id;
    s.admin
        .handoff(Handoff::to(&run, agent, &note("held", 1)).expect("handoff"))
        .await
        .expect("task");
    let held = next_within(&mut sub, Duration::from_secs(5))
        .await
        .expect("delivered on B");
    let held_id = held.handoff_id().to_string();
    events_until(&mut watch, Duration::from_secs(5), |e| {
        e.kind == pb::EventKind::Delivered as i32 && e.handoff_id == held_id
    })
    .await;

    let start = Instant::now();
    cut(&token).await;
    let made = start.elapsed();
    let ((sub_err, sub_took), (watch_err, watch_took, late)) = tokio::join!(
        subscription_end(&mut sub, start),
        watch_end(&mut watch, start)
    );
    println!(
        "{reason}: the cut took {made:?} on A; on B the subscription ended after {sub_took:?}, \
         the watch after {watch_took:?} (events before its end: {:?})",
        kinds(&late)
    );
    assert_eq!(sub_err.code(), Some(code), "{sub_err}");
    assert_eq!(sub_err.reason(), Some(reason), "{sub_err}");
    assert_eq!(watch_err.code(), Some(code), "{watch_err}");
    assert_eq!(watch_err.reason(), Some(reason), "{watch_err}");
    assert!(sub_took < Duration::from_secs(2), "{sub_took:?}");
    assert!(watch_took < Duration::from_secs(2), "{watch_took:?}");

    // Ended for good: a new handoff for the agent is not delivered to it,
    // and the watch sends nothing more.
    let next = s
        .admin
        .handoff(Handoff::to(&run, agent, &note("after the end", 2)).expect("handoff"))
        .await
        .expect("a handoff after the end");
    assert!(
        tokio::time::timeout(Duration::from_secs(2), sub.next_delivery())
            .await
            .expect("the ended subscription answers at once")
            .is_none(),
        "the ended subscription yields nothing more"
    );
    assert!(
        tokio::time::timeout(Duration::from_secs(2), watch.next())
            .await
            .expect("the ended watch answers at once")
            .is_none(),
        "the ended watch yields nothing more"
    );
    let timeline = timeline_when(&s.admin, &run, |t| {
        t.iter().any(|e| {
            e.kind == pb::EventKind::HandoffAccepted as i32 && e.handoff_id == next.handoff_id
        })
    })
    .await;
    assert_eq!(
        deliveries_of(&timeline, &next.handoff_id),
        0,
        "not delivered"
    );
    let state = inbox(s.nats.url(), agent).await;
    println!("{agent}'s inbox after the end: {state:?}");
    assert!(state.pending >= 1, "the new handoff waits: {state:?}");

    // The delivery held before cannot be settled any more.
    let settled = tokio::time::timeout(Duration::from_secs(20), held.ack())
        .await
        .expect("the ack is answered");
    let err = settled.expect_err("an ack after the end");
    println!(
        "{reason}: ack after the end: kind {:?}, code {:?}, reason {:?}: {err}",
        err.kind(),
        err.code(),
        err.reason()
    );
    assert_eq!(err.kind(), handoff_client::ErrorKind::Closed, "{err}");
    let timeline = s.admin.get_run(&run).await.expect("run").timeline;
    assert_eq!(count(&timeline, pb::EventKind::Acked), 0, "nothing acked");
}

#[tokio::test]
async fn revoked_tokens_and_removed_grants_end_open_streams_on_every_replica_within_2s() {
    let s = Secured::start(Duration::from_secs(30), |_| {}).await;
    let b = s.replica().await;
    streams_end_when(
        &s,
        &b,
        "revoked",
        "worker",
        async |token: &pb::ApiToken| {
            s.admin
                .raw()
                .revoke_token(pb::RevokeTokenRequest {
                    id: token.id.clone(),
                })
                .await
                .expect("revoke through A");
        },
        Code::Unauthenticated,
        "TOKEN_REVOKED",
    )
    .await;
    streams_end_when(
        &s,
        &b,
        "ungranted",
        "planner",
        async |_: &pb::ApiToken| {
            s.put_principal("ungranted", &[(SendAs, "planner", false)])
                .await
        },
        Code::PermissionDenied,
        "NOT_GRANTED",
    )
    .await;
}

// ------------------------------------------------------------ 4

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test]
async fn ten_thousand_calls_with_a_wrong_token_are_counted_not_stored() {
    let s = Secured::start(Duration::from_secs(10), |c| {
        c.metrics_listen = Some("127.0.0.1:0".parse().expect("addr"))
    })
    .await;
    let metrics = s.broker.metrics_addr.expect("metrics endpoint");
    // Some events stored already, so "unchanged" compares a real count.
    s.admin.start_run(RunConfig::new("ops")).await.expect("run");
    let events = quiet_events(s.nats.url()).await;
    assert!(events > 0);
    let rss_before = rss_kib();
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(connect(&s.broker, Some("hot_0000_wrong")).await);
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..20 {
        let client = clients[t % clients.len()].clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..500 {
                let err = client.list_agents().await.expect_err("a wrong token");
                assert_eq!(err.code(), Some(Code::Unauthenticated), "{err}");
                assert_eq!(err.reason(), Some("BAD_CREDENTIALS"), "{err}");
            }
        }));
    }
    for task in tasks {
        task.await.expect("every call refused as BAD_CREDENTIALS");
    }
    let took = started.elapsed();
    let rss_after = rss_kib();
    println!(
        "10000 refused calls in {took:?}; test process RSS {rss_before} kB before, {rss_after} kB after"
    );

    let exposition = scrape_parsed(metrics).await;
    let unauthenticated = exposition.value(
        "handoff_unauthenticated_total",
        &[("reason", "BAD_CREDENTIALS"), ("peer", "127.0.0.1")],
    );
    let denied = exposition.value(
        "handoff_access_denied_total",
        &[("reason", "BAD_CREDENTIALS")],
    );
    println!(
        "handoff_unauthenticated_total{{reason=BAD_CREDENTIALS,peer=127.0.0.1}} = {unauthenticated}, \
         handoff_access_denied_total{{reason=BAD_CREDENTIALS}} = {denied}"
    );
    assert_eq!(unauthenticated, 10_000.0);
    assert_eq!(denied, 10_000.0);
    let events_after = quiet_events(s.nats.url()).await;
    println!("HANDOFF_EVENTS messages: {events} before, {events_after} after");
    assert_eq!(events_after, events, "no refusal was stored as an event");
}

// ------------------------------------------------------------ 5 and 6

/// A complete-and-handoff request from `worker` consuming `consumes`.
fn consuming(run: &str, consumes: &str, target: &str, text: &str) -> Handoff {
    let mut req = Handoff::to(run, target, &note(text, 1))
        .expect("handoff")
        .from_agent("worker")
        .request()
        .clone();
    req.consumes = consumes.to_string();
    Handoff::from_request(req)
}

async fn state_for(c: &Client, run: &str, delivery_id: &str) -> Result<u64, Error> {
    c.raw()
        .get_state(pb::GetStateRequest {
            run_id: run.to_string(),
            revision: 0,
            delivery_id: delivery_id.to_string(),
        })
        .await
        .map(|r| r.into_inner().latest_revision)
        .map_err(Error::from)
}

#[tokio::test]
async fn a_settled_or_outlived_delivery_id_is_no_capability() {
    let s = Secured::start(Duration::from_secs(10), |_| {}).await;
    s.admin
        .register_agent(
            AgentConfig::new("courier")
                .lease(Duration::from_secs(1))
                .max_attempts(10),
        )
        .await
        .expect("courier");
    let (worker_svc, _) = s
        .principal(
            "worker-svc",
            &[
                (ReceiveAs, "worker", false),
                (ReceiveAs, "courier", false),
                (SendAs, "worker", false),
            ],
        )
        .await;
    let run = s
        .admin
        .start_run(RunConfig::new("ops").state("topic", "capabilities"))
        .await
        .expect("run")
        .id;
    let mut sub = worker_svc.subscribe("worker", "w1", 1).await.expect("sub");

    // Acked by Delivery::ack.
    s.admin
        .handoff(Handoff::to(&run, "worker", &note("first", 1)).expect("handoff"))
        .await
        .expect("task 1");
    let d1 = next_within(&mut sub, Duration::from_secs(5))
        .await
        .expect("d1");
    assert_eq!(
        worker_svc
            .get_state_for(&d1)
            .await
            .expect("a live delivery reads")
            .latest_revision,
        1
    );
    d1.ack().await.expect("ack");
    refused(
        worker_svc.get_state_for(&d1).await,
        Code::FailedPrecondition,
        "ALREADY_SETTLED",
    );
    refused(
        worker_svc
            .handoff(consuming(
                &run,
                d1.id(),
                "planner",
                "from an acked delivery",
            ))
            .await,
        Code::FailedPrecondition,
        "ALREADY_SETTLED",
    );
    assert_eq!(
        inbox(s.nats.url(), "planner").await.stored,
        0,
        "nothing stored"
    );

    // Settled by the complete-and-handoff that consumed it.
    s.admin
        .handoff(Handoff::to(&run, "worker", &note("second", 2)).expect("handoff"))
        .await
        .expect("task 2");
    let d2 = next_within(&mut sub, Duration::from_secs(5))
        .await
        .expect("d2");
    let done = consuming(&run, d2.id(), "planner", "the result");
    let first = worker_svc
        .handoff(done.clone())
        .await
        .expect("complete-and-handoff");
    assert!(!first.duplicate);
    assert_eq!(inbox(s.nats.url(), "planner").await.stored, 1);
    let worker_stored = inbox(s.nats.url(), "worker").await.stored;
    refused(
        worker_svc.get_state_for(&d2).await,
        Code::FailedPrecondition,
        "ALREADY_SETTLED",
    );
    // To another target: refused, naming the cause (the delivery went
    // to planner), and nothing is stored.
    refused(
        worker_svc
            .handoff(consuming(&run, d2.id(), "worker", "to another target"))
            .await,
        Code::AlreadyExists,
        "ROLE_CONFUSION",
    );
    // To the same target with other content: a redo of the step, which
    // the broker answers with what the delivery stored (the README: "a
    // redo of a complete-and-handoff ..., after any delay and whatever its
    // content, is answered with the first receipts"), storing nothing.
    let redo = worker_svc
        .handoff(consuming(&run, d2.id(), "planner", "other content"))
        .await
        .expect("a redo with other content");
    assert!(redo.duplicate);
    assert_eq!(redo.handoff_id, first.handoff_id);
    // The exact request again (its answer lost): its first receipt.
    let again = worker_svc.handoff(done).await.expect("the retry");
    assert!(again.duplicate);
    assert_eq!(again.handoff_id, first.handoff_id);
    assert_eq!(again.sequence, first.sequence);
    assert_eq!(
        inbox(s.nats.url(), "planner").await.stored,
        1,
        "stored once"
    );
    assert_eq!(inbox(s.nats.url(), "worker").await.stored, worker_stored);

    // Outlived: its lease passed without a settlement.
    let mut couriers = worker_svc
        .subscribe("courier", "c1", 1)
        .await
        .expect("courier sub");
    s.admin
        .handoff(Handoff::to(&run, "courier", &note("third", 3)).expect("handoff"))
        .await
        .expect("task 3");
    let d3 = next_within(&mut couriers, Duration::from_secs(5))
        .await
        .expect("d3");
    worker_svc
        .get_state_for(&d3)
        .await
        .expect("a live delivery reads");
    let deadline = Instant::now() + Duration::from_secs(5);
    let outlived = loop {
        match worker_svc.get_state_for(&d3).await {
            Ok(_) => {
                assert!(Instant::now() < deadline, "d3 still reads after 5 s");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => break e,
        }
    };
    assert_eq!(
        outlived.code(),
        Some(Code::FailedPrecondition),
        "{outlived}"
    );
    assert_eq!(outlived.reason(), Some("LEASE_SUPERSEDED"), "{outlived}");
    let planner_stored = inbox(s.nats.url(), "planner").await.stored;
    refused(
        worker_svc
            .handoff(consuming(&run, d3.id(), "planner", "too late"))
            .await,
        Code::FailedPrecondition,
        "LEASE_SUPERSEDED",
    );
    assert_eq!(inbox(s.nats.url(), "planner").await.stored, planner_stored);
    // Its successor (the redelivery) still works.
    let d3b = next_within(&mut couriers, Duration::from_secs(5))
        .await
        .expect("the redelivery");
    assert_eq!(d3b.handoff_id(), d3.handoff_id());
    assert!(d3b.attempt() > d3.attempt());
    d3b.ack().await.expect("the successor settles");
}

#[tokio::test]
async fn a_delivery_id_in_another_encoding_is_refused_and_the_genuine_one_settles() {
    let s = Secured::start(Duration::from_secs(10), |_| {}).await;
    let (worker_svc, _) = s
        .principal(
            "worker-svc",
            &[(ReceiveAs, "worker", false), (SendAs, "worker", false)],
        )
        .await;
    let run = s
        .admin
        .start_run(RunConfig::new("ops").state("topic", "encodings"))
        .await
        .expect("run")
        .id;
    s.admin
        .handoff(Handoff::to(&run, "worker", &note("task", 1)).expect("handoff"))
        .await
        .expect("task");
    let mut sub = worker_svc.subscribe("worker", "w1", 1).await.expect("sub");
    let d: Delivery = next_within(&mut sub, Duration::from_secs(5))
        .await
        .expect("delivered");
    let genuine = decode_token(d.id());

    // An unknown field (111, varint 1) appended.
    let mut appended = id_bytes(d.id());
    appended.extend_from_slice(&[0xF8, 0x06, 0x01]);
    let appended = id_of(&appended);
    // The same fields in another order: handoff_id first.
    let reordered = {
        use prost::Message as _;
        let head = pb::DeliveryToken {
            handoff_id: genuine.handoff_id.clone(),
            ..Default::default()
        };
        let tail = pb::DeliveryToken {
            handoff_id: String::new(),
            ..genuine.clone()
        };
        let mut bytes = head.encode_to_vec();
        bytes.extend(tail.encode_to_vec());
        id_of(&bytes)
    };
    for (what, id) in [("appended", &appended), ("reordered", &reordered)] {
        assert_ne!(id.as_str(), d.id(), "{what}");
        assert_eq!(decode_token(id), genuine, "{what}: the same token's fields");
        refused(
            sub.ack_id(id).await,
            Code::InvalidArgument,
            "BAD_DELIVERY_ID",
        );
        refused(
            state_for(&worker_svc, &run, id).await,
            Code::InvalidArgument,
            "BAD_DELIVERY_ID",
        );
        refused(
            worker_svc
                .handoff(consuming(&run, id, "planner", what))
                .await,
            Code::InvalidArgument,
            "BAD_DELIVERY_ID",
        );
    }
    let timeline = s.admin.get_run(&run).await.expect("run").timeline;
    assert_eq!(count(&timeline, pb::EventKind::Acked), 0);
    assert_eq!(inbox(s.nats.url(), "planner").await.stored, 0);

    assert_eq!(
        state_for(&worker_svc, &run, d.id())
            .await
            .expect("the genuine id reads"),
        1
    );
    d.ack().await.expect("the genuine id settles");
    timeline_when(&s.admin, &run, |t| count(t, pb::EventKind::Acked) == 1).await;
    let state = inbox(s.nats.url(), "worker").await;
    assert_eq!((state.pending, state.unacked), (0, 0), "settled once");
}

// ------------------------------------------------------------ 7

/// The refusal of a Watch of `run`: at the call, or as the stream's first
/// item.
async fn watch_refusal(c: &Client, run: &str) -> Result<(), Error> {
    let mut stream = c.watch(WatchFilter::all().run(run)).await?;
    match tokio::time::timeout(Duration::from_secs(2), stream.next()).await {
        Ok(Some(Err(e))) => Err(e),
        Ok(Some(Ok(e))) => panic!("an event of a run the caller may not see: {e:?}"),
        Ok(None) => panic!("the watch ended without an answer"),
        Err(_) => Ok(()),
    }
}

#[tokio::test]
async fn foreign_and_missing_runs_answer_alike() {
    let s = Secured::start(Duration::from_secs(10), |_| {}).await;
    let (bob, _) = s.principal("bob", &[(Own, "bob", false)]).await;
    let run = s
        .admin
        .start_run(RunConfig::new("alice").state("topic", "private"))
        .await
        .expect("run")
        .id;
    s.admin
        .raw()
        .open_barrier(pb::OpenBarrierRequest {
            barrier: Some(barrier_spec(&run, "join-1")),
        })
        .await
        .expect("barrier");
    // Bob sees his own run.
    let own = bob
        .start_run(RunConfig::new("bob").state("topic", "mine"))
        .await
        .expect("bob's run")
        .id;
    bob.get_run(&own).await.expect("his run");
    bob.get_state(&own, 0).await.expect("his state");

    for id in [run.as_str(), MISSING_RUN] {
        let which = if id == run { "foreign" } else { "missing" };
        let answers = [
            ("GetRun", bob.get_run(id).await.map(drop)),
            ("GetState", bob.get_state(id, 0).await.map(drop)),
            ("GetBarrier", bob.get_barrier(id, "join-1").await.map(drop)),
            ("Watch", watch_refusal(&bob, id).await),
            (
                "run export",
                match handoffctl::export::export(&bob, id).await {
                    Ok(_) => Ok(()),
                    Err(handoffctl::export::ExportError::Broker(e)) => Err(e),
                    Err(other) => panic!("{which} run export: {other}"),
                },
            ),
        ];
        for (call, answer) in answers {
            let err = answer.expect_err(call);
            assert_eq!(err.code(), Some(Code::NotFound), "{which} {call}: {err}");
            assert_eq!(err.reason(), Some("RUN_NOT_FOUND"), "{which} {call}: {err}");
        }
    }
}

// ------------------------------------------------------------ 8

#[tokio::test]
async fn a_rotated_out_key_is_refused_by_a_replica_that_had_cached_it() {
    let s = Secured::start(Duration::from_secs(30), |_| {}).await;
    let b = s.replica().await;
    let (secret, _) = s
        .principal_token("worker-svc", &[(ReceiveAs, "worker", false)])
        .await;
    let on_a = connect(&s.broker, Some(&secret)).await;
    let on_b = connect(&b, Some(&secret)).await;
    let run = s
        .admin
        .start_run(RunConfig::new("ops").state("topic", "keys"))
        .await
        .expect("run")
        .id;
    s.admin
        .handoff(Handoff::to(&run, "worker", &note("task", 1)).expect("handoff"))
        .await
        .expect("task");
    let mut sub = on_a.subscribe("worker", "w1", 1).await.expect("sub on A");
    let d = next_within(&mut sub, Duration::from_secs(5))
        .await
        .expect("delivered");
    let original_key = decode_token(d.id()).key_id;
    // B verifies it (and holds the keys it verified it with).
    assert_eq!(
        state_for(&on_b, &run, d.id()).await.expect("B verifies it"),
        1
    );

    let mut raw = s.admin.raw();
    for _ in 0..2 {
        raw.rotate_signing_key(pb::RotateSigningKeyRequest {})
            .await
            .expect("rotate on A");
    }
    // Two rotations: the original key is one of the last three.
    state_for(&on_b, &run, d.id())
        .await
        .expect("still verifies after two rotations");
    let third = raw
        .rotate_signing_key(pb::RotateSigningKeyRequest {})
        .await
        .expect("rotate on A")
        .into_inner();
    assert_ne!(third.key_id, original_key);
    let start = Instant::now();
    let err = loop {
        match state_for(&on_b, &run, d.id()).await {
            Ok(_) => {
                assert!(
                    start.elapsed() < Duration::from_secs(2),
                    "B still accepts the rotated-out key after 2 s"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => break e,
        }
    };
    println!(
        "B refused the rotated-out key {:?} after the third rotation",
        start.elapsed()
    );
    assert_eq!(err.code(), Some(Code::PermissionDenied), "{err}");
    assert_eq!(err.reason(), Some("BAD_SIGNATURE"), "{err}");
    // A refuses it too, settlement included.
    refused(
        state_for(&on_a, &run, d.id()).await,
        Code::PermissionDenied,
        "BAD_SIGNATURE",
    );
    refused(d.ack().await, Code::PermissionDenied, "BAD_SIGNATURE");
}

// ------------------------------------------------------------ bootstrap

#[tokio::test]
async fn the_bootstrap_token_is_disabled_by_an_admin_token_for_good_on_every_replica() {
    let s = Secured::start(Duration::from_secs(10), |_| {}).await;
    let b = s.replica().await;
    let boot_on_b = connect(&b, Some(BOOTSTRAP)).await;
    boot_on_b
        .list_agents()
        .await
        .expect("the bootstrap token works on B");
    // It cannot disable itself: that would leave no administrator.
    refused(
        s.admin
            .raw()
            .revoke_token(pb::RevokeTokenRequest {
                id: "bootstrap".into(),
            })
            .await
            .map_err(Error::from),
        Code::FailedPrecondition,
        "BOOTSTRAP_IN_USE",
    );
    s.admin.list_agents().await.expect("still works");
    // An admin token disables it, on every replica.
    let (ops, _) = s
        .principal("ops", &[(pb::GrantAction::Admin, "", false)])
        .await;
    ops.raw()
        .revoke_token(pb::RevokeTokenRequest {
            id: "bootstrap".into(),
        })
        .await
        .expect("an admin token disables the bootstrap token");
    refused(
        s.admin.list_agents().await,
        Code::Unauthenticated,
        "TOKEN_REVOKED",
    );
    let start = Instant::now();
    loop {
        match boot_on_b.list_agents().await {
            Ok(_) => {
                assert!(
                    start.elapsed() < Duration::from_secs(2),
                    "B still takes the bootstrap token after 2 s"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => {
                assert_eq!(e.code(), Some(Code::Unauthenticated), "{e}");
                assert_eq!(e.reason(), Some("TOKEN_REVOKED"), "{e}");
                break;
            }
        }
    }
    // For good: a replica started afterwards, with the same token file,
    // refuses it too; the admin token goes on working.
    b.stop().await;
    let c = s.replica().await;
    refused(
        connect(&c, Some(BOOTSTRAP)).await.list_agents().await,
        Code::Unauthenticated,
        "TOKEN_REVOKED",
    );
    ops.raw()
        .list_principals(pb::ListPrincipalsRequest {})
        .await
        .expect("the admin token works");
}
