//! Typed contracts: registration (compatibility, idempotency, persistence,
//! replicas) and the guards every handoff passes at the door.

use std::time::{Duration, SystemTime};

use handoff_client::{pb, AgentConfig, Client, ErrorKind, Handoff, RunConfig, WatchFilter};
use handoff_tests::{
    compile_proto, counter, events_until, inbox, next_within, note, scrape, settled_inbox, stack,
    Broker, BrokerProcess, Nats,
};

const BIN: &str = env!("CARGO_BIN_EXE_handoffd-under-test");

// ------------------------------------------------------------ payloads

const GUARD_PROTO: &str = r#"
syntax = "proto3";
package guard.v1;
message Meta { string user = 1; string locale = 2; }
message Brief {
  string text = 1;
  Meta meta = 2;
  repeated string sources = 3;
  uint32 priority = 4;
}
"#;

/// `guard.v1.Meta` as the contract knows it.
#[derive(Clone, PartialEq, prost::Message)]
struct Meta {
    #[prost(string, tag = "1")]
    user: String,
    #[prost(string, tag = "2")]
    locale: String,
}

/// `guard.v1.Brief` as the contract knows it.
#[derive(Clone, PartialEq, prost::Message)]
struct Brief {
    #[prost(string, tag = "1")]
    text: String,
    #[prost(message, optional, tag = "2")]
    meta: Option<Meta>,
    #[prost(string, repeated, tag = "3")]
    sources: Vec<String>,
    #[prost(uint32, tag = "4")]
    priority: u32,
}

impl prost::Name for Brief {
    const NAME: &'static str = "Brief";
    const PACKAGE: &'static str = "guard.v1";
}

/// A producer that drifted: `Meta` grew field 7.
#[derive(Clone, PartialEq, prost::Message)]
struct DriftedMeta {
    #[prost(string, tag = "1")]
    user: String,
    #[prost(int32, tag = "7")]
    shard: i32,
}

/// A producer that drifted: `Brief` grew field 9, and its `Meta` field 7.
#[derive(Clone, PartialEq, prost::Message)]
struct DriftedBrief {
    #[prost(string, tag = "1")]
    text: String,
    #[prost(message, optional, tag = "2")]
    meta: Option<DriftedMeta>,
    #[prost(string, tag = "9")]
    secret: String,
}

impl prost::Name for DriftedBrief {
    const NAME: &'static str = "Brief";
    const PACKAGE: &'static str = "guard.v1";
}

fn brief(text: &str) -> Brief {
    Brief {
        text: text.to_string(),
        meta: Some(Meta {
            user: "ada".into(),
            locale: "en".into(),
        }),
        sources: vec!["https://example.com/report".into()],
        priority: 2,
    }
}

fn guard_rules() -> pb::ContractRules {
    pb::ContractRules {
        required_fields: vec!["text".into(), "meta.user".into()],
        max_tokens: 60,
        max_bytes: 2000,
        min_confidence: Some(0.6),
        max_tool_result_age: Some(prost_types::Duration {
            seconds: 60,
            nanos: 0,
        }),
        carry: Vec::new(),
    }
}

// ------------------------------------------------------------ helpers

async fn register(
    client: &Client,
    message_type: &str,
    fds: &[u8],
    mode: pb::Compatibility,
    rules: pb::ContractRules,
    version: u32,
) -> Result<pb::RegisterContractResponse, tonic::Status> {
    client
        .raw()
        .register_contract(pb::RegisterContractRequest {
            message_type: message_type.to_string(),
            version,
            compatibility: mode as i32,
            rules: Some(rules),
            file_descriptor_set: fds.to_vec(),
        })
        .await
        .map(|r| r.into_inner())
}

async fn get_contract(
    client: &Client,
    message_type: &str,
    version: u32,
) -> Result<pb::Contract, tonic::Status> {
    client
        .raw()
        .get_contract(pb::GetContractRequest {
            message_type: message_type.to_string(),
            version,
        })
        .await
        .map(|r| r.into_inner().contract.unwrap_or_default())
}

fn accepting(name: &str, message_type: &str, min: u32, max: u32) -> AgentConfig {
    AgentConfig::new(name)
        .accepts_type(message_type)
        .accepts_versions(min, max)
}

fn emitting(name: &str, types: &[&str]) -> AgentConfig {
    types
        .iter()
        .fold(AgentConfig::new(name), |a, t| a.emits_type(*t))
}

/// A handoff of `payload` from `writer` to `reader`, confidence 0.9.
fn to_reader<M: prost::Message + prost::Name>(run: &str, payload: &M) -> Handoff {
    Handoff::to(run, "reader", payload)
        .unwrap()
        .from_agent("writer")
        .confidence(0.9)
}

/// Sends a handoff to `reader` from `writer` with a raw payload.
fn raw_handoff(run: &str, type_url: &str, value: Vec<u8>) -> Handoff {
    Handoff::from_request(pb::HandoffRequest {
        run_id: run.to_string(),
        source_agent: "writer".into(),
        target_agent: "reader".into(),
        payload: Some(prost_types::Any {
            type_url: type_url.to_string(),
            value,
        }),
        confidence: Some(0.9),
        ..Default::default()
    })
}

fn tokens(texts: &[&str]) -> u64 {
    let bpe = tiktoken_rs::o200k_base().expect("o200k_base");
    texts
        .iter()
        .map(|t| bpe.encode_ordinary(t).len() as u64)
        .sum()
}

// ------------------------------------------------------------ guards

