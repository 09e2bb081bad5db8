//! Delivery semantics: competing instances, leases and attempts, fallback
//! and dead letters, idempotency, complete-and-handoff after a crash.

use std::{collections::HashMap, time::Duration};

use handoff_client::{pb, AgentConfig, Handoff, RunConfig, WatchFilter};
use handoff_tests::{
    count, deliveries_of, events_until, inbox, kinds, next_within, note, settled_inbox, stack,
    timeline_when, Note,
};

#[tokio::test]
async fn each_handoff_goes_to_exactly_one_of_three_instances_and_ack_ends_it() {
    let (nats, _broker, client) = stack(|_| {}).await;
    client
        .register_agent(AgentConfig::new("worker").lease(Duration::from_millis(800)))
        .await
        .unwrap();
    let run = client.start_run(RunConfig::new("owner")).await.unwrap();
    let mut subs = Vec::new();
    for i in 0..3 {
        subs.push(
            client
                .subscribe("worker", &format!("w{i}"), 4)
                .await
                .unwrap(),
        );
    }
    let total = 30u32;
    for i in 0..total {
        client
            .handoff(Handoff::to(&run.id, "worker", &note("task", i)).unwrap())
            .await
            .unwrap();
    }
    // Every instance drains its stream concurrently, acking what it gets.
    let mut tasks = Vec::new();
    for (i, mut sub) in subs.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(d) = next_within(&mut sub, Duration::from_secs(3)).await {
                let n = d.payload::<Note>().unwrap().n;
                assert_eq!(d.attempt(), 1, "no redelivery after ack");
                d.ack().await.unwrap();
                got.push((n, d.handoff_id().to_string()));
            }
            (i, got)
        }));
    }
    let mut by_n: HashMap<u32, usize> = HashMap::new();
    let mut per_instance = Vec::new();
    for t in tasks {
        let (i, got) = t.await.unwrap();
        per_instance.push((i, got.len()));
        for (n, _) in got {
            *by_n.entry(n).or_default() += 1;
        }
    }
    assert_eq!(
        by_n.len(),
        total as usize,
        "every handoff delivered: {per_instance:?}"
    );
    assert!(
        by_n.values().all(|&c| c == 1),
        "each delivered exactly once: {by_n:?}"
    );
    assert!(
        per_instance.iter().filter(|(_, c)| *c > 0).count() >= 2,
        "work spread over instances: {per_instance:?}"
    );
    // JetStream's record agrees: 30 stored, 30 deliveries, none left; and
    // the run's timeline records no redelivery.
    let inbox = settled_inbox(nats.url(), "worker").await;
    assert_eq!((inbox.stored, inbox.deliveries), (30, 30), "{inbox:?}");
    let timeline = client.get_run(&run.id).await.unwrap().timeline;
    assert_eq!(count(&timeline, &[pb::EventKind::Redelivered], |_| true), 0);
}

#[tokio::test]
async fn expired_lease_redelivers_to_another_instance_then_falls_back() {
    let (_nats, _broker, client) = stack(|_| {}).await;
    client
        .register_agent(AgentConfig::new("rescuer"))
        .await
        .unwrap();
    client
        .register_agent(
            AgentConfig::new("worker")
                .lease(Duration::from_millis(500))
                .max_attempts(2)
                .fallback("rescuer"),
        )
        .await
        .unwrap();
    let run = client.start_run(RunConfig::new("alice")).await.unwrap();
    let mut owner_events = client
        .watch(
            WatchFilter::all()
                .owner("alice")
                .kinds([pb::EventKind::RoutedToFallback]),
        )
        .await
        .unwrap();
    let mut a = client.subscribe("worker", "a", 1).await.unwrap();
    client
        .handoff(Handoff::to(&run.id, "worker", &note("slow", 1)).unwrap())
        .await
        .unwrap();
    let first = next_within(&mut a, Duration::from_secs(5))
        .await
        .expect("first delivery");
    assert_eq!(first.attempt(), 1);
    // A holds it without acking or extending; B gets it once the lease expires.
    let mut b = client.subscribe("worker", "b", 1).await.unwrap();
    let second = next_within(&mut b, Duration::from_secs(5))
        .await
        .expect("redelivery");
    assert_eq!(second.attempt(), 2);
    assert_eq!(second.handoff_id(), first.handoff_id());
    // Nobody settles attempt 2 either: attempts are used up.
    let _c = client.subscribe("worker", "c", 1).await.unwrap();
    let mut rescuer = client.subscribe("rescuer", "r", 1).await.unwrap();
    let rescued = next_within(&mut rescuer, Duration::from_secs(5))
        .await
        .expect("fallback delivery");
    assert_eq!(rescued.envelope().fallback_from, "worker");
    assert_eq!(rescued.payload::<Note>().unwrap().n, 1);
    assert_eq!(
        rescued.envelope().parent_ids,
        vec![first.handoff_id().to_string()]
    );
    rescued.ack().await.unwrap();
    let told = events_until(&mut owner_events, Duration::from_secs(5), |_| true).await;
    assert_eq!(told[0].fallback_agent, "rescuer");
    assert_eq!(told[0].run_id, run.id);
    // Routing to the fallback does not end the run.
    let status = client.get_run(&run.id).await.unwrap().run.unwrap().status;
    assert_eq!(status, pb::RunStatus::Running as i32);
}

