//! Who is alive: `ListInstances` shows every live Subscribe session of an
//! agent on every replica, a session that ends leaves the list at once,
//! and the sessions of a replica killed with SIGKILL leave it when their
//! records expire. Against real `handoffd` processes and `nats-server`.

use std::time::{Duration, Instant};

use handoff_client::{pb, AgentConfig, Client, Handoff, RunConfig};
use handoff_tests::{
    next_within, note,
    secured::{refused, Secured},
    stack, BrokerProcess, Nats,
};
use tonic::Code;

const BIN: &str = env!("CARGO_BIN_EXE_handoffd-under-test");

/// Polls `client` until `agent`'s instances satisfy `done`, for at most
/// `within`; the last list either way.
async fn instances_until(
    client: &Client,
    agent: &str,
    within: Duration,
    done: impl Fn(&[pb::Instance]) -> bool,
) -> Vec<pb::Instance> {
    let deadline = Instant::now() + within;
    loop {
        let found = client.list_instances(Some(agent)).await.expect("list");
        if done(&found) || Instant::now() >= deadline {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The (instance, replica) pairs of a list, sorted.
fn names(found: &[pb::Instance]) -> Vec<(String, String)> {
    let mut out: Vec<_> = found
        .iter()
        .map(|i| (i.instance.clone(), i.replica.clone()))
        .collect();
    out.sort();
    out
}

#[tokio::test]
async fn instances_across_two_replicas_are_listed_until_they_leave_or_their_replica_dies() {
    let nats = Nats::start().await;
    let a = BrokerProcess::spawn(
        BIN,
        nats.url(),
        &[
            ("HANDOFF_REPLICA_NAME", "replica-a"),
            ("HANDOFF_INSTANCE_EXPIRY", "20s"),
        ],
    )
    .await;
    let b = BrokerProcess::spawn(
        BIN,
        nats.url(),
        &[
            ("HANDOFF_REPLICA_NAME", "replica-b"),
            ("HANDOFF_INSTANCE_EXPIRY", "3s"),
        ],
    )
    .await;
    let (on_a, on_b) = (a.client().await, b.client().await);
    on_a.register_agent(AgentConfig::new("worker"))
        .await
        .expect("register");
    on_a.register_agent(AgentConfig::new("other"))
        .await
        .expect("register");
    let subscribed = Instant::now();
    let _w1 = on_a.subscribe("worker", "w1", 2).await.expect("w1");
    let w2 = on_a.subscribe("worker", "w2", 1).await.expect("w2");
    let _w3 = on_b.subscribe("worker", "w3", 1).await.expect("w3");
    let _o1 = on_b.subscribe("other", "o1", 1).await.expect("o1");

    // Three instances of `worker`, on two replicas, whichever replica is
    // asked.
    let three = |f: &[pb::Instance]| f.len() == 3;
    let found = instances_until(&on_b, "worker", Duration::from_secs(10), three).await;
    assert_eq!(
        names(&found),
        [
            ("w1".to_string(), "replica-a".to_string()),
            ("w2".to_string(), "replica-a".to_string()),
            ("w3".to_string(), "replica-b".to_string()),
        ]
    );
    for i in &found {
        assert_eq!(i.agent, "worker");
        assert!(i.connected_since.is_some() && i.seen_at.is_some(), "{i:?}");
        assert!(!i.session.is_empty());
        assert_eq!(i.in_flight, 0);
    }
    let w1 = found.iter().find(|i| i.instance == "w1").expect("w1");
    assert_eq!(w1.max_in_flight, 2);
    assert_eq!(
        names(&on_a.list_instances(Some("worker")).await.expect("list")),
        names(&found)
    );
    // Every agent's, by agent.
    let every = on_a.list_instances(None).await.expect("every agent");
    let agents: Vec<&str> = every.iter().map(|i| i.agent.as_str()).collect();
    assert_eq!(agents, ["other", "worker", "worker", "worker"]);

    // An instance that leaves is gone at once: well before its record
    // (20 s on replica-a) could expire.
    drop(w2);
    let left = Instant::now();
    let two = |f: &[pb::Instance]| f.len() == 2;
    let found = instances_until(&on_a, "worker", Duration::from_secs(5), two).await;
    assert_eq!(names(&found).len(), 2, "{found:?}");
    assert!(!names(&found).iter().any(|(i, _)| i == "w2"));
    assert!(left.elapsed() < Duration::from_secs(5));

    // Replica b killed: its instance stays listed until its record
    // expires (3 s after its last refresh), then only replica a's is left.
    b.kill9().await;
    let killed = Instant::now();
    let listed = on_a.list_instances(Some("worker")).await.expect("list");
    assert!(
        listed.iter().any(|i| i.instance == "w3"),
        "a killed replica cannot remove its records: {listed:?}"
    );
    let one = |f: &[pb::Instance]| f.len() == 1;
    let found = instances_until(&on_a, "worker", Duration::from_secs(10), one).await;
    assert_eq!(
        names(&found),
        [("w1".to_string(), "replica-a".to_string())],
        "{:?} after {:?}",
        found,
        killed.elapsed()
    );
    assert!(killed.elapsed() <= Duration::from_secs(3) + Duration::from_secs(2));
    assert!(subscribed.elapsed() > Duration::from_secs(1));
    // The records are small: the bucket reserves 64 MiB, not the 1 GiB of
    // the other streams.
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.expect("nats"));
    let mut bucket = js
        .get_stream("KV_handoff_instances")
        .await
        .expect("the bucket");
    let config = bucket.info().await.expect("info").config.clone();
    assert_eq!(config.max_bytes, 64 * 1024 * 1024);
    assert!(config.allow_message_ttl);
}

#[tokio::test]
async fn listing_instances_needs_the_read_grant_and_a_valid_agent_name() {
    let s = Secured::start(Duration::from_secs(5), |_| {}).await;
    let (planner, _) = s
        .principal("planner", &[(pb::GrantAction::SendAs, "planner", false)])
        .await;
    refused(
        planner.list_instances(Some("worker")).await,
        Code::PermissionDenied,
        "NOT_GRANTED",
    );
    let (reader, _) = s
        .principal("reader", &[(pb::GrantAction::Read, "", false)])
        .await;
    assert!(reader
        .list_instances(Some("worker"))
        .await
        .expect("a reader lists")
        .is_empty());
    refused(
        reader.list_instances(Some("no.dots")).await,
        Code::InvalidArgument,
        "INVALID_NAME",
    );
}

/// `agent`'s status once it satisfies `done` (polled for at most 10 s);
/// the last one either way.
async fn status_until(
    client: &Client,
    agent: &str,
    done: impl Fn(&pb::AgentStatus) -> bool,
) -> pb::AgentStatus {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let all = client.agent_status().await.expect("status");
        let found = all.into_iter().find(|s| s.name == agent).expect("listed");
        if done(&found) || Instant::now() >= deadline {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn list_agents_tells_live_instances_pending_in_flight_and_unattended_work() {
    let (_nats, _broker, client) = stack(|_| {}).await;
    client
        .register_agent(AgentConfig::new("worker"))
        .await
        .expect("register");
    let idle = status_until(&client, "worker", |_| true).await;
    assert_eq!((idle.instances, idle.pending, idle.in_flight), (0, 0, 0));
    assert!(!idle.unattended && idle.oldest_pending_age.is_none());

    // Two handoffs and nobody to take them: unattended, the oldest's wait
    // growing.
    let run = client.start_run(RunConfig::new("ops")).await.expect("run");
    for n in 0..2 {
        client
            .handoff(Handoff::to(&run.id, "worker", &note("task", n)).expect("handoff"))
            .await
            .expect("stored");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let waiting = status_until(&client, "worker", |s| s.pending == 2).await;
    assert_eq!(
        (waiting.instances, waiting.pending, waiting.in_flight),
        (0, 2, 0)
    );
    assert!(waiting.unattended);
    let age = waiting
        .oldest_pending_age
        .and_then(|d| Duration::try_from(d).ok())
        .expect("the oldest pending handoff's age");
    assert!(age >= Duration::from_millis(300), "{age:?}");

    // One instance, holding one of them: attended, one pending, one in
    // flight.
    let mut sub = client
        .subscribe("worker", "w1", 1)
        .await
        .expect("subscribe");
    let d = next_within(&mut sub, Duration::from_secs(5))
        .await
        .expect("delivered");
    let taken = status_until(&client, "worker", |s| s.instances == 1 && s.in_flight == 1).await;
    assert_eq!((taken.instances, taken.pending, taken.in_flight), (1, 1, 1));
    assert!(!taken.unattended);
    d.ack().await.expect("ack");
    let second = next_within(&mut sub, Duration::from_secs(5))
        .await
        .expect("the second");
    second.ack().await.expect("ack");
    let done = status_until(&client, "worker", |s| s.pending == 0 && s.in_flight == 0).await;
    assert_eq!((done.pending, done.in_flight), (0, 0));
    assert!(done.oldest_pending_age.is_none());
}