#[tokio::test]
async fn every_guard_passes_a_good_handoff_and_refuses_a_bad_one_storing_nothing() {
    // A broker process, so the metrics endpoint's address (bound on port
    // 0) can be read from its log.
    let nats = Nats::start().await;
    let broker = BrokerProcess::spawn(
        BIN,
        nats.url(),
        &[("HANDOFF_METRICS_LISTEN", "127.0.0.1:0")],
    )
    .await;
    let metrics_addr = broker.metrics_addr.expect("the metrics endpoint's address");
    let client = broker.client().await;
    let fds = compile_proto(&[("guard/v1/guard.proto", GUARD_PROTO)]);
    let reg = register(
        &client,
        "guard.v1.Brief",
        &fds,
        pb::Compatibility::Backward,
        guard_rules(),
        0,
    )
    .await
    .unwrap();
    assert!(reg.created);
    assert_eq!(reg.contract.as_ref().unwrap().version, 1);
    client
        .register_agent(accepting("reader", "guard.v1.Brief", 0, 0))
        .await
        .unwrap();
    client
        .register_agent(emitting("writer", &["guard.v1.Brief"]))
        .await
        .unwrap();
    client
        .register_agent(emitting("stranger", &[]))
        .await
        .unwrap();
    let run = client
        .start_run(RunConfig::new("owner").id("guarded"))
        .await
        .unwrap();
    let mut rejected = client
        .watch(
            WatchFilter::all()
                .run(&run.id)
                .kinds([pb::EventKind::ContractRejected])
                .from_sequence(1),
        )
        .await
        .unwrap();
    let mut reader = client.subscribe("reader", "r1", 10).await.unwrap();
    let fresh = SystemTime::now();
    let good = || {
        to_reader(&run.id, &brief("Compare the two reports."))
            .tool_result("web_search", fresh, &note("hit", 1))
            .unwrap()
    };

    // Passing: every rule holds; the measured token count travels along.
    client.handoff(good()).await.unwrap();
    let d = next_within(&mut reader, Duration::from_secs(5))
        .await
        .expect("the good handoff is delivered");
    let env = d.envelope().clone();
    assert_eq!(env.contract_type, "guard.v1.Brief");
    assert_eq!(env.contract_version, 1);
    assert_eq!(
        env.token_count,
        tokens(&[
            "Compare the two reports.",
            "ada",
            "en",
            "https://example.com/report"
        ])
    );
    d.ack().await.unwrap();

    let mut expected_rules = Vec::new();
    let mut refused = |rule: &'static str| expected_rules.push(rule);
    let refusal = |r: handoff_client::Result<handoff_client::Receipt>| {
        r.expect_err("the handoff must be refused")
    };

    // Payload does not decode as the contract.
    let err = refusal(
        client
            .handoff(raw_handoff(
                &run.id,
                "type.googleapis.com/guard.v1.Brief",
                vec![0x0a, 0xff, 0x01],
            ))
            .await,
    );
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    assert!(
        err.message().contains("does not decode as guard.v1.Brief"),
        "{err}"
    );
    refused("decode");

    // Schema drift: fields the contract does not know, named by number.
    let drifted = DriftedBrief {
        text: "x".into(),
        meta: Some(DriftedMeta {
            user: "ada".into(),
            shard: 4,
        }),
        secret: "s".into(),
    };
    let err = refusal(client.handoff(to_reader(&run.id, &drifted)).await);
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    assert!(err.message().contains("9"), "{err}");
    assert!(err.message().contains("meta.7"), "{err}");
    refused("unknown_fields");

    // Missing required fields: every one listed, nested ones by path.
    let err = refusal(client.handoff(to_reader(&run.id, &Brief::default())).await);
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    assert!(
        err.message().contains("text") && err.message().contains("meta.user"),
        "{err}"
    );
    refused("required_fields");

    // Over the token budget: the measured count and the budget, nothing cut.
    let long = "The quarterly numbers moved in every region. ".repeat(8);
    let count = tokens(&[long.as_str(), "ada", "en", "https://example.com/report"]);
    assert!(count > 60);
    let err = refusal(client.handoff(to_reader(&run.id, &brief(&long))).await);
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    assert!(
        err.message().contains(&count.to_string()) && err.message().contains("60"),
        "{err}"
    );
    refused("max_tokens");

    // Over the byte budget.
    let mut big = brief("short");
    big.sources = (0..100)
        .map(|i| format!("https://example.com/{i:04}"))
        .collect();
    let size = prost::Message::encoded_len(&big);
    assert!(size > 2000);
    let err = refusal(client.handoff(to_reader(&run.id, &big)).await);
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    assert!(
        err.message().contains(&size.to_string()) && err.message().contains("2000"),
        "{err}"
    );
    refused("max_bytes");

    // Confidence under the minimum, and not stated at all.
    let err = refusal(
        client
            .handoff(to_reader(&run.id, &brief("ok")).confidence(0.3))
            .await,
    );
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    assert!(
        err.message().contains("0.3") && err.message().contains("0.6"),
        "{err}"
    );
    refused("min_confidence");
    let err = refusal(
        client
            .handoff(
                Handoff::to(&run.id, "reader", &brief("ok"))
                    .unwrap()
                    .from_agent("writer"),
            )
            .await,
    );
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    refused("min_confidence");

    // A stale tool result: named, with its age.
    let err = refusal(
        client
            .handoff(
                to_reader(&run.id, &brief("ok"))
                    .tool_result(
                        "price_lookup",
                        SystemTime::now() - Duration::from_secs(150),
                        &note("old", 2),
                    )
                    .unwrap(),
            )
            .await,
    );
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    assert!(
        err.message().contains("price_lookup") && err.message().contains("2m"),
        "{err}"
    );
    refused("tool_result_age");

    // A source that does not declare the contract it emits.
    let err = refusal(
        client
            .handoff(
                Handoff::to(&run.id, "reader", &brief("ok"))
                    .unwrap()
                    .from_agent("stranger")
                    .confidence(0.9),
            )
            .await,
    );
    assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
    assert!(
        err.message().contains("stranger") && err.message().contains("guard.v1.Brief"),
        "{err}"
    );
    refused("undeclared_emit");

    // A payload of another type than the target accepts.
    let err = refusal(
        client
            .handoff(
                Handoff::to(&run.id, "reader", &note("wrong type", 3))
                    .unwrap()
                    .from_agent("writer"),
            )
            .await,
    );
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    assert!(err.message().contains("handoff.test.Note"), "{err}");
    refused("contract_mismatch");

    // Each refusal is an event naming its guard, in order.
    let events = events_until(&mut rejected, Duration::from_secs(5), {
        let n = expected_rules.len();
        let seen = std::sync::atomic::AtomicUsize::new(0);
        move |_| seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == n
    })
    .await;
    let rules: Vec<&str> = events.iter().map(|e| e.rule.as_str()).collect();
    assert_eq!(rules, expected_rules);
    assert!(events.iter().all(|e| !e.reason.is_empty()));
    assert_eq!(events[1].contract_type, "guard.v1.Brief");
    assert_eq!(events[1].contract_version, 1);

    // ... and a counter by guard.
    let metrics = scrape(metrics_addr).await;
    for (rule, n) in [
        ("decode", 1),
        ("unknown_fields", 1),
        ("required_fields", 1),
        ("max_tokens", 1),
        ("max_bytes", 1),
        ("min_confidence", 2),
        ("tool_result_age", 1),
        ("undeclared_emit", 1),
        ("contract_mismatch", 1),
    ] {
        let series = format!("handoff_contract_rejections_total{{rule=\"{rule}\"}}");
        assert_eq!(counter(&metrics, &series), n, "{series}\n{metrics}");
    }
    assert_eq!(
        counter(
            &metrics,
            "handoff_handoffs_accepted_total{agent=\"reader\"}"
        ),
        1
    );
    // The refusal by max_tool_result_age names its tool.
    assert_eq!(
        counter(
            &metrics,
            "handoff_stale_tool_results_total{tool=\"price_lookup\"}"
        ),
        1,
        "{metrics}"
    );

    // Nothing was stored for a refused handoff: no delivery, no accepted
    // event, one handoff in the reader's inbox and nothing left to deliver.
    assert!(next_within(&mut reader, Duration::from_millis(500))
        .await
        .is_none());
    let timeline = client.get_run(&run.id).await.unwrap().timeline;
    let accepted = timeline
        .iter()
        .filter(|e| e.kind == pb::EventKind::HandoffAccepted as i32)
        .count();
    assert_eq!(accepted, 1);
    let inbox = settled_inbox(nats.url(), "reader").await;
    assert_eq!((inbox.stored, inbox.deliveries), (1, 1), "{inbox:?}");
    assert_eq!(broker.terminate().await, Some(0));
}

