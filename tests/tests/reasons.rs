//! Every refusal in the README's error table, met through the SDK against
//! a real broker and `nats-server`: its gRPC code and its stable
//! `ErrorInfo.reason` (with the metadata and field violations a program
//! would read), and nothing stored where nothing should be.

use std::{
    collections::HashSet,
    time::{Duration, SystemTime},
};

use handoff_client::{pb, AgentConfig, Client, ContractSpec, Error, Handoff, RunConfig};
use handoff_proto::{
    demo::{Subtask, WorkerResult},
    DEMO_FILE_DESCRIPTOR_SET,
};
use handoff_tests::{compile_proto, next_within, note, stack};
use prost::Message as _;
use tonic::Code;

/// Asserts a refusal's code and reason; returns the error for more checks.
#[track_caller]
fn refused<T: std::fmt::Debug>(r: Result<T, Error>, code: Code, reason: &str) -> Error {
    let err = r.expect_err(reason);
    assert_eq!(err.code(), Some(code), "{reason}: {err}");
    assert_eq!(err.reason(), Some(reason), "{err}");
    err
}

/// The same for a raw gRPC call.
#[track_caller]
fn raw_refused<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code, reason: &str) -> Error {
    refused(r.map_err(Error::from), code, reason)
}

fn any<M: prost::Message + prost::Name>(m: &M) -> prost_types::Any {
    prost_types::Any::from_msg(m).expect("encode")
}

fn subtask(text: &str) -> Subtask {
    Subtask {
        index: 0,
        of: 1,
        instruction: text.into(),
        sources: vec![],
    }
}

async fn run(client: &Client) -> String {
    client
        .start_run(RunConfig::new("owner"))
        .await
        .expect("run")
        .id
}

#[tokio::test]
async fn malformed_input_names_its_field() {
    let (_nats, _broker, client) = stack(|c| c.max_payload_size = 1 << 20).await;
    let mut raw = client.raw();
    client
        .register_agent(AgentConfig::new("worker"))
        .await
        .expect("agent");
    let run_id = run(&client).await;

    let err = refused(
        client.start_run(RunConfig::new("own.er")).await,
        Code::InvalidArgument,
        "INVALID_NAME",
    );
    assert_eq!(
        err.metadata().get("field").map(String::as_str),
        Some("owner")
    );
    assert_eq!(err.field_violations()[0].field, "owner");

    let no_payload = pb::HandoffRequest {
        run_id: run_id.clone(),
        target_agent: "worker".into(),
        ..Default::default()
    };
    let err = raw_refused(
        raw.handoff(no_payload).await,
        Code::InvalidArgument,
        "MALFORMED_REQUEST",
    );
    assert_eq!(err.field_violations()[0].field, "payload");

    let err = refused(
        client
            .handoff(
                Handoff::to(&run_id, "worker", &note("x", 1))
                    .expect("handoff")
                    .confidence(1.5),
            )
            .await,
        Code::InvalidArgument,
        "MALFORMED_REQUEST",
    );
    assert_eq!(err.field_violations()[0].field, "confidence");

    // A request body that is not a protobuf message of the RPC's type.
    let mut grpc = tonic::client::Grpc::new(
        tonic::transport::Endpoint::from_shared(format!("http://{}", _broker.addr))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect"),
    );
    grpc.ready().await.expect("ready");
    let garbage: Result<tonic::Response<pb::StartRunResponse>, tonic::Status> = grpc
        .unary(
            tonic::Request::new(vec![0xff_u8, 0xff, 0xff, 0xff]),
            "/handoff.v1.HandoffBroker/StartRun".parse().expect("path"),
            BytesCodec,
        )
        .await;
    raw_refused(garbage, Code::InvalidArgument, "MALFORMED_REQUEST");

    // A request over the size gRPC accepts (max_payload_size, here 1 MiB,
    // plus 4 MiB).
    let huge = pb::HandoffRequest {
        run_id: run_id.clone(),
        target_agent: "worker".into(),
        payload: Some(prost_types::Any {
            type_url: "type.googleapis.com/x.Y".into(),
            value: vec![7; 6 << 20],
        }),
        ..Default::default()
    };
    let mut big = client.raw().max_encoding_message_size(8 << 20);
    raw_refused(
        big.handoff(huge).await,
        Code::OutOfRange,
        "REQUEST_TOO_LARGE",
    );

    // Subscribe: a max_in_flight over the cap is refused, not capped.
    let err = refused(
        client.subscribe("worker", "w1", 1_000_000).await,
        Code::InvalidArgument,
        "MALFORMED_REQUEST",
    );
    assert_eq!(err.field_violations()[0].field, "open.max_in_flight");

    // A settle command naming no delivery the broker issued: the Settled
    // answer carries the reason.
    let sub = client
        .subscribe("worker", "w1", 1)
        .await
        .expect("subscribe");
    refused(
        sub.ack_id("bm90LWEtdG9rZW4").await,
        Code::InvalidArgument,
        "BAD_DELIVERY_ID",
    );
    let (_, stored) = client
        .get_run(&run_id)
        .await
        .map(|r| (r.run, r.timeline))
        .expect("run");
    assert!(
        !stored
            .iter()
            .any(|e| e.kind == pb::EventKind::HandoffAccepted as i32),
        "no refused handoff was stored"
    );
}