#[tokio::test]
async fn without_fallback_attempts_end_in_the_dead_letter_and_the_run_fails() {
    let (_nats, _broker, client) = stack(|_| {}).await;
    client
        .register_agent(
            AgentConfig::new("worker")
                .lease(Duration::from_millis(300))
                .max_attempts(1),
        )
        .await
        .unwrap();
    let run = client.start_run(RunConfig::new("bob")).await.unwrap();
    let mut owner = client
        .watch(WatchFilter::all().owner("bob").from_sequence(1))
        .await
        .unwrap();
    let mut a = client.subscribe("worker", "a", 1).await.unwrap();
    client
        .handoff(Handoff::to(&run.id, "worker", &note("doomed", 7)).unwrap())
        .await
        .unwrap();
    let d = next_within(&mut a, Duration::from_secs(5))
        .await
        .expect("delivery");
    let _b = client.subscribe("worker", "b", 1).await.unwrap();
    let seen = events_until(&mut owner, Duration::from_secs(10), |e| {
        e.kind == pb::EventKind::RunFailed as i32
    })
    .await;
    let k = kinds(&seen);
    let dead_at = k
        .iter()
        .position(|k| *k == "dead_lettered")
        .expect("dead_lettered event");
    assert!(
        dead_at < k.len() - 1,
        "dead letter before the run failed: {k:?}"
    );
    let failed = seen.last().unwrap();
    assert_eq!(failed.owner, "bob");
    assert!(failed.reason.contains("dead-lettered"), "{}", failed.reason);
    let letters = client.dead_letters("worker", 10).await.unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].handoff.as_ref().unwrap().id, d.handoff_id());
    assert_eq!(letters[0].attempts, 1);
    let run = client.get_run(&run.id).await.unwrap().run.unwrap();
    assert_eq!(run.status, pb::RunStatus::Failed as i32);
}

#[tokio::test]
async fn same_idempotency_key_twice_is_one_delivery() {
    let (nats, _broker, client) = stack(|_| {}).await;
    client
        .register_agent(AgentConfig::new("worker").lease(Duration::from_millis(500)))
        .await
        .unwrap();
    let run = client.start_run(RunConfig::new("o")).await.unwrap();
    let h = || {
        Handoff::to(&run.id, "worker", &note("once", 1))
            .unwrap()
            .idempotency_key("key-1")
    };
    let first = client.handoff(h()).await.unwrap();
    let second = client.handoff(h()).await.unwrap();
    assert!(!first.duplicate);
    assert!(second.duplicate);
    assert_eq!(second.handoff_id, first.handoff_id);
    assert_eq!(second.sequence, first.sequence);
    let mut sub = client.subscribe("worker", "w", 10).await.unwrap();
    let d = next_within(&mut sub, Duration::from_secs(5))
        .await
        .expect("one delivery");
    assert_eq!(d.handoff_id(), first.handoff_id);
    d.ack().await.unwrap();
    assert!(
        next_within(&mut sub, Duration::from_millis(1500))
            .await
            .is_none(),
        "no second delivery"
    );
    let inbox = settled_inbox(nats.url(), "worker").await;
    assert_eq!((inbox.stored, inbox.deliveries), (1, 1), "{inbox:?}");
}