#[tokio::test]
async fn one_delivery_to_two_targets_needs_declared_fan_out() {
    let (nats, _broker, client) = stack(|_| {}).await;
    for a in ["planner", "critic", "worker", "archive"] {
        client.register_agent(AgentConfig::new(a)).await.unwrap();
    }
    let run = client
        .start_run(RunConfig::new("owner").id("roles"))
        .await
        .unwrap();
    let mut planner = client.subscribe("planner", "p1", 2).await.unwrap();
    for i in 0..2 {
        client
            .handoff(
                Handoff::to(&run.id, "planner", &note("plan", i))
                    .unwrap()
                    .idempotency_key(format!("plan-{i}")),
            )
            .await
            .unwrap();
    }
    let first = next_within(&mut planner, Duration::from_secs(5))
        .await
        .unwrap();
    let second = next_within(&mut planner, Duration::from_secs(5))
        .await
        .unwrap();
    let consuming = |d: &handoff_client::Delivery, target: &str, fan_out: bool| {
        Handoff::from_request(pb::HandoffRequest {
            run_id: run.id.clone(),
            source_agent: "planner".into(),
            target_agent: target.to_string(),
            payload: Some(handoff_client::encode(&note("step", 0)).unwrap()),
            consumes: d.id().to_string(),
            fan_out,
            ..Default::default()
        })
    };

    // Without fan-out: the first target wins, the second is refused naming it.
    let to_worker = client
        .handoff(consuming(&first, "worker", false))
        .await
        .unwrap();
    let err = client
        .handoff(consuming(&first, "critic", false))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists, "{err}");
    assert!(err.message().contains("\"worker\""), "{err}");
    // A retry to the same target is the same handoff.
    let again = client
        .handoff(consuming(&first, "worker", false))
        .await
        .unwrap();
    assert_eq!(again.handoff_id, to_worker.handoff_id);
    assert!(again.duplicate);
    // Declaring fan-out late does not help: the first did not declare it.
    let err = client
        .handoff(consuming(&first, "critic", true))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists, "{err}");

    // With fan-out declared on each: one delivery reaches several targets.
    client
        .handoff(consuming(&second, "worker", true))
        .await
        .unwrap();
    client
        .handoff(consuming(&second, "critic", true))
        .await
        .unwrap();
    let err = client
        .handoff(consuming(&second, "archive", false))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists, "{err}");

    let mut critic = client.subscribe("critic", "c1", 5).await.unwrap();
    let got = next_within(&mut critic, Duration::from_secs(5)).await;
    assert!(got.is_some(), "the fanned-out handoff reached the critic");
    assert!(
        next_within(&mut critic, Duration::from_millis(500))
            .await
            .is_none(),
        "the refused one did not"
    );
    let critic = inbox(nats.url(), "critic").await;
    assert_eq!(
        critic.stored, 1,
        "the refused one was not stored: {critic:?}"
    );
    // A handoff refused for another reason does not hold the delivery:
    // here the depth cap refuses the hop, and the final result that
    // follows from the same delivery is accepted.
    let shallow = client
        .start_run(RunConfig::new("owner").id("shallow").max_depth(1))
        .await
        .unwrap();
    client
        .handoff(Handoff::to(&shallow.id, "planner", &note("plan", 9)).unwrap())
        .await
        .unwrap();
    let d = next_within(&mut planner, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(d.run_id(), shallow.id);
    let err = d
        .handoff(Handoff::to(&shallow.id, "worker", &note("deeper", 1)).unwrap())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    d.handoff(Handoff::final_result(&shallow.id, &note("done", 2)).unwrap())
        .await
        .unwrap();
    let ended = client.get_run(&shallow.id).await.unwrap().run.unwrap();
    assert_eq!(ended.status, pb::RunStatus::Completed as i32);

    // Published: the refusal of the live `second` delivery. The two of
    // `first` are answered but not published: that delivery was settled
    // by its handoff to worker, and a delivery whose lease is gone is no
    // right to write into the run.
    let timeline = client.get_run(&run.id).await.unwrap().timeline;
    let roles: Vec<&str> = timeline
        .iter()
        .filter(|e| e.kind == pb::EventKind::ContractRejected as i32)
        .map(|e| e.rule.as_str())
        .collect();
    assert_eq!(roles, ["role_confusion"]);
}