#[tokio::test]
async fn not_found_and_conflicts() {
    let (_nats, _broker, client) = stack(|_| {}).await;
    let mut raw = client.raw();
    client
        .register_agent(AgentConfig::new("aggregator"))
        .await
        .expect("agent");
    let run_id = run(&client).await;

    let err = refused(
        client.get_run("nope").await,
        Code::NotFound,
        "RUN_NOT_FOUND",
    );
    assert_eq!(
        err.metadata().get("run_id").map(String::as_str),
        Some("nope")
    );
    let err = refused(
        client
            .handoff(Handoff::to(&run_id, "ghost", &note("x", 1)).expect("handoff"))
            .await,
        Code::NotFound,
        "AGENT_NOT_FOUND",
    );
    assert_eq!(
        err.metadata().get("agent").map(String::as_str),
        Some("ghost")
    );
    refused(
        client.get_contract("acme.v1.Nothing", 0).await,
        Code::NotFound,
        "CONTRACT_NOT_FOUND",
    );
    refused(
        client.get_barrier(&run_id, "nope").await,
        Code::NotFound,
        "BARRIER_NOT_FOUND",
    );

    client
        .start_run(RunConfig::new("alice").id("taken"))
        .await
        .expect("run");
    refused(
        client.start_run(RunConfig::new("bob").id("taken")).await,
        Code::AlreadyExists,
        "RUN_EXISTS",
    );

    client
        .register_contract(ContractSpec::of::<Subtask>(DEMO_FILE_DESCRIPTOR_SET))
        .await
        .expect("v1");
    refused(
        client
            .register_contract(
                ContractSpec::of::<Subtask>(DEMO_FILE_DESCRIPTOR_SET)
                    .version(1)
                    .max_tokens(9),
            )
            .await,
        Code::AlreadyExists,
        "CONTRACT_CONFLICT",
    );
    refused(
        client
            .register_contract(
                ContractSpec::of::<Subtask>(DEMO_FILE_DESCRIPTOR_SET)
                    .version(5)
                    .max_tokens(9),
            )
            .await,
        Code::FailedPrecondition,
        "VERSION_GAP",
    );
    refused(
        client
            .register_contract(ContractSpec::named("acme.v1.Thing", vec![1, 2, 3]))
            .await,
        Code::InvalidArgument,
        "INVALID_CONTRACT",
    );

    let spec = |n: u32| pb::BarrierSpec {
        run_id: run_id.clone(),
        barrier_id: "join".into(),
        branch_count: n,
        target_agent: "aggregator".into(),
        ..Default::default()
    };
    let open = |n| pb::OpenBarrierRequest {
        barrier: Some(spec(n)),
    };
    raw.open_barrier(open(2)).await.expect("open");
    raw_refused(
        raw.open_barrier(open(3)).await,
        Code::AlreadyExists,
        "BARRIER_CONFLICT",
    );
    raw_refused(
        raw.open_barrier(open(0)).await,
        Code::InvalidArgument,
        "INVALID_BARRIER_SPEC",
    );
    let fan_out = pb::FanOutRequest {
        barrier: Some(pb::BarrierSpec {
            barrier_id: "other".into(),
            ..spec(2)
        }),
        branches: vec![pb::HandoffRequest {
            target_agent: "aggregator".into(),
            branch_key: "7".into(),
            payload: Some(any(&note("x", 1))),
            ..Default::default()
        }],
    };
    let err = raw_refused(
        raw.fan_out(fan_out).await,
        Code::InvalidArgument,
        "UNKNOWN_BRANCH_KEY",
    );
    assert_eq!(err.field_violations()[0].field, "branches[0].branch_key");
}

