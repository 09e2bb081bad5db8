//! Bad input answers a precise status, changes nothing, and the broker
//! keeps serving.

use std::time::Duration;

use handoff_client::{pb, AgentConfig, Handoff, RunConfig};
use handoff_tests::{next_within, note, settled_inbox, stack, Broker, Nats, Note};
use tonic::Code;

#[tokio::test]
async fn bad_input_is_refused_precisely_and_changes_nothing() {
    let (nats, _broker, client) = stack(|c| {
        c.max_inline_payload = 1024;
        c.max_payload_size = 1024;
    })
    .await;
    let raw = client.raw();
    client
        .register_agent(AgentConfig::new("worker"))
        .await
        .unwrap();
    let run = client
        .start_run(RunConfig::new("o").id("good-run"))
        .await
        .unwrap();
    let kept = client
        .handoff(Handoff::to(&run.id, "worker", &note("accepted before", 1)).unwrap())
        .await
        .unwrap();

    let long = "x".repeat(129);
    for bad in ["a.b", "a*", "a>", "a b", "", long.as_str()] {
        let err = client
            .register_agent(AgentConfig::new(bad))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(Code::InvalidArgument), "agent {bad:?}");
        let err = client.start_run(RunConfig::new("o").id(bad)).await;
        if !bad.is_empty() {
            assert_eq!(
                err.unwrap_err().code(),
                Some(Code::InvalidArgument),
                "run {bad:?}"
            );
        }
        let err = client
            .handoff(Handoff::to(&run.id, bad, &note("x", 0)).unwrap())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(Code::InvalidArgument), "target {bad:?}");
    }
    let err = client
        .handoff(Handoff::to("no-such-run", "worker", &note("x", 0)).unwrap())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::NotFound));
    assert!(err.message().contains("no-such-run"));
    let err = client
        .handoff(Handoff::to(&run.id, "ghost", &note("x", 0)).unwrap())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::NotFound));
    assert!(err.message().contains("ghost"));
    let big = note(&"y".repeat(2000), 0);
    let err = client
        .handoff(Handoff::to(&run.id, "worker", &big).unwrap())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::FailedPrecondition));
    assert!(err.message().contains("1024"), "{}", err.message());
    // Malformed: no payload, confidence out of range, a forged delivery id.
    let base = pb::HandoffRequest {
        run_id: run.id.clone(),
        target_agent: "worker".into(),
        ..Default::default()
    };
    let err = raw.clone().handoff(base.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = client
        .handoff(
            Handoff::to(&run.id, "worker", &note("x", 0))
                .unwrap()
                .confidence(1.5),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument));
    let mut forged = Handoff::to(&run.id, "worker", &note("x", 0))
        .unwrap()
        .request()
        .clone();
    forged.consumes = "not-a-delivery".into();
    let err = raw.clone().handoff(forged).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // Subscribe must open first, for a registered agent.
    let err = client.subscribe("ghost", "i", 1).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::NotFound));
    let err = client
        .subscribe("worker", "bad instance", 1)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument));
    // A run id that exists under another owner.
    let err = client
        .start_run(RunConfig::new("mallory").id("good-run"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::AlreadyExists));
    let err = client.get_run("nope").await.unwrap_err();
    assert_eq!(err.code(), Some(Code::NotFound));

    // Closed runs accept nothing.
    let closed = client.start_run(RunConfig::new("o")).await.unwrap();
    client
        .handoff(Handoff::final_result(&closed.id, &note("done", 0)).unwrap())
        .await
        .unwrap();
    let err = client
        .handoff(Handoff::to(&closed.id, "worker", &note("x", 0)).unwrap())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::FailedPrecondition));
    assert!(err.message().contains("completed"));

    // Still serving; nothing accepted before was lost, nothing refused was stored.
    let mut sub = client.subscribe("worker", "w", 10).await.unwrap();
    let d = next_within(&mut sub, Duration::from_secs(5))
        .await
        .expect("kept handoff");
    assert_eq!(d.handoff_id(), kept.handoff_id);
    assert_eq!(d.payload::<Note>().unwrap().text, "accepted before");
    d.ack().await.unwrap();
    assert!(
        next_within(&mut sub, Duration::from_millis(1500))
            .await
            .is_none(),
        "nothing refused was stored"
    );
    let inbox = settled_inbox(nats.url(), "worker").await;
    assert_eq!((inbox.stored, inbox.deliveries), (1, 1), "{inbox:?}");
    let agents = client.list_agents().await.unwrap();
    assert_eq!(
        agents.iter().map(|a| a.name.as_str()).collect::<Vec<_>>(),
        vec!["worker"]
    );
}

#[tokio::test]
async fn graceful_drain_leaves_unacked_deliveries_for_redelivery() {
    let nats = Nats::start().await;
    let first = Broker::start(nats.url(), |_| {}).await;
    let client = first.client().await;
    client
        .register_agent(AgentConfig::new("worker").lease(Duration::from_millis(700)))
        .await
        .unwrap();
    let run = client.start_run(RunConfig::new("o")).await.unwrap();
    let r = client
        .handoff(Handoff::to(&run.id, "worker", &note("x", 1)).unwrap())
        .await
        .unwrap();
    let mut sub = client.subscribe("worker", "w", 1).await.unwrap();
    let d = next_within(&mut sub, Duration::from_secs(5)).await.unwrap();
    first.stop().await;
    // The stream ends with UNAVAILABLE; the delivery is not lost.
    let end = tokio::time::timeout(Duration::from_secs(5), sub.next_delivery())
        .await
        .unwrap();
    assert!(matches!(end, Some(Err(_)) | None));
    let second = Broker::start(nats.url(), |_| {}).await;
    let client = second.client().await;
    let mut sub = client.subscribe("worker", "w2", 1).await.unwrap();
    let again = next_within(&mut sub, Duration::from_secs(5))
        .await
        .expect("redelivered after drain");
    assert_eq!(again.handoff_id(), r.handoff_id);
    assert_eq!(again.handoff_id(), d.handoff_id());
    again.ack().await.unwrap();
}