// ------------------------------------------------------------ registration

/// A kind of change between two versions, as proto bodies (v1, v2) of
/// message `M` (and enum `E`), with required paths for each.
struct Change {
    name: &'static str,
    v1: &'static str,
    v2: &'static str,
    required_v1: &'static [&'static str],
    required_v2: &'static [&'static str],
    /// Which modes it breaks: (BACKWARD, FORWARD, FULL).
    breaks: (bool, bool, bool),
    /// A fragment every refusal names.
    names: &'static str,
}

const BASE: &str = "enum E { E_UNSPECIFIED = 0; E_A = 1; E_B = 2; }
message M { string a = 1; int32 b = 2; E e = 3; }";

fn changes() -> Vec<Change> {
    vec![
        Change {
            name: "optional field added",
            v1: BASE,
            v2: "enum E { E_UNSPECIFIED = 0; E_A = 1; E_B = 2; }
                 message M { string a = 1; int32 b = 2; E e = 3; string c = 4; }",
            required_v1: &[],
            required_v2: &[],
            breaks: (false, false, false),
            names: "",
        },
        Change {
            name: "optional field removed",
            v1: BASE,
            v2: "enum E { E_UNSPECIFIED = 0; E_A = 1; E_B = 2; }
                 message M { string a = 1; reserved 2; E e = 3; }",
            required_v1: &[],
            required_v2: &[],
            breaks: (false, false, false),
            names: "",
        },
        Change {
            name: "field removed while required",
            v1: BASE,
            v2: "enum E { E_UNSPECIFIED = 0; E_A = 1; E_B = 2; }
                 message M { string a = 1; reserved 2; E e = 3; }",
            required_v1: &["b"],
            required_v2: &[],
            breaks: (false, true, true),
            names: "\"b\"",
        },
        Change {
            name: "requirement dropped, field kept",
            v1: BASE,
            v2: BASE,
            required_v1: &["a"],
            required_v2: &[],
            breaks: (false, true, true),
            names: "\"a\"",
        },
        Change {
            name: "required field added",
            v1: BASE,
            v2: BASE,
            required_v1: &[],
            required_v2: &["a"],
            breaks: (true, false, true),
            names: "\"a\"",
        },
        Change {
            name: "type changed",
            v1: BASE,
            v2: "enum E { E_UNSPECIFIED = 0; E_A = 1; E_B = 2; }
                 message M { string a = 1; string b = 2; E e = 3; }",
            required_v1: &[],
            required_v2: &[],
            breaks: (true, true, true),
            names: "field 2",
        },
        Change {
            name: "number reused with another type",
            v1: BASE,
            v2: "enum E { E_UNSPECIFIED = 0; E_A = 1; E_B = 2; }
                 message M { string a = 1; bool flag = 2; E e = 3; }",
            required_v1: &[],
            required_v2: &[],
            breaks: (true, true, true),
            names: "number 2 reused",
        },
        Change {
            name: "cardinality changed",
            v1: BASE,
            v2: "enum E { E_UNSPECIFIED = 0; E_A = 1; E_B = 2; }
                 message M { repeated string a = 1; int32 b = 2; E e = 3; }",
            required_v1: &[],
            required_v2: &[],
            breaks: (true, true, true),
            names: "field 1",
        },
        Change {
            name: "enum value removed",
            v1: BASE,
            v2: "enum E { E_UNSPECIFIED = 0; E_A = 1; }
                 message M { string a = 1; int32 b = 2; E e = 3; }",
            required_v1: &[],
            required_v2: &[],
            breaks: (true, false, true),
            names: "value 2",
        },
        Change {
            name: "enum value added",
            v1: BASE,
            v2: "enum E { E_UNSPECIFIED = 0; E_A = 1; E_B = 2; E_C = 3; }
                 message M { string a = 1; int32 b = 2; E e = 3; }",
            required_v1: &[],
            required_v2: &[],
            breaks: (false, false, false),
            names: "",
        },
    ]
}