#[tokio::test]
async fn contract_guards_name_the_rule_and_the_numbers() {
    let (_nats, _broker, client) = stack(|_| {}).await;
    client
        .register_contract(
            ContractSpec::of::<Subtask>(DEMO_FILE_DESCRIPTOR_SET)
                .require("instruction")
                .max_tokens(20)
                .max_bytes(200)
                .min_confidence(0.5)
                .max_tool_result_age(Duration::from_secs(60)),
        )
        .await
        .expect("contract");
    client
        .register_contract(ContractSpec::of::<WorkerResult>(DEMO_FILE_DESCRIPTOR_SET))
        .await
        .expect("contract");
    client
        .register_agent(AgentConfig::new("worker").accepts::<Subtask>())
        .await
        .expect("worker");
    client
        .register_agent(AgentConfig::new("planner"))
        .await
        .expect("planner");
    let run_id = run(&client).await;
    let to_worker = |payload: prost_types::Any| {
        Handoff::from_request(pb::HandoffRequest {
            run_id: run_id.clone(),
            target_agent: "worker".into(),
            payload: Some(payload),
            confidence: Some(0.9),
            ..Default::default()
        })
    };
    let ok = any(&subtask("read the report"));

    let bytes = |value: Vec<u8>| prost_types::Any {
        type_url: ok.type_url.clone(),
        value,
    };
    let err = refused(
        client.handoff(to_worker(bytes(vec![0xff, 0xff]))).await,
        Code::InvalidArgument,
        "PAYLOAD_UNDECODABLE",
    );
    assert_eq!(
        err.metadata().get("contract_type").map(String::as_str),
        Some("handoff.demo.v1.Subtask")
    );
    let mut drifted = subtask("read").encode_to_vec();
    drifted.extend([0x48, 0x01]); // field 9, varint 1
    let err = refused(
        client.handoff(to_worker(bytes(drifted))).await,
        Code::FailedPrecondition,
        "SCHEMA_DRIFT",
    );
    assert_eq!(err.metadata().get("fields").map(String::as_str), Some("9"));
    let err = refused(
        client.handoff(to_worker(any(&subtask("")))).await,
        Code::FailedPrecondition,
        "MISSING_REQUIRED_FIELDS",
    );
    assert_eq!(
        err.metadata().get("fields").map(String::as_str),
        Some("instruction")
    );
    let err = refused(
        client
            .handoff(to_worker(any(&subtask(&"word ".repeat(30)))))
            .await,
        Code::FailedPrecondition,
        "OVER_TOKEN_BUDGET",
    );
    assert_eq!(err.metadata().get("budget").map(String::as_str), Some("20"));
    assert!(err.metadata()["count"].parse::<u64>().expect("count") > 20);
    let mut long = subtask("a");
    long.sources = vec!["s".repeat(300)];
    let err = refused(
        client.handoff(to_worker(any(&long))).await,
        Code::FailedPrecondition,
        "OVER_BYTE_BUDGET",
    );
    assert_eq!(
        err.metadata().get("budget").map(String::as_str),
        Some("200")
    );
    let err = refused(
        client.handoff(to_worker(ok.clone()).confidence(0.2)).await,
        Code::FailedPrecondition,
        "LOW_CONFIDENCE",
    );
    assert_eq!(
        err.metadata().get("min_confidence").map(String::as_str),
        Some("0.5")
    );
    let mut stale = to_worker(ok.clone()).request().clone();
    stale.tool_results.push(pb::ToolResult {
        tool: "web_search".into(),
        observed_at: Some((SystemTime::now() - Duration::from_secs(3600)).into()),
        ..Default::default()
    });
    let err = refused(
        client.handoff(Handoff::from_request(stale)).await,
        Code::FailedPrecondition,
        "STALE_TOOL_RESULT",
    );
    assert_eq!(
        err.metadata().get("tool").map(String::as_str),
        Some("web_search")
    );
    refused(
        client
            .handoff(to_worker(any(&WorkerResult::default())))
            .await,
        Code::FailedPrecondition,
        "CONTRACT_MISMATCH",
    );
    let err = refused(
        client
            .handoff(to_worker(ok.clone()).from_agent("planner"))
            .await,
        Code::PermissionDenied,
        "UNDECLARED_EMIT",
    );
    assert_eq!(
        err.metadata().get("agent").map(String::as_str),
        Some("planner")
    );

    // A new version that breaks BACKWARD compatibility.
    let v1 = compile_proto(&[(
        "acme.proto",
        "syntax = \"proto3\"; package acme.v1; message Doc { string text = 1; }",
    )]);
    let v2 = compile_proto(&[(
        "acme.proto",
        "syntax = \"proto3\"; package acme.v1; message Doc { int64 text = 1; }",
    )]);
    client
        .register_contract(ContractSpec::named("acme.v1.Doc", v1))
        .await
        .expect("v1");
    let err = refused(
        client
            .register_contract(ContractSpec::named("acme.v1.Doc", v2))
            .await,
        Code::FailedPrecondition,
        "INCOMPATIBLE_CONTRACT",
    );
    assert_eq!(
        err.metadata().get("mode").map(String::as_str),
        Some("BACKWARD")
    );

    // Nothing refused was stored: the worker's inbox is empty.
    let mut sub = client.subscribe("worker", "w1", 1).await.expect("sub");
    let (run, timeline) = client
        .get_run(&run_id)
        .await
        .map(|r| (r.run, r.timeline))
        .expect("run");
    assert!(run.is_some());
    assert!(!timeline
        .iter()
        .any(|e| e.kind == pb::EventKind::HandoffAccepted as i32));
    let rejected: HashSet<&str> = timeline
        .iter()
        .filter(|e| e.kind == pb::EventKind::ContractRejected as i32)
        .map(|e| e.rule.as_str())
        .collect();
    assert!(rejected.contains("unknown_fields") && rejected.contains("undeclared_emit"));
    assert!(next_within(&mut sub, Duration::from_millis(300))
        .await
        .is_none());
}