#[tokio::test]
async fn crash_between_complete_and_ack_is_delivered_downstream_once() {
    // The broker stores the new handoff but "dies" before acking the input.
    let (nats, _broker, client) = stack(|c| c.faults.skip_consume_ack = true).await;
    client
        .register_agent(AgentConfig::new("worker").lease(Duration::from_secs(30)))
        .await
        .unwrap();
    client
        .register_agent(AgentConfig::new("aggregator"))
        .await
        .unwrap();
    let run = client.start_run(RunConfig::new("o")).await.unwrap();
    client
        .handoff(Handoff::to(&run.id, "worker", &note("input", 1)).unwrap())
        .await
        .unwrap();
    let mut w1 = client.subscribe("worker", "w1", 1).await.unwrap();
    let d1 = next_within(&mut w1, Duration::from_secs(5))
        .await
        .expect("input");
    let r1 = d1
        .handoff(Handoff::to("", "aggregator", &note("result", 1)).unwrap())
        .await
        .unwrap();
    assert!(!r1.duplicate);
    // The worker instance crashes: its subscription goes away unacked.
    drop(w1);
    let mut w2 = client.subscribe("worker", "w2", 1).await.unwrap();
    let d2 = next_within(&mut w2, Duration::from_secs(5))
        .await
        .expect("input redelivered");
    assert_eq!(d2.handoff_id(), d1.handoff_id());
    assert_eq!(d2.attempt(), 2);
    let r2 = d2
        .handoff(Handoff::to("", "aggregator", &note("result", 1)).unwrap())
        .await
        .unwrap();
    assert!(r2.duplicate, "the redone handoff is recognised");
    assert_eq!(r2.handoff_id, r1.handoff_id);
    d2.ack().await.unwrap();
    let mut agg = client.subscribe("aggregator", "a", 10).await.unwrap();
    let got = next_within(&mut agg, Duration::from_secs(5))
        .await
        .expect("downstream");
    assert_eq!(got.handoff_id(), r1.handoff_id);
    assert_eq!(got.envelope().depth, 2);
    got.ack().await.unwrap();
    assert!(
        next_within(&mut agg, Duration::from_millis(1500))
            .await
            .is_none(),
        "downstream once"
    );
    let inbox = settled_inbox(nats.url(), "aggregator").await;
    assert_eq!((inbox.stored, inbox.deliveries), (1, 1), "{inbox:?}");
    let timeline = timeline_when(&client, &run.id, |t| deliveries_of(t, &r1.handoff_id) > 0).await;
    assert_eq!(deliveries_of(&timeline, &r1.handoff_id), 1);
}

/// Registers `worker` with `lease`, starts a run and hands it one task.
async fn one_task_for_worker(client: &handoff_client::Client, lease: Duration) -> pb::Run {
    client
        .register_agent(AgentConfig::new("worker").lease(lease))
        .await
        .unwrap();
    let run = client.start_run(RunConfig::new("o")).await.unwrap();
    client
        .handoff(Handoff::to(&run.id, "worker", &note("x", 1)).unwrap())
        .await
        .unwrap();
    run
}

#[tokio::test]
async fn an_ack_repeated_by_id_in_a_new_subscription_is_confirmed_and_settles_once() {
    let (nats, _broker, client) = stack(|_| {}).await;
    let run = one_task_for_worker(&client, Duration::from_millis(500)).await;
    let mut first = client.subscribe("worker", "a", 1).await.unwrap();
    let d = next_within(&mut first, Duration::from_secs(5))
        .await
        .expect("delivery");
    d.ack().await.unwrap();
    drop(first);
    // A client whose ack answer was lost with its broker cannot tell
    // whether the ack was applied: it repeats it by id through a new
    // subscription, and a repeat of an applied ack is confirmed too.
    let mut second = client.subscribe("worker", "b", 1).await.unwrap();
    second.ack_id(d.id()).await.unwrap();
    second.ack_id(d.id()).await.unwrap();
    assert!(
        next_within(&mut second, Duration::from_millis(1500))
            .await
            .is_none(),
        "not delivered again (three leases later)"
    );
    let inbox = settled_inbox(nats.url(), "worker").await;
    assert_eq!((inbox.stored, inbox.deliveries), (1, 1), "{inbox:?}");
    let acks = client
        .get_run(&run.id)
        .await
        .unwrap()
        .timeline
        .iter()
        .filter(|e| e.kind == pb::EventKind::Acked as i32 && e.handoff_id == d.handoff_id())
        .count();
    assert_eq!(acks, 1, "one acked event");
    // An id that names no delivery is refused, not confirmed.
    let err = second.ack_id("not-a-delivery").await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::InvalidArgument), "{err}");
}

