//! Runs: reject and the owner, ordered and resumable watch, depth, pinned
//! context, final results and deadlines.

use std::time::Duration;

use handoff_client::{pb, AgentConfig, ErrorKind, Handoff, RunConfig, WatchFilter};
use handoff_tests::{events_until, kinds, next_within, note, stack, Note};

#[tokio::test]
async fn reject_fails_the_run_and_watch_resumes_without_gaps_or_repeats() {
    let (_nats, _broker, client) = stack(|_| {}).await;
    client
        .register_agent(AgentConfig::new("worker"))
        .await
        .unwrap();
    let run = client
        .start_run(RunConfig::new("carol").id("run-reject"))
        .await
        .unwrap();
    let mut owner = client
        .watch(
            WatchFilter::all()
                .owner("carol")
                .kinds([pb::EventKind::RunFailed]),
        )
        .await
        .unwrap();
    let mut sub = client.subscribe("worker", "w", 1).await.unwrap();
    for i in 0..3 {
        client
            .handoff(
                Handoff::to(&run.id, "worker", &note("t", i))
                    .unwrap()
                    .idempotency_key(format!("k{i}")),
            )
            .await
            .unwrap();
    }
    for _ in 0..2 {
        next_within(&mut sub, Duration::from_secs(5))
            .await
            .unwrap()
            .ack()
            .await
            .unwrap();
    }
    let last = next_within(&mut sub, Duration::from_secs(5)).await.unwrap();
    last.reject("cannot parse the report").await.unwrap();
    let failed = events_until(&mut owner, Duration::from_secs(5), |_| true).await;
    assert_eq!(failed[0].run_id, "run-reject");
    assert!(failed[0].reason.contains("cannot parse the report"));
    let view = client.get_run(&run.id).await.unwrap();
    assert_eq!(view.run.unwrap().status, pb::RunStatus::Failed as i32);
    // Handing off to a failed run is refused.
    let err = client
        .handoff(Handoff::to(&run.id, "worker", &note("late", 9)).unwrap())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);

    // The whole timeline, in order, from a watch started at sequence 1.
    let mut all = client
        .watch(WatchFilter::all().run(&run.id).from_sequence(1))
        .await
        .unwrap();
    let seen = events_until(&mut all, Duration::from_secs(5), |e| {
        e.kind == pb::EventKind::RunFailed as i32
    })
    .await;
    let seqs: Vec<u64> = seen.iter().map(|e| e.sequence).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "increasing: {seqs:?}");
    let k = kinds(&seen);
    assert_eq!(k.first(), Some(&"run_started"));
    assert_eq!(
        k.iter().filter(|k| **k == "handoff_accepted").count(),
        3,
        "{k:?}"
    );
    assert!(k.contains(&"rejected"), "{k:?}");
    // The timeline GetRun gives is the same sequence.
    let timeline: Vec<u64> = client
        .get_run(&run.id)
        .await
        .unwrap()
        .timeline
        .iter()
        .map(|e| e.sequence)
        .collect();
    assert!(timeline.len() >= seqs.len());
    assert_eq!(&timeline[..seqs.len()], &seqs[..]);
    // Resume from the middle: exactly the suffix, no gap, no repeat.
    let mid = seen.len() / 2;
    let mut resumed = client
        .watch(WatchFilter::all().run(&run.id).from_sequence(seqs[mid]))
        .await
        .unwrap();
    let rest = events_until(&mut resumed, Duration::from_secs(5), |e| {
        e.kind == pb::EventKind::RunFailed as i32
    })
    .await;
    let rest_seqs: Vec<u64> = rest.iter().map(|e| e.sequence).collect();
    assert_eq!(&rest_seqs[..], &seqs[mid..]);
}

#[tokio::test]
async fn depth_grows_by_one_per_hop_and_is_capped() {
    let (_nats, _broker, client) = stack(|_| {}).await;
    for a in ["a", "b", "c", "d"] {
        client.register_agent(AgentConfig::new(a)).await.unwrap();
    }
    let run = client
        .start_run(RunConfig::new("o").max_depth(3))
        .await
        .unwrap();
    let r = client
        .handoff(Handoff::to(&run.id, "a", &note("hop", 1)).unwrap())
        .await
        .unwrap();
    assert_eq!(r.depth, 1);
    let mut next_agent = ["b", "c", "d"].into_iter();
    let mut current = "a";
    for expected in 2..=3 {
        let target = next_agent.next().unwrap();
        let mut sub = client.subscribe(current, "i", 1).await.unwrap();
        let d = next_within(&mut sub, Duration::from_secs(5)).await.unwrap();
        assert_eq!(d.envelope().depth, expected - 1);
        let r = d
            .handoff(Handoff::to("", target, &note("hop", expected)).unwrap())
            .await
            .unwrap();
        assert_eq!(r.depth, expected);
        current = target;
    }
    // The agent at depth 3 may not go deeper than max_depth 3.
    let mut sub = client.subscribe(current, "i", 1).await.unwrap();
    let d = next_within(&mut sub, Duration::from_secs(5)).await.unwrap();
    assert_eq!(d.envelope().depth, 3);
    let err = d
        .handoff(Handoff::to("", "a", &note("too deep", 4)).unwrap())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    assert!(
        err.message().contains("depth 4") && err.message().contains("max_depth 3"),
        "{}",
        err.message()
    );
    // Ending the run is not a hop.
    d.handoff(Handoff::final_result("", &note("done", 0)).unwrap())
        .await
        .unwrap();
    let run = client.get_run(&run.id).await.unwrap().run.unwrap();
    assert_eq!(run.status, pb::RunStatus::Completed as i32);

    let default = client.start_run(RunConfig::new("o")).await.unwrap();
    assert_eq!(default.max_depth, 5, "default max_depth");
}