#[tokio::test]
async fn state_refusals_leave_nothing_stored() {
    let (nats, _broker, client) = stack(|c| {
        c.max_inline_payload = 700_000;
        c.max_payload_size = 700_000;
    })
    .await;
    for name in ["a", "b", "c", "aggregator"] {
        client
            .register_agent(AgentConfig::new(name))
            .await
            .expect("agent");
    }
    let run_id = client
        .start_run(RunConfig::new("owner").max_depth(1))
        .await
        .expect("run")
        .id;
    client
        .handoff(Handoff::to(&run_id, "a", &note("task", 1)).expect("handoff"))
        .await
        .expect("depth 1");
    let mut a = client.subscribe("a", "a1", 1).await.expect("sub");
    let d = next_within(&mut a, Duration::from_secs(5))
        .await
        .expect("delivered");
    let err = refused(
        d.handoff(Handoff::to("", "b", &note("deeper", 2)).expect("handoff"))
            .await,
        Code::FailedPrecondition,
        "DEPTH_CAP",
    );
    assert_eq!(
        err.metadata().get("max_depth").map(String::as_str),
        Some("1")
    );
    d.ack().await.expect("ack");

    // Role confusion: one delivery, two targets.
    let run2 = run(&client).await;
    client
        .handoff(Handoff::to(&run2, "a", &note("task", 1)).expect("handoff"))
        .await
        .expect("task");
    let d2 = next_within(&mut a, Duration::from_secs(5))
        .await
        .expect("delivered");
    d2.handoff(Handoff::to("", "b", &note("to b", 2)).expect("handoff"))
        .await
        .expect("first target");
    let err = refused(
        d2.handoff(Handoff::to("", "c", &note("to c", 3)).expect("handoff"))
            .await,
        Code::AlreadyExists,
        "ROLE_CONFUSION",
    );
    assert_eq!(
        err.metadata().get("first_target").map(String::as_str),
        Some("b")
    );

    // Too large: the payload for max_payload_size, the envelope for NATS
    // (what it holds besides its payload, which would go by reference).
    let err = refused(
        client
            .handoff(Handoff::to(&run2, "b", &note(&"x".repeat(800_000), 1)).expect("handoff"))
            .await,
        Code::FailedPrecondition,
        "PAYLOAD_TOO_LARGE",
    );
    assert_eq!(
        err.metadata().get("limit").map(String::as_str),
        Some("700000")
    );
    let mut near = Handoff::to(&run2, "b", &note(&"x".repeat(600_000), 1))
        .expect("handoff")
        .request()
        .clone();
    near.warnings = vec!["w".repeat(600_000), "v".repeat(600_000)];
    refused(
        client.handoff(Handoff::from_request(near)).await,
        Code::FailedPrecondition,
        "ENVELOPE_TOO_LARGE",
    );

    // A branch result that would take the release past one NATS message.
    let mut raw = client.raw();
    raw.open_barrier(pb::OpenBarrierRequest {
        barrier: Some(pb::BarrierSpec {
            run_id: run2.clone(),
            barrier_id: "join".into(),
            branch_count: 2,
            target_agent: "aggregator".into(),
            ..Default::default()
        }),
    })
    .await
    .expect("open");
    let branch = |key: &str| {
        Handoff::from_request(pb::HandoffRequest {
            run_id: run2.clone(),
            to_barrier: true,
            barrier_id: "join".into(),
            branch_key: key.into(),
            payload: Some(any(&note(&"y".repeat(600_000), 1))),
            ..Default::default()
        })
    };
    client.handoff(branch("0")).await.expect("first branch");
    let err = refused(
        client.handoff(branch("1")).await,
        Code::FailedPrecondition,
        "BRANCH_TOO_LARGE",
    );
    assert_eq!(
        err.metadata().get("branch_key").map(String::as_str),
        Some("1")
    );

    // A consumed delivery whose handoff is no longer stored.
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.expect("nats"));
    let run3 = run(&client).await;
    client
        .handoff(Handoff::to(&run3, "a", &note("task", 1)).expect("handoff"))
        .await
        .expect("task");
    let d3 = next_within(&mut a, Duration::from_secs(5))
        .await
        .expect("delivered");
    js.get_stream("HANDOFF_INBOX")
        .await
        .expect("stream")
        .delete_message(d3.raw().sequence)
        .await
        .expect("delete");
    refused(
        d3.handoff(Handoff::to("", "b", &note("late", 2)).expect("handoff"))
            .await,
        Code::FailedPrecondition,
        "DELIVERY_GONE",
    );

    // A closed run.
    let done = client
        .handoff(Handoff::final_result(&run3, &note("done", 9)).expect("final"))
        .await;
    done.expect("completed");
    let err = refused(
        client
            .handoff(Handoff::to(&run3, "b", &note("after", 1)).expect("handoff"))
            .await,
        Code::FailedPrecondition,
        "RUN_CLOSED",
    );
    assert_eq!(
        err.metadata().get("status").map(String::as_str),
        Some("completed")
    );

    // Evidence: b received exactly the one accepted handoff (role
    // confusion's first target), and c none.
    let timeline = |run: String| {
        let client = client.clone();
        async move { client.get_run(&run).await.expect("run").timeline }
    };
    let accepted_to = |events: &[pb::Event], agent: &str| {
        events
            .iter()
            .filter(|e| e.kind == pb::EventKind::HandoffAccepted as i32 && e.agent == agent)
            .count()
    };
    let t2 = timeline(run2).await;
    assert_eq!(accepted_to(&t2, "b"), 1);
    assert_eq!(accepted_to(&t2, "c"), 0);
    assert_eq!(accepted_to(&timeline(run_id).await, "b"), 0);
    assert_eq!(accepted_to(&timeline(run3).await, "b"), 0);
}

