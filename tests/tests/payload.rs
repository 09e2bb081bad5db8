//! Large payloads by reference: a payload over `max_inline_payload` is
//! stored in the `handoff_payloads` object store, checked whole against
//! the target's contract, delivered intact (the SDK fetches and verifies
//! it), forwarded by reference; bad sizes and bad references are refused
//! by reason; a barrier release too large for one NATS message carries
//! its branches by reference and `join` reads them intact.

use std::time::Duration;

use handoff_client::{
    pb, AgentConfig, Client, ContractSpec, ErrorKind, Handoff, RunConfig, StateDelta,
};
use handoff_tests::{agent_and_run, compile_proto, next_within, note, stack, XorShift};
use sha2::Digest as _;

const WAIT: Duration = Duration::from_secs(60);

const DOCUMENT_PROTO: &str = r#"
syntax = "proto3";
package handoff.test.payload;
message Document {
  string title = 1;
  bytes body = 2;
}
"#;

#[derive(Clone, PartialEq, prost::Message)]
struct Document {
    #[prost(string, tag = "1")]
    title: String,
    #[prost(bytes = "vec", tag = "2")]
    body: Vec<u8>,
}

impl prost::Name for Document {
    const NAME: &'static str = "Document";
    const PACKAGE: &'static str = "handoff.test.payload";
}

/// `len` bytes that differ from any shifted or truncated copy of
/// themselves, so a lost or moved chunk shows.
fn body(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = XorShift::new(seed);
    (0..len).map(|_| rng.below(256) as u8).collect()
}

fn document(title: &str, len: usize, seed: u64) -> Document {
    Document {
        title: title.to_string(),
        body: body(len, seed),
    }
}

/// Registers `Document` (requiring a title) as a contract and `agent` as
/// accepting it.
async fn document_agent(client: &Client, agent: &str) {
    let fds = compile_proto(&[("payload/v1/payload.proto", DOCUMENT_PROTO)]);
    client
        .register_contract(ContractSpec::of::<Document>(fds).require("title"))
        .await
        .expect("contract");
    client
        .register_agent(AgentConfig::new(agent).accepts::<Document>())
        .await
        .expect("agent");
}

/// Registers the aggregator, starts a run and opens barrier `join` of it
/// with the branches of `branches` (its other fields are filled in).
async fn barrier_run(client: &Client, branches: pb::BarrierSpec) -> pb::Run {
    let run = agent_and_run(client, "aggregator", RunConfig::new("owner")).await;
    client
        .raw()
        .open_barrier(pb::OpenBarrierRequest {
            barrier: Some(pb::BarrierSpec {
                run_id: run.id.clone(),
                barrier_id: "join".into(),
                target_agent: "aggregator".into(),
                ..branches
            }),
        })
        .await
        .expect("open");
    run
}

