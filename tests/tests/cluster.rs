//! The three-node cluster helper, proved on JetStream itself: an R3 stream
//! loses its leader to SIGKILL, elects another, keeps taking messages, and
//! has all three replicas current again once the node is back.

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, message::PublishMessage, stream};
use handoff_tests::Cluster;

const STREAM: &str = "FAILOVER";

/// Publishes message `n` with `n` as its message id, retrying while the
/// stream is between leaders: a retry of a message that was stored after
/// all is recognised by its id, so each `n` is stored once.
async fn publish(js: &jetstream::Context, n: u32) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let sent = js
            .send_publish(
                "failover.note",
                PublishMessage::build()
                    .message_id(n.to_string())
                    .payload(n.to_string().into()),
            )
            .await;
        let error = match sent {
            Ok(ack) => match ack.await {
                Ok(_) => return,
                Err(e) => e.to_string(),
            },
            Err(e) => e.to_string(),
        };
        assert!(
            Instant::now() < deadline,
            "message {n} not stored within 30 s: {error}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn an_r3_stream_elects_a_new_leader_after_a_kill9_and_catches_up_after_restart() {
    let began = Instant::now();
    let mut cluster = Cluster::start().await;
    println!("cluster formed in {:?}", began.elapsed());
    assert_eq!(cluster.len(), 3);
    assert_eq!(
        (0..3).map(|i| cluster.name(i)).collect::<Vec<_>>(),
        ["n1", "n2", "n3"]
    );
    let meta = cluster.meta_leader().await.expect("a meta leader");
    println!("meta leader: {}", cluster.name(meta));

    let client = async_nats::connect(cluster.urls())
        .await
        .expect("connect to the cluster");
    let mut js = jetstream::new(client);
    js.set_timeout(Duration::from_secs(2));
    js.create_stream(stream::Config {
        name: STREAM.to_string(),
        subjects: vec!["failover.>".to_string()],
        num_replicas: 3,
        ..Default::default()
    })
    .await
    .expect("create an R3 stream");
    for n in 0..10 {
        publish(&js, n).await;
    }
    let before = cluster
        .wait_stream_current(STREAM)
        .await
        .expect("three current replicas");
    assert_eq!(before.replicas.len(), 2, "{before:?}");

    let leader = cluster.stream_leader(STREAM).await.expect("a leader");
    let killed = cluster.name(leader).to_string();
    let pid = cluster.pid(leader).expect("the leader runs");
    cluster.kill9(leader).await;
    assert!(!cluster.is_running(leader));
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "{killed} (pid {pid}) is gone"
    );
    let killed_at = Instant::now();
    let elected = cluster
        .stream_leader(STREAM)
        .await
        .expect("a new leader among the two left");
    println!(
        "stream leader {killed} killed; {} elected after {:?}",
        cluster.name(elected),
        killed_at.elapsed()
    );
    assert_ne!(elected, leader);

    // Publishing goes on with two of three replicas.
    for n in 10..20 {
        publish(&js, n).await;
    }
    let info = js
        .get_stream(STREAM)
        .await
        .expect("stream info")
        .cached_info()
        .clone();
    assert_eq!(info.state.messages, 20);
    let cluster_info = info.cluster.expect("cluster info");
    assert!(
        cluster_info
            .replicas
            .iter()
            .any(|p| p.name == killed && !p.current),
        "the killed node is reported behind: {cluster_info:?}"
    );

    let restarted_at = Instant::now();
    cluster.restart(leader).await.expect("restart");
    assert_eq!(cluster.name(leader), killed);
    let after = cluster
        .wait_stream_current(STREAM)
        .await
        .expect("all three replicas current again");
    println!(
        "{killed} back and current after {:?}; the test took {:?}",
        restarted_at.elapsed(),
        began.elapsed()
    );
    let mut members: Vec<&str> = after.replicas.iter().map(|p| p.name.as_str()).collect();
    members.extend(after.leader.as_deref());
    members.sort_unstable();
    assert_eq!(members, ["n1", "n2", "n3"], "{after:?}");
    assert!(after.replicas.iter().all(|p| p.current && !p.offline));

    // The restarted node serves clients on the port it had...
    let direct = async_nats::connect(cluster.url(leader))
        .await
        .expect("connect to the restarted node");
    let info = jetstream::new(direct)
        .get_stream(STREAM)
        .await
        .expect("stream info through the restarted node")
        .cached_info()
        .clone();
    assert_eq!(info.state.messages, 20);
    // ...and its own copy holds what was published while it was down.
    let jsz = cluster
        .monitor(leader, "/jsz?accounts=true&streams=true")
        .await
        .expect("the restarted node's /jsz");
    let local: Vec<u64> = jsz["account_details"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|a| a["stream_detail"].as_array().into_iter().flatten())
        .filter(|s| s["name"] == STREAM)
        .filter_map(|s| s["state"]["messages"].as_u64())
        .collect();
    assert_eq!(local, [20], "{jsz}");
}
