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

#[tokio::test]
async fn a_nack_redelivery_ack_cycle_repeated_1000_times_at_once_settles_every_handoff() {
    let (nats, _broker, client) = stack(|_| {}).await;
    handoff_tests::keep_inboxes(nats.url()).await;
    client
        .register_agent(AgentConfig::new("cycler").lease(Duration::from_secs(30)))
        .await
        .expect("register");
    const HANDOFFS: usize = 1_000;
    let run = client.start_run(RunConfig::new("o")).await.expect("start");
    let sends = (0..HANDOFFS).map(|i| {
        let client = client.clone();
        let run = run.id.clone();
        async move {
            client
                .handoff(
                    Handoff::to(&run, "cycler", &note("cycle", i as u32))
                        .expect("handoff")
                        .idempotency_key(format!("cycle-{i}")),
                )
                .await
                .expect("handed off")
                .handoff_id
        }
    });
    let ids: std::collections::HashSet<String> =
        futures::future::join_all(sends).await.into_iter().collect();
    assert_eq!(ids.len(), HANDOFFS);
    // Four instances, 64 in flight each: attempt 1 is nacked, the
    // redelivery acked.
    let mut instances = Vec::new();
    for i in 0..4 {
        let mut sub = client
            .subscribe("cycler", &format!("c{i}"), 64)
            .await
            .expect("subscribe");
        instances.push(tokio::spawn(async move {
            let (mut nacked, mut acked) = (Vec::new(), Vec::new());
            while let Some(d) = next_within(&mut sub, Duration::from_secs(5)).await {
                if d.attempt() == 1 {
                    d.nack(None).await.expect("nack");
                    nacked.push(d.handoff_id().to_string());
                } else {
                    acked.push((d.handoff_id().to_string(), d.attempt(), d.ack().await));
                }
            }
            (nacked, acked)
        }));
    }
    let (mut nacked, mut acked) = (Vec::new(), Vec::new());
    for i in instances {
        let (n, a) = i.await.expect("instance");
        nacked.extend(n);
        acked.extend(a);
    }
    // Every handoff nacked once, redelivered as attempt 2 and settled by
    // that attempt's ack.
    assert_eq!(nacked.len(), HANDOFFS);
    assert_eq!(
        nacked
            .iter()
            .collect::<std::collections::HashSet<_>>()
            .len(),
        HANDOFFS
    );
    let refused: Vec<_> = acked.iter().filter(|(_, _, r)| r.is_err()).collect();
    assert!(refused.is_empty(), "acks refused: {refused:?}");
    assert!(acked.iter().all(|(_, attempt, _)| *attempt == 2));
    let settled: std::collections::HashSet<&String> = acked.iter().map(|(id, _, _)| id).collect();
    assert_eq!(acked.len(), HANDOFFS, "one ack each");
    assert_eq!(settled.len(), HANDOFFS);
    assert!(settled.iter().all(|id| ids.contains(*id)));
    // JetStream holds nothing more for the agent: 1,000 stored, 2,000
    // deliveries, none pending or unacked.
    let inbox = handoff_tests::settled_inbox(nats.url(), "cycler").await;
    assert_eq!(
        (inbox.stored, inbox.deliveries, inbox.pending, inbox.unacked),
        (HANDOFFS as u64, 2 * HANDOFFS as u64, 0, 0),
        "{inbox:?}"
    );
}

#[tokio::test]
async fn a_nacked_delivery_jetstream_counts_from_1_again_is_attempt_2_and_its_ack_settles_it() {
    let (nats, _broker, client) = stack(|_| {}).await;
    handoff_tests::keep_inboxes(nats.url()).await;
    let (run, mut sub, first) = first_delivery(
        &client,
        (
            "cycler",
            AgentConfig::new("cycler").lease(Duration::from_secs(30)),
        ),
        RunConfig::new("o"),
    )
    .await;
    assert_eq!(first.attempt(), 1);
    // Nacked with a delay; meanwhile the consumer's state is reset to the
    // message, as an operator's CONSUMER.RESET (or a state lost) does:
    // JetStream then delivers it counted from 1 again.
    first
        .nack(Some(Duration::from_secs(3)))
        .await
        .expect("nack");
    let raw = async_nats::connect(nats.url()).await.expect("connect");
    let reset = raw
        .request(
            "$JS.API.CONSUMER.RESET.HANDOFF_INBOX.cycler",
            format!("{{\"seq\":{}}}", first.raw().sequence).into(),
        )
        .await
        .expect("reset");
    let answer = String::from_utf8_lossy(&reset.payload).to_string();
    assert!(!answer.contains("\"error\""), "{answer}");
    let again = next_within(&mut sub, Duration::from_secs(10))
        .await
        .expect("redelivered");
    assert_eq!(again.handoff_id(), first.handoff_id());
    assert_eq!(again.attempt(), 2, "attempts never go back");
    again.ack().await.expect("the redelivery's ack settles it");
    // Settled: nothing waits out a lease; the run's record says so.
    let inbox = handoff_tests::inbox(nats.url(), "cycler").await;
    assert_eq!((inbox.pending, inbox.unacked), (0, 0), "{inbox:?}");
    let timeline = client.get_run(&run.id).await.expect("run").timeline;
    assert_eq!(count(&timeline, pb::EventKind::Acked), 1);
}
