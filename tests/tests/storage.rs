//! Bounded storage: an acked handoff leaves its inbox, lease records
//! expire with their lease, and an ended run is purged `retention` after
//! its end, with a `run_purged` event first. Read from JetStream's own
//! state, not through the broker.

use std::time::{Duration, Instant};

use futures::StreamExt;
use handoff_client::{pb, AgentConfig, Handoff, RunConfig, StateDelta, WatchFilter};
use handoff_tests::{events_until, forget_inboxes, next_within, note, stack};
use handoffd::store::jetstream as js;

const WAIT: Duration = Duration::from_secs(10);

/// How many messages a stream holds (on `subjects` only, when given).
async fn held(nats_url: &str, stream: &str, subjects: Option<&str>) -> u64 {
    let client = async_nats::connect(nats_url).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream(stream).await.expect("the stream");
    match subjects {
        None => stream.info().await.expect("stream info").state.messages,
        Some(filter) => {
            let mut counts = stream.info_with_subjects(filter).await.expect("subjects");
            let mut total = 0;
            while let Some(entry) = counts.next().await {
                total += entry.expect("a subject count").1 as u64;
            }
            total
        }
    }
}

/// The subjects of `stream` matching `filter`, with their message counts
/// (what a failed check found left behind).
async fn subjects(nats_url: &str, stream: &str, filter: &str) -> Vec<(String, usize)> {
    let client = async_nats::connect(nats_url).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream(stream).await.expect("the stream");
    let mut counts = stream.info_with_subjects(filter).await.expect("subjects");
    let mut out = Vec::new();
    while let Some(entry) = counts.next().await {
        out.push(entry.expect("a subject count"));
    }
    out.sort();
    out
}