#[tokio::test]
async fn unavailable_names_nats_or_the_drain() {
    let (nats, broker, client) = stack(|c| {
        c.connect_timeout = Duration::from_secs(2);
    })
    .await;
    let mut events = client
        .watch(handoff_client::WatchFilter::all())
        .await
        .expect("watch");
    broker.stop().await;
    let end = tokio::time::timeout(
        Duration::from_secs(10),
        futures::StreamExt::next(&mut events),
    )
    .await
    .expect("the watch ends");
    refused(
        end.expect("an error, not the end").map(|_| ()),
        Code::Unavailable,
        "DRAINING",
    );

    let broker = handoff_tests::Broker::start(nats.url(), |c| {
        c.connect_timeout = Duration::from_secs(2);
    })
    .await;
    let client = broker.client().await;
    drop(nats);
    let r = tokio::time::timeout(
        Duration::from_secs(30),
        client.start_run(RunConfig::new("owner")),
    )
    .await
    .expect("answered");
    refused(r, Code::Unavailable, "NATS_UNAVAILABLE");
}

#[tokio::test]
async fn a_stream_at_its_byte_limit_refuses_with_store_full_and_stores_nothing() {
    // 1 MiB per stream: an inbox nobody consumes fills after a few dozen
    // handoffs of 48 KiB.
    let (nats, _broker, client) = stack(|c| c.stream_max_bytes = 1 << 20).await;
    client
        .register_agent(AgentConfig::new("idle"))
        .await
        .expect("agent");
    let run = run(&client).await;
    let mut stored = 0u64;
    let mut refusal = None;
    for i in 0..64 {
        let r = client
            .handoff(
                Handoff::to(
                    &run,
                    "idle",
                    &subtask(&format!("{i}{}", "x".repeat(48 << 10))),
                )
                .expect("handoff"),
            )
            .await;
        match r {
            Ok(_) => stored += 1,
            Err(e) => {
                refusal = Some(e);
                break;
            }
        }
    }
    let err = refusal.expect("the inbox fills before 64 handoffs of 48 KiB");
    refused::<()>(Err(err), Code::ResourceExhausted, "STORE_FULL");
    assert!(stored >= 8, "{stored} stored before the limit");
    // The evidence: the inbox holds exactly the handoffs answered OK.
    let inbox = handoff_tests::inbox(nats.url(), "idle").await;
    assert_eq!(inbox.stored, stored);
}

/// Sends a request body as given, to meet the server's decoder.
#[derive(Debug, Default, Clone)]
struct BytesCodec;

impl tonic::codec::Codec for BytesCodec {
    type Encode = Vec<u8>;
    type Decode = pb::StartRunResponse;
    type Encoder = BytesEncoder;
    type Decoder = tonic_prost::ProstDecoder<pb::StartRunResponse>;

    fn encoder(&mut self) -> Self::Encoder {
        BytesEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstCodec::<pb::StartRunRequest, pb::StartRunResponse>::default().decoder()
    }
}

#[derive(Debug)]
struct BytesEncoder;

impl tonic::codec::Encoder for BytesEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}
