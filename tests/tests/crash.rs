//! `kill -9` of `handoffd`: nothing accepted is lost, nothing is done twice.
//!
//! Where the broker dies (how many deliveries an instance holds, and how
//! many of those it has acked) comes from a seed: `HANDOFF_TEST_SEED`
//! replays one.

use std::{collections::HashSet, time::Duration};

use handoff_client::{pb, AgentConfig, Handoff, RunConfig};
use handoff_tests::{
    count, next_within, note, seed, settled_inbox, timeline_when, BrokerProcess, Nats, Note,
    XorShift,
};

const BIN: &str = env!("CARGO_BIN_EXE_handoffd-under-test");

#[tokio::test]
async fn kill_9_with_100_undelivered_handoffs_loses_none_and_repeats_none() {
    let mut rng = XorShift::new(seed(
        module_path!(),
        "kill_9_with_100_undelivered_handoffs_loses_none_and_repeats_none",
    ));
    // One instance takes `taken` deliveries, finishes `finished` of them
    // (acks confirmed) and holds the rest when the broker is killed.
    let taken = 1 + rng.below(50) as usize;
    let finished = rng.below(taken as u64 + 1) as usize;
    println!("the instance takes {taken} deliveries and acks {finished} before the broker dies");
    let nats = Nats::start().await;
    let first = BrokerProcess::spawn(BIN, nats.url(), &[]).await;
    let client = first.client().await;
    client
        .register_agent(AgentConfig::new("worker").lease(Duration::from_secs(1)))
        .await
        .unwrap();
    let run = client.start_run(RunConfig::new("o")).await.unwrap();
    let mut accepted = HashSet::new();
    for i in 0..100 {
        let r = client
            .handoff(Handoff::to(&run.id, "worker", &note("job", i)).unwrap())
            .await
            .unwrap();
        accepted.insert(r.handoff_id);
    }
    assert_eq!(accepted.len(), 100);
    let mut sub = client
        .subscribe("worker", "before", taken as u32)
        .await
        .unwrap();
    let mut done = HashSet::new();
    let mut held = Vec::new();
    while done.len() + held.len() < taken {
        let d = next_within(&mut sub, Duration::from_secs(5))
            .await
            .expect("delivery before the crash");
        if done.len() < finished {
            d.ack().await.unwrap();
            done.insert(d.handoff_id().to_string());
        } else {
            held.push(d);
        }
    }
    first.kill9().await;
    drop(sub);

    let second = BrokerProcess::spawn(BIN, nats.url(), &[]).await;
    let client = second.client().await;
    let mut sub = client.subscribe("worker", "after", 50).await.unwrap();
    let mut after = Vec::new();
    while let Some(d) = next_within(&mut sub, Duration::from_secs(4)).await {
        d.payload::<Note>().unwrap();
        d.ack().await.unwrap();
        after.push(d.handoff_id().to_string());
    }
    let after_set: HashSet<_> = after.iter().cloned().collect();
    // The evidence that nothing more was coming: the inbox holds the 100
    // handoffs once each and has nothing left to deliver, and the run's
    // timeline records each delivery to the new instance once.
    let inbox = settled_inbox(nats.url(), "worker").await;
    assert_eq!(inbox.stored, 100, "{inbox:?}");
    let to_after = |t: &[pb::Event], id: &str| {
        count(
            t,
            &[pb::EventKind::Delivered, pb::EventKind::Redelivered],
            |e| e.instance == "after" && e.handoff_id == id,
        )
    };
    let timeline = timeline_when(&client, &run.id, |t| {
        after.iter().all(|id| to_after(t, id) > 0)
    })
    .await;
    for id in &after_set {
        assert_eq!(
            to_after(&timeline, id),
            1,
            "{id} delivered twice after the restart"
        );
    }
    for id in &done {
        assert_eq!(
            to_after(&timeline, id),
            0,
            "{id} acked before the crash, delivered again"
        );
    }
    assert_eq!(
        after.len(),
        after_set.len(),
        "no handoff delivered twice after the restart"
    );
    assert!(
        done.is_disjoint(&after_set),
        "acked before the crash: never again"
    );
    let all: HashSet<_> = done.union(&after_set).cloned().collect();
    assert_eq!(all, accepted, "every accepted handoff delivered");
    for h in &held {
        assert!(
            after_set.contains(h.handoff_id()),
            "held delivery redelivered"
        );
    }
    assert_eq!(
        second.terminate().await,
        Some(0),
        "graceful exit on SIGTERM"
    );
}