#[tokio::test]
async fn nack_with_delay_redelivers_and_extend_keeps_the_lease() {
    let (nats, _broker, client) = stack(|_| {}).await;
    one_task_for_worker(&client, Duration::from_millis(600)).await;
    let mut a = client.subscribe("worker", "a", 1).await.unwrap();
    let d = next_within(&mut a, Duration::from_secs(5))
        .await
        .expect("delivery");
    let mut b = client.subscribe("worker", "b", 1).await.unwrap();
    // Extending every 200 ms for 1.4 s (well past the 600 ms lease) keeps it.
    for _ in 0..7 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(d.extend().await.unwrap().is_some());
    }
    assert!(
        next_within(&mut b, Duration::from_millis(10))
            .await
            .is_none(),
        "not redelivered while extended"
    );
    // JetStream delivered it once and it is still out; no redelivery event.
    let held = inbox(nats.url(), "worker").await;
    assert_eq!((held.deliveries, held.unacked), (1, 1), "{held:?}");
    let timeline = client.get_run(d.run_id()).await.unwrap().timeline;
    assert_eq!(count(&timeline, &[pb::EventKind::Redelivered], |_| true), 0);
    d.nack(Some(Duration::from_millis(300))).await.unwrap();
    let again = tokio::time::timeout(Duration::from_secs(5), async {
        tokio::select! {
            d = a.next_delivery() => d,
            d = b.next_delivery() => d,
        }
    })
    .await
    .expect("redelivered after nack")
    .expect("open")
    .unwrap();
    assert_eq!(again.handoff_id(), d.handoff_id());
    assert_eq!(again.attempt(), 2);
    again.ack().await.unwrap();
}

#[tokio::test]
async fn complete_and_handoff_frees_the_instance_for_its_next_delivery() {
    let (_nats, _broker, client) = stack(|_| {}).await;
    client
        .register_agent(AgentConfig::new("worker"))
        .await
        .unwrap();
    client
        .register_agent(AgentConfig::new("sink"))
        .await
        .unwrap();
    let run = client.start_run(RunConfig::new("o")).await.unwrap();
    for i in 0..3 {
        client
            .handoff(Handoff::to(&run.id, "worker", &note("item", i)).unwrap())
            .await
            .unwrap();
    }
    // One slot: every item must come through it, each finished by a handoff.
    let mut worker = client.subscribe("worker", "only", 1).await.unwrap();
    for i in 0..3 {
        let d = next_within(&mut worker, Duration::from_secs(3))
            .await
            .unwrap_or_else(|| panic!("item {i} never delivered: the slot was not freed"));
        d.handoff(Handoff::to("", "sink", &note("done", i)).unwrap())
            .await
            .unwrap();
    }
    let mut sink = client.subscribe("sink", "s", 10).await.unwrap();
    for _ in 0..3 {
        next_within(&mut sink, Duration::from_secs(3))
            .await
            .expect("result")
            .ack()
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn a_handoff_no_instance_takes_within_max_queue_wait_is_dead_lettered_or_falls_back() {
    let (nats, _broker, client) = stack(|_| {}).await;
    let wait = Duration::from_secs(2);
    client
        .register_agent(AgentConfig::new("idle").max_queue_wait(wait))
        .await
        .unwrap();
    client
        .register_agent(AgentConfig::new("backup"))
        .await
        .unwrap();
    client
        .register_agent(
            AgentConfig::new("covered")
                .max_queue_wait(wait)
                .fallback("backup"),
        )
        .await
        .unwrap();
    let run = client.start_run(RunConfig::new("carol")).await.unwrap();
    let mut owner = client
        .watch(WatchFilter::all().owner("carol").from_sequence(1))
        .await
        .unwrap();
    // No instance of "idle" ever connects.
    let lost = client
        .handoff(Handoff::to(&run.id, "idle", &note("nobody home", 1)).unwrap())
        .await
        .unwrap();
    let seen = events_until(&mut owner, Duration::from_secs(15), |e| {
        e.kind == pb::EventKind::RunFailed as i32
    })
    .await;
    let k = kinds(&seen);
    assert!(k.contains(&"dead_lettered"), "{k:?}");
    let letters = client.dead_letters("idle", 10).await.unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].handoff.as_ref().unwrap().id, lost.handoff_id);
    assert_eq!(letters[0].attempts, 0, "never taken");
    // Withdrawn from the inbox: nothing left for an instance that comes late.
    let state = inbox(nats.url(), "idle").await;
    assert_eq!((state.pending, state.deliveries), (0, 0), "{state:?}");

    // With a fallback, the fallback receives it instead.
    let run2 = client.start_run(RunConfig::new("carol")).await.unwrap();
    let routed = client
        .handoff(Handoff::to(&run2.id, "covered", &note("covered", 2)).unwrap())
        .await
        .unwrap();
    let mut backup = client.subscribe("backup", "b1", 1).await.unwrap();
    let d = next_within(&mut backup, Duration::from_secs(15))
        .await
        .expect("the fallback's delivery");
    assert_eq!(d.envelope().fallback_from, "covered");
    assert_eq!(
        d.envelope().parent_ids,
        std::slice::from_ref(&routed.handoff_id)
    );
    d.ack().await.unwrap();
    let timeline = client.get_run(&run2.id).await.unwrap().timeline;
    assert_eq!(
        count(&timeline, &[pb::EventKind::RoutedToFallback], |_| true),
        1
    );
    assert_eq!(
        client.get_run(&run2.id).await.unwrap().run.unwrap().status,
        pb::RunStatus::Running as i32
    );
}