#[tokio::test]
async fn pinned_context_reaches_every_delivery_unchanged() {
    let (_nats, _broker, client) = stack(|_| {}).await;
    client
        .register_agent(AgentConfig::new("planner"))
        .await
        .unwrap();
    client
        .register_agent(AgentConfig::new("worker"))
        .await
        .unwrap();
    let run = client
        .start_run(
            RunConfig::new("o")
                .ask("Find flights to Lisbon under 300 EUR")
                .pin("locale", "pt-PT"),
        )
        .await
        .unwrap();
    let pinned = run.pinned.clone().unwrap();
    client
        .handoff(Handoff::to(&run.id, "planner", &note("plan", 0)).unwrap())
        .await
        .unwrap();
    let mut planner = client.subscribe("planner", "p", 1).await.unwrap();
    let d = next_within(&mut planner, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(d.pinned(), &pinned);
    // A summary that drops the ask cannot drop it from the run.
    d.handoff(Handoff::to("", "worker", &note("flights", 1)).unwrap())
        .await
        .unwrap();
    let mut worker = client.subscribe("worker", "w", 1).await.unwrap();
    let d = next_within(&mut worker, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(d.pinned().ask, "Find flights to Lisbon under 300 EUR");
    assert_eq!(d.pinned(), &pinned);
    let stored = client
        .get_run(&run.id)
        .await
        .unwrap()
        .run
        .unwrap()
        .pinned
        .unwrap();
    assert_eq!(stored, pinned);
}

#[tokio::test]
async fn final_handoff_completes_the_run_and_deadline_times_out_another() {
    let (_nats, _broker, client) = stack(|_| {}).await;
    client
        .register_agent(AgentConfig::new("worker"))
        .await
        .unwrap();
    let mut owner = client
        .watch(WatchFilter::all().owner("dave").kinds([
            pb::EventKind::RunCompleted,
            pb::EventKind::RunTimedOut,
            pb::EventKind::RunFailed,
        ]))
        .await
        .unwrap();
    let done = client
        .start_run(RunConfig::new("dave").timeout(Duration::from_secs(30)))
        .await
        .unwrap();
    client
        .handoff(Handoff::to(&done.id, "worker", &note("work", 1)).unwrap())
        .await
        .unwrap();
    let mut sub = client.subscribe("worker", "w", 1).await.unwrap();
    let d = next_within(&mut sub, Duration::from_secs(5)).await.unwrap();
    let receipt = d
        .handoff(Handoff::final_result("", &note("the answer", 42)).unwrap())
        .await
        .unwrap();
    let completed = events_until(&mut owner, Duration::from_secs(5), |_| true).await;
    assert_eq!(completed[0].kind, pb::EventKind::RunCompleted as i32);
    assert_eq!(completed[0].run_id, done.id);
    let run = client.get_run(&done.id).await.unwrap().run.unwrap();
    assert_eq!(run.status, pb::RunStatus::Completed as i32);
    assert_eq!(run.result_handoff_id, receipt.handoff_id);
    let result: Note = handoff_client::decode(run.result.as_ref().unwrap()).unwrap();
    assert_eq!(result.n, 42);

    let late = client
        .start_run(RunConfig::new("dave").timeout(Duration::from_millis(800)))
        .await
        .unwrap();
    let timed_out = events_until(&mut owner, Duration::from_secs(10), |_| true).await;
    assert_eq!(timed_out[0].kind, pb::EventKind::RunTimedOut as i32);
    assert_eq!(timed_out[0].run_id, late.id);
    let err = client
        .handoff(Handoff::final_result(&late.id, &note("too late", 0)).unwrap())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    assert!(err.message().contains("timed out"), "{}", err.message());
    // The completed run's deadline timer does not fire a second outcome.
    assert_eq!(
        client.get_run(&done.id).await.unwrap().run.unwrap().status,
        pb::RunStatus::Completed as i32
    );
}

#[tokio::test]
async fn a_run_without_a_timeout_ends_at_the_default_one() {
    let (_nats, _broker, client) = stack(|c| c.default_run_timeout = Duration::from_secs(1)).await;
    let mut owner = client
        .watch(WatchFilter::all().owner("erin"))
        .await
        .unwrap();
    let open_ended = client
        .start_run(RunConfig::new("erin").no_timeout())
        .await
        .unwrap();
    assert!(
        open_ended.deadline.is_none(),
        "no deadline when asked for none"
    );
    let run = client.start_run(RunConfig::new("erin")).await.unwrap();
    assert!(run.deadline.is_some(), "the default deadline");
    let ended = events_until(&mut owner, Duration::from_secs(15), |e| {
        e.kind == pb::EventKind::RunTimedOut as i32
    })
    .await;
    let timed_out: Vec<&str> = ended
        .iter()
        .filter(|e| e.kind == pb::EventKind::RunTimedOut as i32)
        .map(|e| e.run_id.as_str())
        .collect();
    assert_eq!(timed_out, [run.id.as_str()]);
    assert_eq!(
        client.get_run(&run.id).await.unwrap().run.unwrap().status,
        pb::RunStatus::TimedOut as i32
    );
    // The open-ended run has no deadline to fire: running, and nothing in
    // its timeline but its start.
    let open = client.get_run(&open_ended.id).await.unwrap();
    assert_eq!(open.run.unwrap().status, pb::RunStatus::Running as i32);
    assert_eq!(kinds(&open.timeline), ["run_started"]);
    // Both at once is malformed.
    let raw = client
        .raw()
        .start_run(pb::StartRunRequest {
            owner: "erin".into(),
            timeout: Some(prost_types::Duration {
                seconds: 5,
                nanos: 0,
            }),
            no_timeout: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(raw.code(), tonic::Code::InvalidArgument);
}