fn schema(package: &str, body: &str) -> Vec<u8> {
    compile_proto(&[(
        "m.proto",
        &format!("syntax = \"proto3\";\npackage {package};\n{body}\n"),
    )])
}

fn required(paths: &[&str]) -> pb::ContractRules {
    pb::ContractRules {
        required_fields: paths.iter().map(|p| p.to_string()).collect(),
        ..Default::default()
    }
}

#[tokio::test]
async fn compatibility_matrix_each_mode_by_each_kind_of_change() {
    let (_nats, _broker, client) = stack(|_| {}).await;
    let modes = [
        ("none", pb::Compatibility::None),
        ("backward", pb::Compatibility::Backward),
        ("forward", pb::Compatibility::Forward),
        ("full", pb::Compatibility::Full),
    ];
    let mut cells = 0;
    for (i, change) in changes().iter().enumerate() {
        for (mode_name, mode) in modes {
            let package = format!("matrix.c{i}.{mode_name}");
            let message_type = format!("{package}.M");
            register(
                &client,
                &message_type,
                &schema(&package, change.v1),
                mode,
                required(change.required_v1),
                0,
            )
            .await
            .unwrap_or_else(|e| panic!("{}: v1: {e:?}", change.name));
            let breaks = match mode {
                pb::Compatibility::Backward => change.breaks.0,
                pb::Compatibility::Forward => change.breaks.1,
                pb::Compatibility::Full => change.breaks.2,
                _ => false,
            };
            let result = register(
                &client,
                &message_type,
                &schema(&package, change.v2),
                mode,
                required(change.required_v2),
                0,
            )
            .await;
            match (breaks, result) {
                (false, Ok(r)) => {
                    assert!(r.created, "{} under {mode_name}", change.name);
                    assert_eq!(r.contract.unwrap().version, 2);
                }
                (true, Err(status)) => {
                    assert_eq!(
                        status.code(),
                        tonic::Code::FailedPrecondition,
                        "{} under {mode_name}: {status:?}",
                        change.name
                    );
                    assert!(
                        status.message().contains(change.names)
                            && status.message().contains(&mode_name.to_ascii_uppercase()),
                        "{} under {mode_name}: {}",
                        change.name,
                        status.message()
                    );
                    let latest = get_contract(&client, &message_type, 0).await.unwrap();
                    assert_eq!(latest.version, 1, "a refused version is not stored");
                }
                (breaks, result) => panic!(
                    "{} under {mode_name}: expected {}, got {result:?}",
                    change.name,
                    if breaks { "a refusal" } else { "acceptance" }
                ),
            }
            cells += 1;
        }
    }
    assert_eq!(cells, 40);

    // A version that breaks several ways lists every incompatibility.
    let package = "matrix.many";
    register(
        &client,
        "matrix.many.M",
        &schema(package, BASE),
        pb::Compatibility::Full,
        required(&["b"]),
        0,
    )
    .await
    .unwrap();
    let status = register(
        &client,
        "matrix.many.M",
        &schema(
            package,
            "enum E { E_UNSPECIFIED = 0; }
             message M { bytes a = 1; E e = 3; }",
        ),
        pb::Compatibility::Full,
        required(&["e"]),
        0,
    )
    .await
    .unwrap_err();
    let msg = status.message();
    for fragment in ["field 1", "value 1", "value 2", "\"b\"", "\"e\""] {
        assert!(msg.contains(fragment), "{fragment} missing from: {msg}");
    }
}