#[tokio::test]
async fn a_redo_after_the_dedupe_window_is_still_the_same_handoff() {
    // The dedupe window is 2 s and the lease 5 s: the input comes back
    // after the window closed, and the redo (with other content) must
    // still be recognised, from the claim on the consumed delivery.
    let (nats, _broker, client) = stack(|c| {
        c.faults.skip_consume_ack = true;
        c.dedupe_window = Duration::from_secs(2);
    })
    .await;
    client
        .register_agent(AgentConfig::new("worker").lease(Duration::from_secs(5)))
        .await
        .unwrap();
    client
        .register_agent(AgentConfig::new("aggregator"))
        .await
        .unwrap();
    let run = client.start_run(RunConfig::new("o")).await.unwrap();
    client
        .handoff(Handoff::to(&run.id, "worker", &note("input", 1)).unwrap())
        .await
        .unwrap();
    let mut w = client.subscribe("worker", "w1", 1).await.unwrap();
    let d1 = next_within(&mut w, Duration::from_secs(5))
        .await
        .expect("input");
    let started = std::time::Instant::now();
    let r1 = d1
        .handoff(Handoff::to("", "aggregator", &note("result", 1)).unwrap())
        .await
        .unwrap();
    assert!(!r1.duplicate);
    // The input was stored downstream but never acked. The instance
    // crashes; another one takes the input 7 s later, when the window has
    // long closed.
    drop(w);
    tokio::time::sleep(Duration::from_secs(7).saturating_sub(started.elapsed())).await;
    let mut w2 = client.subscribe("worker", "w2", 1).await.unwrap();
    let d2 = next_within(&mut w2, Duration::from_secs(15))
        .await
        .expect("input redelivered");
    assert_eq!(d2.attempt(), 2);
    let r2 = d2
        .handoff(
            Handoff::to("", "aggregator", &note("a different result", 2))
                .unwrap()
                .idempotency_key("redo"),
        )
        .await
        .unwrap();
    assert!(r2.duplicate, "answered from the claim, after the window");
    assert_eq!(r2.handoff_id, r1.handoff_id);
    assert_eq!(r2.sequence, r1.sequence);
    d2.ack().await.unwrap();
    let mut agg = client.subscribe("aggregator", "a", 10).await.unwrap();
    let got = next_within(&mut agg, Duration::from_secs(5))
        .await
        .expect("downstream");
    assert_eq!(got.handoff_id(), r1.handoff_id);
    assert_eq!(got.payload::<Note>().unwrap().n, 1, "the first result");
    got.ack().await.unwrap();
    let inbox = settled_inbox(nats.url(), "aggregator").await;
    assert_eq!((inbox.stored, inbox.deliveries), (1, 1), "{inbox:?}");
    let timeline = client.get_run(&run.id).await.unwrap().timeline;
    let accepted = timeline
        .iter()
        .filter(|e| {
            e.kind == pb::EventKind::HandoffAccepted as i32 && e.handoff_id == r1.handoff_id
        })
        .count();
    assert_eq!(accepted, 1, "announced once");
}