#[tokio::test]
async fn an_ended_run_leaves_nothing_behind_after_retention_but_its_purge_event() {
    let retention = Duration::from_secs(60);
    let (nats, _broker, client) = stack(|c| {
        c.retention = retention;
        c.dedupe_window = Duration::from_secs(30);
    })
    .await;
    // As in production: an acked handoff is not kept for the test.
    forget_inboxes(nats.url()).await;
    for agent in ["worker", "aggregator"] {
        client
            .register_agent(AgentConfig::new(agent).lease(Duration::from_secs(2)))
            .await
            .expect("register");
    }
    let run = client
        .start_run(RunConfig::new("olga").id("gone").state("city", "Oslo"))
        .await
        .expect("run");
    let mut purged = client
        .watch(
            WatchFilter::all()
                .run(&run.id)
                .kinds([pb::EventKind::RunPurged]),
        )
        .await
        .expect("watch");
    // Every kind of record a run leaves: handoffs with a state delta, a
    // complete-and-handoff (a claim, lease records), a barrier with a
    // branch record and its release.
    client
        .handoff(
            Handoff::to(&run.id, "worker", &note("go", 1))
                .expect("handoff")
                .state_delta(StateDelta::based_on(1).set("nights", 2.0)),
        )
        .await
        .expect("first hop");
    client
        .raw()
        .open_barrier(pb::OpenBarrierRequest {
            barrier: Some(pb::BarrierSpec {
                run_id: run.id.clone(),
                barrier_id: "join".into(),
                branch_keys: vec!["a".into()],
                mode: pb::BarrierMode::All as i32,
                target_agent: "aggregator".into(),
                ..Default::default()
            }),
        })
        .await
        .expect("open");
    let mut worker = client.subscribe("worker", "w", 1).await.expect("subscribe");
    let d = next_within(&mut worker, WAIT).await.expect("delivery");
    d.handoff(
        Handoff::to_barrier(&run.id, "join", "a", &note("branch", 2))
            .expect("branch")
            .state_delta(d.state_delta().set("city", "Rome")),
    )
    .await
    .expect("the branch consumes the delivery");
    let mut aggregator = client
        .subscribe("aggregator", "a", 1)
        .await
        .expect("subscribe");
    let release = next_within(&mut aggregator, WAIT).await.expect("release");
    release
        .handoff(Handoff::final_result(&run.id, &note("done", 3)).expect("final"))
        .await
        .expect("the final handoff");
    let ended = Instant::now();
    let view = client.get_run(&run.id).await.expect("the run");
    assert_eq!(
        view.run.as_ref().map(|r| r.status),
        Some(pb::RunStatus::Completed as i32)
    );
    // Acked handoffs left their inbox at once.
    let url = nats.url();
    assert_eq!(held(url, js::INBOX_STREAM, None).await, 0, "acked handoffs");
    assert!(held(url, &format!("KV_{}", js::STATE_BUCKET), None).await > 0);

    // The purge comes `retention` after the end, its event first.
    let event = events_until(&mut purged, retention + Duration::from_secs(30), |_| true).await;
    let event = event.first().expect("run_purged");
    assert_eq!(event.kind, pb::EventKind::RunPurged as i32);
    assert_eq!(event.owner, "olga");
    assert!(ended.elapsed() >= retention - Duration::from_secs(1));
    // The run record goes last, right after.
    let deadline = Instant::now() + WAIT;
    loop {
        match client.get_run(&run.id).await {
            Err(e) => {
                assert_eq!(e.reason(), Some("RUN_NOT_FOUND"), "{e}");
                break;
            }
            Ok(_) => assert!(Instant::now() < deadline, "the run record stayed"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Two minutes after the end, nothing of the run is left in any stream
    // or bucket; its run_purged event alone may still be (it is kept one
    // more `retention`).
    let left = (ended + 2 * retention).saturating_duration_since(Instant::now());
    tokio::time::sleep(left).await;
    let events = held(url, js::EVENTS_STREAM, Some("handoff.v1.events.gone.>")).await;
    let purge_event = held(
        url,
        js::EVENTS_STREAM,
        Some("handoff.v1.events.gone.run_purged"),
    )
    .await;
    assert_eq!(
        events,
        purge_event,
        "only run_purged may be left: {:?}",
        subjects(url, js::EVENTS_STREAM, "handoff.v1.events.gone.>").await
    );
    for stream in [
        js::INBOX_STREAM.to_string(),
        js::DEAD_STREAM.to_string(),
        js::BRANCHES_STREAM.to_string(),
        js::TIMERS_STREAM.to_string(),
        format!("KV_{}", js::RUNS_BUCKET),
        format!("KV_{}", js::STATE_BUCKET),
        format!("KV_{}", js::BARRIERS_BUCKET),
        format!("KV_{}", js::CONSUMED_BUCKET),
        format!("KV_{}", js::LEASES_BUCKET),
        format!("OBJ_{}", js::PAYLOADS_BUCKET),
    ] {
        assert_eq!(held(url, &stream, None).await, 0, "{stream} is empty");
    }
}

#[tokio::test]
async fn a_timer_stream_made_before_purges_existed_is_taken_over_with_its_timers() {
    use async_nats::jetstream::{consumer::pull, stream};
    let nats = handoff_tests::Nats::start().await;
    // The timer stream and its one consumer of every timer, as a broker
    // before run purges made them, holding a deadline timer.
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.expect("connect"));
    let timers = js
        .create_stream(stream::Config {
            name: js::TIMERS_STREAM.to_string(),
            subjects: vec!["handoff.v1.timers.>".to_string()],
            retention: stream::RetentionPolicy::WorkQueue,
            ..Default::default()
        })
        .await
        .expect("the old timer stream");
    timers
        .create_consumer(pull::Config {
            durable_name: Some(js::TIMERS_CONSUMER.to_string()),
            ack_policy: async_nats::jetstream::consumer::AckPolicy::Explicit,
            max_deliver: -1,
            max_ack_pending: -1,
            ..Default::default()
        })
        .await
        .expect("the old timer consumer");
    let due = std::time::SystemTime::now() + Duration::from_secs(3600);
    let timer = pb::Timer {
        run_id: "old".into(),
        due: Some(due.into()),
        ..Default::default()
    };
    js.publish(
        "handoff.v1.timers.run.old",
        prost::Message::encode_to_vec(&timer).into(),
    )
    .await
    .expect("publish")
    .await
    .expect("a stored timer");

    let broker = handoff_tests::Broker::start(nats.url(), |_| {}).await;
    let mut timers = js.get_stream(js::TIMERS_STREAM).await.expect("the stream");
    let fires = timers
        .consumer_info(js::TIMERS_CONSUMER)
        .await
        .expect("the timer consumer");
    assert!(
        !fires.config.filter_subjects.is_empty()
            && fires
                .config
                .filter_subjects
                .iter()
                .all(|s| !s.contains("purge")),
        "{:?}",
        fires.config.filter_subjects
    );
    let purges = timers
        .consumer_info(js::PURGES_CONSUMER)
        .await
        .expect("the purge consumer");
    assert_eq!(purges.config.filter_subject, "handoff.v1.timers.purge.>");
    assert_eq!(purges.config.max_ack_pending, 16);
    // The deadline set before the change still waits, held by the timer
    // consumer until it is due.
    let info = timers.info().await.expect("info");
    assert_eq!(info.state.messages, 1);
    let deadline = Instant::now() + WAIT;
    loop {
        let fires = timers
            .consumer_info(js::TIMERS_CONSUMER)
            .await
            .expect("the timer consumer");
        if fires.num_ack_pending == 1 && fires.num_pending == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the old timer was never taken: {fires:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    broker.stop().await;
}