#[tokio::test]
async fn registration_is_idempotent_versioned_and_checked() {
    let (_nats, _broker, client) = stack(|_| {}).await;
    let fds = compile_proto(&[("guard/v1/guard.proto", GUARD_PROTO)]);
    let reg = |version, rules| {
        register(
            &client,
            "guard.v1.Brief",
            &fds,
            pb::Compatibility::Backward,
            rules,
            version,
        )
    };
    let first = reg(0, guard_rules()).await.unwrap();
    assert!(first.created);
    let first = first.contract.unwrap();
    assert_eq!(first.version, 1);
    // The same content again, by next-version or by explicit version: a no-op.
    for version in [0, 1] {
        let again = reg(version, guard_rules()).await.unwrap();
        assert!(!again.created);
        let again = again.contract.unwrap();
        assert_eq!((again.version, &again.fingerprint), (1, &first.fingerprint));
    }
    // Other content under an existing version: refused.
    let looser = pb::ContractRules {
        max_tokens: 500,
        ..guard_rules()
    };
    let err = reg(1, looser.clone()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists, "{err:?}");
    // A gap in versions: refused; the next version: stored.
    let err = reg(3, looser.clone()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("next is 2"), "{err:?}");
    let second = reg(2, looser).await.unwrap();
    assert!(second.created);
    assert_eq!(
        get_contract(&client, "guard.v1.Brief", 0)
            .await
            .unwrap()
            .version,
        2
    );
    let v1 = get_contract(&client, "guard.v1.Brief", 1).await.unwrap();
    assert_eq!(v1.rules.unwrap().max_tokens, 60);
    assert!(!v1.file_descriptor_set.is_empty());

    // Bad input, precisely refused.
    let bad = |message_type: &str, fds: Vec<u8>, rules: pb::ContractRules| {
        let client = client.clone();
        let message_type = message_type.to_string();
        async move {
            register(
                &client,
                &message_type,
                &fds,
                pb::Compatibility::Backward,
                rules,
                0,
            )
            .await
            .unwrap_err()
        }
    };
    let e = bad("guard.v1.Brief", vec![0xff, 0x00], guard_rules()).await;
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let e = bad("guard.v1.Nope", fds.clone(), Default::default()).await;
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("guard.v1.Nope"), "{e:?}");
    let e = bad(
        "guard.v1.Brief",
        fds.clone(),
        required(&["meta.nickname", "text.x"]),
    )
    .await;
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("meta.nickname") && e.message().contains("text.x"),
        "{e:?}"
    );
    let e = bad("guard v1", fds.clone(), Default::default()).await;
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let e = get_contract(&client, "guard.v1.Missing", 0)
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");

    // Agents name registered contracts only.
    let err = client
        .register_agent(accepting("reader", "guard.v1.Missing", 0, 0))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    let err = client
        .register_agent(accepting("reader", "guard.v1.Brief", 3, 0))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    let err = client
        .register_agent(emitting("writer", &["guard.v1.Missing"]))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");

    let listed = client
        .raw()
        .list_contracts(pb::ListContractsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .contracts;
    let versions: Vec<(String, u32)> = listed
        .iter()
        .map(|c| (c.message_type.clone(), c.version))
        .collect();
    assert_eq!(
        versions,
        [
            ("guard.v1.Brief".to_string(), 1),
            ("guard.v1.Brief".to_string(), 2)
        ]
    );
}

