//! A worker never retries what cannot succeed: a terminal refusal rejects
//! the delivery at once and the run fails naming the reason and its
//! numbers; a retryable failure is retried after a jittered backoff.
//! Against a real `nats-server`.

use std::time::{Duration, Instant};

use handoff_client::{pb, AgentConfig, Disposition, Handoff, RunConfig};
use handoff_tests::{next_within, note, secured::count, stack};

/// Agent `agent` registered as `config` says, a run with a note handed to
/// it, and its first delivery (the subscription stays open).
async fn first_delivery(
    client: &handoff_client::Client,
    (agent, config): (&str, AgentConfig),
    run: RunConfig,
) -> (
    pb::Run,
    handoff_client::Subscription,
    handoff_client::Delivery,
) {
    client.register_agent(config).await.expect("register");
    let run = client.start_run(run).await.expect("start");
    client
        .handoff(Handoff::to(&run.id, agent, &note("go", 0)).expect("handoff"))
        .await
        .expect("handoff");
    let mut sub = client.subscribe(agent, "i1", 2).await.expect("subscribe");
    let first = next_within(&mut sub, Duration::from_secs(5))
        .await
        .expect("delivery");
    (run, sub, first)
}

#[tokio::test]
async fn a_terminal_refusal_rejects_once_and_fails_the_run_naming_it() {
    let (_nats, _broker, client) = stack(|_| {}).await;
    let (run, mut sub, d) = first_delivery(
        &client,
        ("looper", AgentConfig::new("looper")),
        RunConfig::new("ivy").id("too-deep").max_depth(1),
    )
    .await;
    // One hop further than the run allows.
    let err = d
        .handoff(Handoff::to("", "looper", &note("again", 1)).expect("handoff"))
        .await
        .expect_err("too deep");
    assert_eq!(err.reason(), Some("DEPTH_CAP"));
    assert_eq!(err.disposition(), Disposition::Terminal);
    d.fail(&err).await.expect("rejected");

    let deadline = Instant::now() + Duration::from_secs(10);
    let view = loop {
        let view = client.get_run(&run.id).await.expect("run");
        let ended = view
            .run
            .as_ref()
            .is_some_and(|r| r.status != pb::RunStatus::Running as i32);
        if ended || Instant::now() >= deadline {
            break view;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let failed = view.run.expect("run");
    assert_eq!(failed.status, pb::RunStatus::Failed as i32);
    assert!(
        failed.failure.contains("DEPTH_CAP depth=2 max_depth=1"),
        "{}",
        failed.failure
    );
    // Rejected once, never offered again.
    assert_eq!(count(&view.timeline, pb::EventKind::Rejected), 1);
    assert_eq!(count(&view.timeline, pb::EventKind::Nacked), 0);
    assert_eq!(count(&view.timeline, pb::EventKind::Redelivered), 0);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), sub.next_delivery())
            .await
            .is_err(),
        "nothing comes again"
    );
}

#[tokio::test]
async fn a_retryable_failure_is_retried_after_a_backoff_and_succeeds() {
    let (_nats, _broker, client) = stack(|_| {}).await;
    let (run, mut sub, first) = first_delivery(
        &client,
        ("flaky", AgentConfig::new("flaky")),
        RunConfig::new("ivy").id("flaky-run"),
    )
    .await;
    // What a call made while the broker was unreachable answers.
    let down = handoff_client::Error::from(tonic::Status::unavailable("NATS is down"));
    assert_eq!(down.disposition(), Disposition::Retryable);
    let failed_at = Instant::now();
    first.fail(&down).await.expect("nacked");
    let second = next_within(&mut sub, Duration::from_secs(5))
        .await
        .expect("offered again");
    let waited = failed_at.elapsed();
    assert_eq!(second.attempt(), 2);
    assert!(
        waited >= Duration::from_millis(120),
        "backed off before the retry: {waited:?}"
    );
    second
        .handoff(Handoff::final_result("", &note("done", 1)).expect("final"))
        .await
        .expect("complete");
    let view = client.get_run(&run.id).await.expect("run");
    assert_eq!(
        view.run.expect("run").status,
        pb::RunStatus::Completed as i32
    );
    assert_eq!(count(&view.timeline, pb::EventKind::Nacked), 1);
    assert_eq!(count(&view.timeline, pb::EventKind::Rejected), 0);
}

#[tokio::test]
async fn a_superseded_delivery_is_left_alone_and_its_redelivery_goes_on() {
    let (_nats, _broker, client) = stack(|_| {}).await;
    let (run, mut sub, first) = first_delivery(
        &client,
        (
            "slow",
            AgentConfig::new("slow").lease(Duration::from_secs(1)),
        ),
        RunConfig::new("ivy").id("slow-run"),
    )
    .await;
    // The lease passes: the handoff is offered again.
    let second = next_within(&mut sub, Duration::from_secs(10))
        .await
        .expect("offered again");
    assert_eq!(second.attempt(), 2);
    let err = first
        .handoff(Handoff::final_result("", &note("late", 1)).expect("final"))
        .await
        .expect_err("superseded");
    assert_eq!(err.reason(), Some("LEASE_SUPERSEDED"));
    assert_eq!(err.disposition(), Disposition::Superseded);
    first.fail(&err).await.expect("left alone");
    second
        .handoff(Handoff::final_result("", &note("done", 2)).expect("final"))
        .await
        .expect("complete");
    let view = client.get_run(&run.id).await.expect("run");
    assert_eq!(
        view.run.expect("run").status,
        pb::RunStatus::Completed as i32
    );
    assert_eq!(count(&view.timeline, pb::EventKind::Rejected), 0);
}