fn hex_sha256(bytes: &[u8]) -> String {
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test]
async fn a_16_mib_payload_is_checked_whole_and_delivered_intact() {
    let (_nats, _broker, client) = stack(|_| {}).await;
    document_agent(&client, "reader").await;
    let run = client
        .start_run(RunConfig::new("owner"))
        .await
        .expect("run");

    // The contract sees the whole 16 MiB: a document without its title is
    // refused at the door.
    let untitled = document("", 16 << 20, 1);
    let err = client
        .handoff(Handoff::to(&run.id, "reader", &untitled).expect("handoff"))
        .await
        .expect_err("missing title");
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    assert_eq!(err.reason(), Some("MISSING_REQUIRED_FIELDS"), "{err}");
    assert_eq!(
        err.metadata().get("fields").map(String::as_str),
        Some("title")
    );

    let sent = document("the report", 16 << 20, 2);
    client
        .handoff(Handoff::to(&run.id, "reader", &sent).expect("handoff"))
        .await
        .expect("accepted");
    let mut sub = client
        .subscribe("reader", "r1", 1)
        .await
        .expect("subscribe");
    let d = next_within(&mut sub, WAIT).await.expect("delivered");
    // It travelled by reference, and reads as if inline, byte for byte.
    let reference = d.payload_ref().cloned().expect("stored by reference");
    let encoded = prost::Message::encode_to_vec(&sent);
    assert_eq!(reference.size, encoded.len() as u64);
    assert_eq!(reference.sha256, hex_sha256(&encoded));
    assert_eq!(reference.name, format!("{}/{}", run.id, reference.sha256));
    assert_eq!(
        d.envelope().payload.as_ref().map(|p| p.value.as_slice()),
        Some(encoded.as_slice())
    );
    let got: Document = d.payload().expect("decodes");
    assert!(got == sent, "the payload arrived altered");
    assert_eq!(
        d.contract().map(|(t, _)| t),
        Some("handoff.test.payload.Document")
    );
    // GetPayload answers it as the object store reads it: in chunks of
    // 1 MiB (fewer bytes only in the last), its reference on the first.
    let mut chunks = client
        .raw()
        .get_payload(pb::GetPayloadRequest {
            run_id: run.id.clone(),
            name: reference.name.clone(),
            delivery_id: String::new(),
        })
        .await
        .expect("get payload")
        .into_inner();
    let (mut sizes, mut refs, mut value) = (Vec::new(), Vec::new(), Vec::new());
    while let Some(chunk) = futures::StreamExt::next(&mut chunks).await {
        let chunk = chunk.expect("chunk");
        sizes.push(chunk.data.len());
        refs.push(chunk.r#ref);
        value.extend_from_slice(&chunk.data);
    }
    assert!(value == encoded, "the chunks do not add up to the payload");
    let whole = encoded.len() / (1 << 20);
    assert_eq!(sizes.len(), whole + 1, "{sizes:?}");
    assert!(sizes[..whole].iter().all(|&s| s == 1 << 20), "{sizes:?}");
    assert_eq!(sizes[whole], encoded.len() % (1 << 20));
    let first = refs[0]
        .clone()
        .expect("the first chunk carries the reference");
    assert_eq!(
        (first.name, first.size, first.sha256),
        (
            reference.name.clone(),
            reference.size,
            reference.sha256.clone()
        )
    );
    assert!(refs[1..].iter().all(Option::is_none));
    d.ack().await.expect("ack");
}

#[tokio::test]
async fn a_payload_over_max_payload_size_is_refused_naming_both_sizes() {
    let (_nats, _broker, client) = stack(|c| c.max_payload_size = 1 << 20).await;
    let run = agent_and_run(&client, "reader", RunConfig::new("owner")).await;
    let big = document("too big", 2 << 20, 3);
    let size = prost_types::Any::from_msg(&big)
        .map(|a| prost::Message::encoded_len(&a))
        .expect("any");
    let err = client
        .handoff(Handoff::to(&run.id, "reader", &big).expect("handoff"))
        .await
        .expect_err("over max_payload_size");
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    assert_eq!(err.reason(), Some("PAYLOAD_TOO_LARGE"), "{err}");
    assert_eq!(
        err.metadata().get("size").map(String::as_str),
        Some(size.to_string().as_str())
    );
    assert_eq!(
        err.metadata().get("limit").map(String::as_str),
        Some("1048576")
    );
    // Under it (and over max_inline_payload): accepted, by reference.
    let fits = document("fits", 900 << 10, 4);
    client
        .handoff(Handoff::to(&run.id, "reader", &fits).expect("handoff"))
        .await
        .expect("accepted");
    let mut sub = client.subscribe("reader", "r1", 1).await.expect("sub");
    let d = next_within(&mut sub, WAIT).await.expect("delivered");
    assert!(d.payload_ref().is_some());
    assert!(d.payload::<Document>().expect("decodes") == fits);
    // Only the one that fits was stored.
    let accepted = client
        .get_run(&run.id)
        .await
        .expect("run")
        .timeline
        .iter()
        .filter(|e| e.kind == pb::EventKind::HandoffAccepted as i32)
        .count();
    assert_eq!(accepted, 1);
}

#[tokio::test]
async fn references_to_no_object_to_a_wrong_digest_or_to_another_run_are_refused() {
    let (_nats, _broker, client) = stack(|_| {}).await;
    for agent in ["a", "b"] {
        client
            .register_agent(AgentConfig::new(agent))
            .await
            .expect("agent");
    }
    let run = client
        .start_run(RunConfig::new("owner"))
        .await
        .expect("run");
    let other = client
        .start_run(RunConfig::new("owner"))
        .await
        .expect("run");
    let sent = document("one", 1 << 20, 5);
    client
        .handoff(Handoff::to(&run.id, "a", &sent).expect("handoff"))
        .await
        .expect("accepted");
    let mut sub = client.subscribe("a", "a1", 1).await.expect("sub");
    let d = next_within(&mut sub, WAIT).await.expect("delivered");
    let good = d.payload_ref().cloned().expect("by reference");

    let refused = |r: pb::PayloadRef, run_id: String| {
        let client = client.clone();
        async move {
            client
                .handoff(Handoff::forward(run_id, "b", &r))
                .await
                .expect_err("refused")
        }
    };
    // No such object.
    let zeros = "0".repeat(64);
    let missing = pb::PayloadRef {
        name: format!("{}/{zeros}", run.id),
        sha256: zeros.clone(),
        ..good.clone()
    };
    let err = refused(missing, run.id.clone()).await;
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert_eq!(err.reason(), Some("PAYLOAD_NOT_FOUND"), "{err}");
    // The object, with another digest, or another size.
    let wrong_digest = pb::PayloadRef {
        sha256: zeros,
        ..good.clone()
    };
    let err = refused(wrong_digest, run.id.clone()).await;
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    assert_eq!(err.reason(), Some("PAYLOAD_DIGEST_MISMATCH"), "{err}");
    assert_eq!(
        err.metadata().get("stored_sha256").map(String::as_str),
        Some(good.sha256.as_str())
    );
    let wrong_size = pb::PayloadRef {
        size: good.size - 1,
        ..good.clone()
    };
    let err = refused(wrong_size, run.id.clone()).await;
    assert_eq!(err.reason(), Some("PAYLOAD_DIGEST_MISMATCH"), "{err}");
    // Another run's payload may not be referenced.
    let err = refused(good.clone(), other.id.clone()).await;
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    assert_eq!(err.reason(), Some("MALFORMED_REQUEST"), "{err}");
    // Nothing was stored for any of them.
    for id in [&run.id, &other.id] {
        let accepted = client
            .get_run(id)
            .await
            .expect("run")
            .timeline
            .iter()
            .filter(|e| e.kind == pb::EventKind::HandoffAccepted as i32)
            .count();
        assert_eq!(accepted, usize::from(id == &run.id), "run {id}");
    }
    d.ack().await.expect("ack");
}

#[tokio::test]
async fn a_delivered_reference_is_forwarded_to_the_next_hop_and_checked_there() {
    let (_nats, _broker, client) = stack(|_| {}).await;
    document_agent(&client, "b").await;
    client
        .register_agent(AgentConfig::new("a").emits::<Document>())
        .await
        .expect("agent");
    let run = client
        .start_run(RunConfig::new("owner"))
        .await
        .expect("run");
    let mut a = client.subscribe("a", "a1", 1).await.expect("sub");
    let mut b = client.subscribe("b", "b1", 1).await.expect("sub");

    // b's contract is checked on the referenced payload, fetched whole.
    let untitled = document("", 2 << 20, 6);
    client
        .handoff(Handoff::to(&run.id, "a", &untitled).expect("handoff"))
        .await
        .expect("to a");
    let d = next_within(&mut a, WAIT).await.expect("delivered");
    let err = d.forward_to("b").await.expect_err("missing title");
    assert_eq!(err.reason(), Some("MISSING_REQUIRED_FIELDS"), "{err}");
    d.ack().await.expect("ack");

    let sent = document("forwarded", 2 << 20, 7);
    client
        .handoff(Handoff::to(&run.id, "a", &sent).expect("handoff"))
        .await
        .expect("to a");
    let d = next_within(&mut a, WAIT).await.expect("delivered");
    let at_a = d.payload_ref().cloned().expect("by reference");
    let receipt = d.forward_to("b").await.expect("forwarded");
    assert_eq!(receipt.depth, 2);
    let got = next_within(&mut b, WAIT).await.expect("delivered to b");
    // The same object, not uploaded again, and intact.
    assert_eq!(got.payload_ref(), Some(&at_a));
    assert!(got.payload::<Document>().expect("decodes") == sent);
    got.ack().await.expect("ack");
}

#[tokio::test]
async fn a_release_of_50_branches_of_100_kib_is_delivered_intact_through_join() {
    let (_nats, _broker, client) = stack(|_| {}).await;
    let run = barrier_run(
        &client,
        pb::BarrierSpec {
            branch_count: 50,
            ..Default::default()
        },
    )
    .await;
    let mut sent = Vec::new();
    for i in 0..50u64 {
        let doc = document(&format!("part {i}"), 100 << 10, 100 + i);
        client
            .handoff(Handoff::to_barrier(&run.id, "join", i.to_string(), &doc).expect("branch"))
            .await
            .unwrap_or_else(|e| panic!("branch {i}: {e}"));
        sent.push(doc);
    }
    let mut sub = client
        .subscribe("aggregator", "agg1", 1)
        .await
        .expect("sub");
    let release = next_within(&mut sub, WAIT).await.expect("released");
    // About 5 MiB: over one NATS message, so it went by reference.
    assert!(release.payload_ref().is_some(), "the release went inline");
    let join = release.join::<Document>().expect("join");
    assert!(join.missing.is_empty() && join.failed.is_empty());
    let results: Vec<(&str, &Document)> = join.results().collect();
    assert_eq!(results.len(), 50);
    for (i, (key, doc)) in results.iter().enumerate() {
        assert_eq!(*key, i.to_string());
        assert!(**doc == sent[i], "branch {i} arrived altered");
    }
    release.ack().await.expect("ack");
}

#[tokio::test]
async fn join_resolves_a_branch_whose_payload_is_a_reference() {
    let (_nats, _broker, client) = stack(|_| {}).await;
    let run = barrier_run(
        &client,
        pb::BarrierSpec {
            branch_keys: vec!["large".into(), "small".into()],
            ..Default::default()
        },
    )
    .await;
    let large = document("large", 3 << 20, 8);
    let small = document("small", 10, 9);
    for (key, doc) in [("large", &large), ("small", &small)] {
        client
            .handoff(Handoff::to_barrier(&run.id, "join", key, doc).expect("branch"))
            .await
            .expect("branch");
    }
    let mut sub = client
        .subscribe("aggregator", "agg1", 1)
        .await
        .expect("sub");
    let release = next_within(&mut sub, WAIT).await.expect("released");
    let stored = release.release().expect("a release");
    let by_ref = stored
        .branches
        .iter()
        .find(|b| b.key == "large")
        .and_then(|b| b.payload_ref.clone())
        .expect("the large branch went by reference");
    assert_eq!(by_ref.name, format!("{}/{}", run.id, by_ref.sha256));
    let join = release.join::<Document>().expect("join");
    assert!(join.branch("large").and_then(|b| b.result.as_ref()) == Some(&large));
    assert!(join.branch("small").and_then(|b| b.result.as_ref()) == Some(&small));
    release.ack().await.expect("ack");
}

/// Whether the object store keeps a payload of `run_id` with `value`.
async fn object_kept(nats_url: &str, run_id: &str, value: &[u8]) -> bool {
    let nats = async_nats::connect(nats_url).await.expect("connect");
    let js = async_nats::jetstream::new(nats);
    let store = js
        .get_object_store("handoff_payloads")
        .await
        .expect("the payload store");
    let name = format!("{run_id}/{}", hex_sha256(value));
    match store.info(&name).await {
        Ok(info) => !info.deleted,
        Err(e) if e.kind() == async_nats::jetstream::object_store::InfoErrorKind::NotFound => false,
        Err(e) => panic!("reading {name}: {e}"),
    }
}

#[tokio::test]
async fn a_handoff_refused_after_its_guards_leaves_no_payload_behind() {
    let (nats, _broker, client) = stack(|_| {}).await;
    document_agent(&client, "reader").await;
    client
        .register_agent(AgentConfig::new("aggregator"))
        .await
        .expect("aggregator");
    let run = client
        .start_run(RunConfig::new("owner").state("city", "Oslo"))
        .await
        .expect("run");
    let doc = document("by reference", 2 << 20, 5);
    let value = prost::Message::encode_to_vec(&doc);
    let moved = Handoff::to(&run.id, "aggregator", &note("moved", 1))
        .expect("handoff")
        .state_delta(StateDelta::based_on(1).set("city", "Rome"));
    client.handoff(moved).await.expect("the city changes");
    // Its delta conflicts with the change above: refused once its payload
    // was checked and could have been stored.
    let stale = Handoff::to(&run.id, "reader", &doc)
        .expect("handoff")
        .state_delta(StateDelta::based_on(1).set("city", "Bergen"));
    let err = client.handoff(stale).await.expect_err("stale base");
    assert_eq!(err.reason(), Some("STATE_CONFLICT"), "{err}");
    // A branch result for a key its barrier does not have.
    client
        .raw()
        .open_barrier(pb::OpenBarrierRequest {
            barrier: Some(pb::BarrierSpec {
                run_id: run.id.clone(),
                barrier_id: "join".into(),
                target_agent: "aggregator".into(),
                branch_keys: vec!["a".into()],
                ..Default::default()
            }),
        })
        .await
        .expect("open");
    let stray = Handoff::to_barrier(&run.id, "join", "z", &doc).expect("handoff");
    let err = client.handoff(stray).await.expect_err("unknown key");
    assert_eq!(err.reason(), Some("UNKNOWN_BRANCH_KEY"), "{err}");
    assert!(
        !object_kept(nats.url(), &run.id, &value).await,
        "a refused handoff left its payload in the object store"
    );
    // Accepted, the same payload is kept under the name looked up above.
    client
        .handoff(Handoff::to(&run.id, "reader", &doc).expect("handoff"))
        .await
        .expect("accepted");
    assert!(object_kept(nats.url(), &run.id, &value).await);
}