#[tokio::test]
async fn events_of_acks_made_while_the_events_stream_is_unavailable_are_stored_later() {
    let (nats, _broker, client) = stack(|_| {}).await;
    client
        .register_agent(AgentConfig::new("worker"))
        .await
        .unwrap();
    let run = client.start_run(RunConfig::new("o")).await.unwrap();
    for n in 0..5 {
        client
            .handoff(Handoff::to(&run.id, "worker", &note("task", n)).unwrap())
            .await
            .unwrap();
    }
    let mut sub = client.subscribe("worker", "w", 5).await.unwrap();
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(
            next_within(&mut sub, Duration::from_secs(5))
                .await
                .expect("delivery"),
        );
    }
    timeline_when(&client, &run.id, |t| {
        count(t, &[pb::EventKind::Delivered], |_| true) == 5
    })
    .await;
    // The events stream stops taking events (its subjects moved away):
    // every publish to it fails, as when JetStream is unavailable.
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let mut stream = js.get_stream("HANDOFF_EVENTS").await.unwrap();
    let mut config = stream.info().await.unwrap().config.clone();
    let subjects = config.subjects.clone();
    config.subjects = vec!["handoff.v1.paused.>".into()];
    js.update_stream(config.clone()).await.unwrap();
    let before = stream.info().await.unwrap().state.messages;
    for d in &held {
        d.ack().await.expect("the ack itself succeeds");
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let during = stream.info().await.unwrap().state.messages;
    assert_eq!(during, before, "nothing stored while the stream is away");
    config.subjects = subjects;
    js.update_stream(config).await.unwrap();
    // Retried until stored: every ack's event, once.
    let after = timeline_when(&client, &run.id, |t| {
        count(t, &[pb::EventKind::Acked], |_| true) == 5
    })
    .await;
    for d in &held {
        let acked = count(&after, &[pb::EventKind::Acked], |e| {
            e.handoff_id == d.handoff_id()
        });
        assert_eq!(acked, 1, "{}", d.handoff_id());
    }
}

#[tokio::test]
async fn a_claim_left_by_a_broker_that_died_before_storing_refuses_no_redo() {
    let nats = handoff_tests::Nats::start().await;
    let healthy = handoff_tests::Broker::start(nats.url(), |_| {}).await;
    let dying = handoff_tests::Broker::start(nats.url(), |c| c.faults.die_after_claim = true).await;
    let client = healthy.client().await;
    let through_dying = dying.client().await;
    for a in ["planner", "worker", "critic"] {
        client.register_agent(AgentConfig::new(a)).await.unwrap();
    }
    let run = client.start_run(RunConfig::new("o")).await.unwrap();
    client
        .handoff(Handoff::to(&run.id, "planner", &note("ask", 0)).unwrap())
        .await
        .unwrap();
    let mut p1 = client.subscribe("planner", "p1", 1).await.unwrap();
    let d1 = next_within(&mut p1, Duration::from_secs(5))
        .await
        .expect("input");
    // The complete-and-handoff reaches a broker that claims the input and
    // dies before storing anything.
    let mut to_worker = Handoff::to(&run.id, "worker", &note("plan a", 1))
        .unwrap()
        .from_agent("planner")
        .request()
        .clone();
    to_worker.consumes = d1.id().to_string();
    let died = through_dying
        .handoff(Handoff::from_request(to_worker))
        .await
        .expect_err("the broker died");
    assert_eq!(died.code(), Some(tonic::Code::Unavailable));
    // The planner crashes too; its input comes back, and its redo picks
    // another target.
    drop(p1);
    let mut p2 = client.subscribe("planner", "p2", 1).await.unwrap();
    let d2 = next_within(&mut p2, Duration::from_secs(5))
        .await
        .expect("input redelivered");
    assert_eq!(d2.attempt(), 2);
    let redo = d2
        .handoff(Handoff::to("", "critic", &note("plan b", 2)).unwrap())
        .await
        .expect("the left claim refuses no redo");
    assert!(!redo.duplicate);
    assert_eq!(inbox(nats.url(), "critic").await.stored, 1);
    assert_eq!(
        inbox(nats.url(), "worker").await.stored,
        0,
        "nothing of plan a"
    );
}