#[tokio::test]
async fn contracts_persist_across_restarts_and_reach_every_replica() {
    let nats = Nats::start().await;
    let first = Broker::start(nats.url(), |_| {}).await;
    let second = Broker::start(nats.url(), |_| {}).await;
    let (a, b) = (first.client().await, second.client().await);
    let v1 = compile_proto(&[("guard/v1/guard.proto", GUARD_PROTO)]);
    register(
        &a,
        "guard.v1.Brief",
        &v1,
        pb::Compatibility::Backward,
        guard_rules(),
        0,
    )
    .await
    .unwrap();

    // The second replica sees the contract registered on the first ...
    let seen = get_contract(&b, "guard.v1.Brief", 1).await.unwrap();
    assert_eq!(seen.rules.unwrap().max_tokens, 60);
    b.register_agent(accepting("reader", "guard.v1.Brief", 0, 0))
        .await
        .unwrap();
    b.register_agent(emitting("writer", &["guard.v1.Brief"]))
        .await
        .unwrap();
    let run = b
        .start_run(RunConfig::new("owner").id("replicated"))
        .await
        .unwrap();
    // ... and checks handoffs against it.
    let err = b
        .handoff(to_reader(&run.id, &Brief::default()))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    assert!(err.message().contains("meta.user"), "{err}");

    // A v2 registered on the second replica adds a field; the first
    // replica checks against it once it is registered.
    let v2 = compile_proto(&[(
        "guard/v1/guard.proto",
        &GUARD_PROTO.replace(
            "uint32 priority = 4;",
            "uint32 priority = 4;\n  string secret = 9;",
        ),
    )]);
    let reg = register(
        &b,
        "guard.v1.Brief",
        &v2,
        pb::Compatibility::Backward,
        guard_rules(),
        0,
    )
    .await
    .unwrap();
    assert_eq!(reg.contract.unwrap().version, 2);
    first.stop().await;
    second.stop().await;

    // After both restart, everything is still there and in force.
    let third = Broker::start(nats.url(), |_| {}).await;
    let c = third.client().await;
    assert_eq!(
        get_contract(&c, "guard.v1.Brief", 0).await.unwrap().version,
        2
    );
    let drifted = DriftedBrief {
        text: "x".into(),
        meta: Some(DriftedMeta {
            user: "ada".into(),
            shard: 0,
        }),
        secret: "s".into(),
    };
    // Field 9 is known to v2: accepted.
    let ok = c.handoff(to_reader(&run.id, &drifted)).await;
    assert!(ok.is_ok(), "{ok:?}");
    // An agent pinned to version 1 refuses it as drift.
    c.register_agent(accepting("reader", "guard.v1.Brief", 1, 1))
        .await
        .unwrap();
    let err = c
        .handoff(to_reader(&run.id, &drifted).idempotency_key("pinned"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    assert!(
        err.message().contains('9') && err.message().contains("version 1"),
        "{err}"
    );
    third.stop().await;
}

#[tokio::test]
async fn a_fan_out_interrupted_half_way_is_redone_and_each_handoff_arrives_once() {
    let (nats, _broker, client) = stack(|_| {}).await;
    client
        .register_agent(AgentConfig::new("planner").lease(Duration::from_millis(500)))
        .await
        .unwrap();
    client
        .register_agent(AgentConfig::new("worker"))
        .await
        .unwrap();
    let run = client
        .start_run(RunConfig::new("owner").id("fan-crash"))
        .await
        .unwrap();
    client
        .handoff(Handoff::to(&run.id, "planner", &note("plan", 0)).unwrap())
        .await
        .unwrap();
    let subtask = |d: &handoff_client::Delivery, i: u32| {
        Handoff::to(d.run_id(), "worker", &note("subtask", i))
            .unwrap()
            .idempotency_key(format!("subtask-{i}"))
            .fan_out()
    };
    // The first planner instance hands out one subtask of three, then stops.
    let mut first = client.subscribe("planner", "p1", 1).await.unwrap();
    let d = next_within(&mut first, Duration::from_secs(5))
        .await
        .unwrap();
    d.handoff(subtask(&d, 0)).await.unwrap();
    drop(d);
    drop(first);
    // The input is not settled, so it comes back (lease expiry) to the
    // second instance, which redoes the whole fan-out and acks.
    let mut second = client.subscribe("planner", "p2", 1).await.unwrap();
    let d = next_within(&mut second, Duration::from_secs(5))
        .await
        .expect("the unsettled input is redelivered");
    assert_eq!(d.attempt(), 2);
    let mut duplicates = Vec::new();
    for i in 0..3 {
        duplicates.push(d.handoff(subtask(&d, i)).await.unwrap().duplicate);
    }
    assert_eq!(duplicates, [true, false, false]);
    d.ack().await.unwrap();

    let mut worker = client.subscribe("worker", "w", 10).await.unwrap();
    let mut got = Vec::new();
    while let Some(w) = next_within(&mut worker, Duration::from_millis(800)).await {
        got.push(w.payload::<handoff_tests::Note>().unwrap().n);
        w.ack().await.unwrap();
    }
    got.sort();
    assert_eq!(got, [0, 1, 2]);
    // Each subtask was stored once and delivered once, and nothing is left.
    let workers = settled_inbox(nats.url(), "worker").await;
    assert_eq!((workers.stored, workers.deliveries), (3, 3), "{workers:?}");
    // The acked input is not redelivered again: two deliveries (the
    // attempt that was dropped and the one that was acked), none left.
    assert!(next_within(&mut second, Duration::from_millis(800))
        .await
        .is_none());
    let planners = settled_inbox(nats.url(), "planner").await;
    assert_eq!(
        (planners.stored, planners.deliveries),
        (1, 2),
        "{planners:?}"
    );
}

#[tokio::test]
async fn typed_sdk_registers_from_rust_types_and_decodes_deliveries() {
    use handoff_client::ContractSpec;
    use handoff_proto::{
        demo::{Subtask, WorkerResult},
        DEMO_FILE_DESCRIPTOR_SET,
    };
    let (_nats, _broker, client) = stack(|_| {}).await;
    let registered = client
        .register_contract(
            ContractSpec::of::<Subtask>(DEMO_FILE_DESCRIPTOR_SET)
                .require("instruction")
                .max_tokens(100),
        )
        .await
        .unwrap();
    assert!(registered.created);
    assert_eq!(registered.contract.message_type, "handoff.demo.v1.Subtask");
    client
        .register_contract(ContractSpec::of::<WorkerResult>(DEMO_FILE_DESCRIPTOR_SET))
        .await
        .unwrap();
    client
        .register_agent(AgentConfig::new("planner").emits::<Subtask>())
        .await
        .unwrap();
    client
        .register_agent(
            AgentConfig::new("worker")
                .accepts::<Subtask>()
                .emits::<WorkerResult>(),
        )
        .await
        .unwrap();
    client
        .register_agent(AgentConfig::new("aggregator").accepts::<WorkerResult>())
        .await
        .unwrap();
    let run = client
        .start_run(RunConfig::new("owner").id("typed"))
        .await
        .unwrap();
    let task = Subtask {
        index: 0,
        of: 1,
        instruction: "Summarise the Q3 report".into(),
        sources: vec!["q3.pdf".into()],
    };
    client
        .handoff(
            Handoff::to(&run.id, "worker", &task)
                .unwrap()
                .from_agent("planner"),
        )
        .await
        .unwrap();
    let mut workers = client
        .subscribe_typed::<Subtask>("worker", "w1", 1)
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(5), workers.next_delivery())
        .await
        .expect("a delivery in time")
        .expect("stream open")
        .expect("decoded");
    assert_eq!(d.payload(), &task);
    assert_eq!(d.contract(), Some(("handoff.demo.v1.Subtask", 1)));
    assert_eq!(
        d.token_count(),
        tokens(&["Summarise the Q3 report", "q3.pdf"])
    );
    let result = WorkerResult {
        index: 0,
        of: 1,
        summary: "Revenue grew 4%".into(),
        citations: vec![],
    };
    d.handoff_to("aggregator", &result).await.unwrap();
    let mut aggregator = client
        .subscribe_typed::<WorkerResult>("aggregator", "a1", 1)
        .await
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), aggregator.next_delivery())
        .await
        .expect("a delivery in time")
        .expect("stream open")
        .expect("decoded");
    assert_eq!(r.payload(), &result);
    assert_eq!(r.envelope().source_agent, "worker");
    assert_eq!(r.envelope().depth, 2);
    r.ack().await.unwrap();

    // A typed subscriber that gets a payload of another type rejects it:
    // it could never succeed, and the run's owner is told.
    client
        .register_agent(AgentConfig::new("loose"))
        .await
        .unwrap();
    let other = client
        .start_run(RunConfig::new("owner").id("mistyped"))
        .await
        .unwrap();
    client
        .handoff(Handoff::to(&other.id, "loose", &note("not a subtask", 1)).unwrap())
        .await
        .unwrap();
    let mut loose = client
        .subscribe_typed::<Subtask>("loose", "l1", 1)
        .await
        .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(5), loose.next_delivery())
        .await
        .expect("a delivery in time")
        .expect("stream open")
        .expect_err("a Note is not a Subtask");
    assert_eq!(err.kind(), ErrorKind::Decode, "{err}");
    let status = client.get_run(&other.id).await.unwrap().run.unwrap().status;
    assert_eq!(status, pb::RunStatus::Failed as i32);
}

// ------------------------------------------------------ compatibility mode

#[tokio::test]
async fn the_compatibility_mode_is_fixed_at_version_one_and_changed_only_by_an_admin_call() {
    use handoff_client::ContractSpec;

    let (_nats, _broker, client) = stack(|_| {}).await;
    let package = "fixed.v1";
    let message_type = "fixed.v1.M";
    let v1 = schema(package, "message M { string a = 1; int32 b = 2; }");
    // Field 2 changes type: a break under every mode but NONE.
    let broken = schema(package, "message M { string a = 1; string b = 2; }");
    let spec = |fds: &[u8], mode: Option<pb::Compatibility>| {
        let spec = ContractSpec::named(message_type, fds.to_vec());
        match mode {
            Some(m) => spec.compatibility(m),
            None => spec,
        }
    };
    let versions = || async {
        client
            .list_contracts(Some(message_type))
            .await
            .unwrap()
            .iter()
            .map(|c| (c.version, c.compatibility))
            .collect::<Vec<_>>()
    };
    let first = client
        .register_contract(spec(&v1, Some(pb::Compatibility::Backward)))
        .await
        .unwrap();
    assert!(first.created);

    // Whoever registers v2 cannot pick NONE to let the break through.
    let err = client
        .register_contract(spec(&broken, Some(pb::Compatibility::None)))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    assert_eq!(err.reason(), Some("COMPATIBILITY_MODE_FIXED"), "{err}");
    let meta = err.metadata();
    assert_eq!(
        meta.get("stored_mode").map(String::as_str),
        Some("BACKWARD")
    );
    assert_eq!(meta.get("requested_mode").map(String::as_str), Some("NONE"));
    assert_eq!(
        meta.get("message_type").map(String::as_str),
        Some(message_type)
    );
    assert!(err.to_string().contains("BACKWARD"), "{err}");
    assert_eq!(versions().await, [(1, pb::Compatibility::Backward as i32)]);

    // Unset on v2: checked under v1's BACKWARD, so the break is refused.
    let err = client
        .register_contract(spec(&broken, None))
        .await
        .unwrap_err();
    assert_eq!(err.reason(), Some("INCOMPATIBLE_CONTRACT"), "{err}");
    assert_eq!(
        err.metadata().get("mode").map(String::as_str),
        Some("BACKWARD")
    );
    // The same content again, mode unset: still a no-op.
    let again = client.register_contract(spec(&v1, None)).await.unwrap();
    assert!(!again.created);
    assert_eq!(versions().await, [(1, pb::Compatibility::Backward as i32)]);

    // The explicit admin call changes the mode for the next versions.
    let changed = client
        .set_compatibility(message_type, pb::Compatibility::None, "b becomes a label")
        .await
        .unwrap();
    assert!(changed.changed);
    assert_eq!(changed.previous, pb::Compatibility::Backward as i32);
    let again = client
        .set_compatibility(message_type, pb::Compatibility::None, "b becomes a label")
        .await
        .unwrap();
    assert!(!again.changed, "the same mode again changes nothing");
    let err = client
        .set_compatibility(message_type, pb::Compatibility::Unspecified, "why")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    let err = client
        .set_compatibility("fixed.v1.Missing", pb::Compatibility::None, "why")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");

    // Now BACKWARD is the mode a request may not name, and the break
    // registers under NONE.
    let err = client
        .register_contract(spec(&broken, Some(pb::Compatibility::Backward)))
        .await
        .unwrap_err();
    assert_eq!(err.reason(), Some("COMPATIBILITY_MODE_FIXED"), "{err}");
    assert_eq!(
        err.metadata().get("stored_mode").map(String::as_str),
        Some("NONE")
    );
    let v2 = client.register_contract(spec(&broken, None)).await.unwrap();
    assert!(v2.created);
    assert_eq!(v2.contract.version, 2);
    assert_eq!(
        versions().await,
        [
            (1, pb::Compatibility::Backward as i32),
            (2, pb::Compatibility::None as i32)
        ]
    );

    // The change is an event on run `_`: who, from what to what, why.
    let mut events = client
        .watch(
            WatchFilter::all()
                .run("_")
                .kinds([pb::EventKind::ContractModeChanged])
                .from_sequence(1),
        )
        .await
        .unwrap();
    let seen = events_until(&mut events, Duration::from_secs(5), |e| {
        e.contract_type == message_type
    })
    .await;
    let changes: Vec<&pb::Event> = seen
        .iter()
        .filter(|e| e.contract_type == message_type)
        .collect();
    assert_eq!(changes.len(), 1, "{seen:?}");
    let e = changes[0];
    assert_eq!(e.kind, pb::EventKind::ContractModeChanged as i32);
    assert_eq!(e.run_id, "_");
    assert_eq!(e.reason, "BACKWARD -> NONE: b becomes a label");
    assert!(!e.agent.is_empty());
}
