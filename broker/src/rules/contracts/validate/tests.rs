use super::*;
use crate::error::Class;

use prost::Message as _;
use prost_reflect::DescriptorPool;

const V1: &str = r#"
    syntax = "proto3";
    package acme.v1;

    message Question {
      string text = 1;
      optional string lang = 2;
    }
    message Meta {
      string user = 1;
      map<string, string> labels = 2;
      int64 priority = 3;
    }
    message Step {
      string text = 1;
      uint32 n = 2;
    }
    message Note {
      string body = 1;
    }
    message Ask {
      Question ask = 1;
      Meta meta = 2;
      repeated Step steps = 3;
      map<string, Note> notes = 4;
      repeated string tags = 5;
      map<int32, string> by_id = 6;
      bytes blob = 8;
      repeated int32 scores = 10;
    }
"#;

/// V1 plus fields: Ask.7 and Ask.11, Step.9, Meta.12, Note.5.
const V2: &str = r#"
    syntax = "proto3";
    package acme.v1;

    message Question {
      string text = 1;
      optional string lang = 2;
    }
    message Meta {
      string user = 1;
      map<string, string> labels = 2;
      int64 priority = 3;
      string team = 12;
    }
    message Step {
      string text = 1;
      uint32 n = 2;
      repeated string hints = 9;
    }
    message Note {
      string body = 1;
      bool pinned = 5;
    }
    message Ask {
      Question ask = 1;
      Meta meta = 2;
      repeated Step steps = 3;
      map<string, Note> notes = 4;
      repeated string tags = 5;
      map<int32, string> by_id = 6;
      string extra = 7;
      bytes blob = 8;
      repeated int32 scores = 10;
      int64 more = 11;
    }
"#;

struct Source(&'static str);

impl protox::file::FileResolver for Source {
    fn open_file(&self, name: &str) -> Result<protox::file::File, protox::Error> {
        if name == "acme.proto" {
            protox::file::File::from_source(name, self.0)
        } else {
            Err(protox::Error::file_not_found(name))
        }
    }
}

fn pool(source: &'static str) -> DescriptorPool {
    let mut compiler = protox::Compiler::with_file_resolver(Source(source));
    compiler.open_file("acme.proto").unwrap();
    compiler.descriptor_pool()
}

fn ask(pool: &DescriptorPool) -> MessageDescriptor {
    pool.get_message_by_name("acme.v1.Ask").unwrap()
}

fn new(pool: &DescriptorPool, name: &str, fields: Vec<(&str, Value)>) -> DynamicMessage {
    let desc = pool
        .get_message_by_name(&format!("acme.v1.{name}"))
        .unwrap();
    let mut m = DynamicMessage::new(desc);
    for (field, value) in fields {
        m.try_set_field_by_name(field, value).unwrap();
    }
    m
}

fn s(v: &str) -> Value {
    Value::String(v.to_owned())
}

fn tokenizer() -> Tokenizer {
    Tokenizer::new("o200k_base").unwrap()
}

fn rules() -> pb::ContractRules {
    pb::ContractRules::default()
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

/// A v1 Ask with strings everywhere.
fn full(pool: &DescriptorPool) -> DynamicMessage {
    let question = new(
        pool,
        "Question",
        vec![("text", s("What is the capital of France?"))],
    );
    let meta = new(
        pool,
        "Meta",
        vec![
            ("user", s("ada")),
            (
                "labels",
                Value::Map(
                    [
                        (MapKey::String("team".into()), s("research")),
                        (MapKey::String("tier".into()), s("gold")),
                    ]
                    .into(),
                ),
            ),
            ("priority", Value::I64(3)),
        ],
    );
    let steps = (0..3)
        .map(|i| {
            Value::Message(new(
                pool,
                "Step",
                vec![
                    ("text", s(&format!("step number {i}"))),
                    ("n", Value::U32(i)),
                ],
            ))
        })
        .collect();
    let notes = [(
        MapKey::String("first".into()),
        Value::Message(new(pool, "Note", vec![("body", s("look it up"))])),
    )]
    .into();
    new(
        pool,
        "Ask",
        vec![
            ("ask", Value::Message(question)),
            ("meta", Value::Message(meta)),
            ("steps", Value::List(steps)),
            ("notes", Value::Map(notes)),
            ("tags", Value::List(vec![s("geo"), s("trivia")])),
            ("by_id", Value::Map([(MapKey::I32(4), s("four"))].into())),
            ("blob", Value::Bytes(b"not a string".to_vec().into())),
            ("scores", Value::List(vec![Value::I32(1), Value::I32(2)])),
        ],
    )
}

/// Every string of [`full`], keys included.
const FULL_STRINGS: &[&str] = &[
    "What is the capital of France?",
    "ada",
    "team",
    "research",
    "tier",
    "gold",
    "step number 0",
    "step number 1",
    "step number 2",
    "first",
    "look it up",
    "geo",
    "trivia",
    "four",
];

fn run(
    desc: &MessageDescriptor,
    rules: &pb::ContractRules,
    payload: &[u8],
) -> Result<Measured, Violation> {
    check(
        desc,
        rules,
        &tokenizer(),
        payload,
        None,
        &[],
        SystemTime::now(),
    )
}

#[test]
fn full_payload_passes_with_no_rules_and_measures() {
    let pool = pool(V1);
    let payload = full(&pool).encode_to_vec();
    let t = tokenizer();
    let expected: usize = FULL_STRINGS.iter().map(|s| t.count(s)).sum();
    let m = run(&ask(&pool), &rules(), &payload).unwrap();
    assert_eq!(m.tokens, expected as u64);
    assert_eq!(m.bytes, payload.len() as u64);
    // Empty payload: an empty message, zero of everything.
    let m = run(&ask(&pool), &rules(), &[]).unwrap();
    assert_eq!(
        m,
        Measured {
            tokens: 0,
            bytes: 0
        }
    );
}

#[test]
fn garbage_does_not_decode() {
    let pool = pool(V1);
    let err = run(&ask(&pool), &rules(), &[0xff, 0xff, 0xff, 0x01, 0x02]).unwrap_err();
    let Violation::Decode(text) = &err else {
        panic!("{err:?}");
    };
    assert!(
        text.starts_with("payload does not decode as acme.v1.Ask: "),
        "{text}"
    );
    assert_eq!(err.to_string(), *text);
    assert_eq!(err.rule(), "decode");
    assert_eq!(err.reason(), Reason::PayloadUndecodable);
}

#[test]
fn no_panic_on_arbitrary_bytes() {
    let pool = pool(V1);
    let desc = ask(&pool);
    let good = full(&pool).encode_to_vec();
    let t = tokenizer();
    let mut rules = rules();
    rules.required_fields = strings(&["ask.text", "steps", "notes", "meta.labels"]);
    rules.max_tokens = 10;
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for round in 0..20_000 {
        let payload: Vec<u8> = if round % 2 == 0 {
            let len = (next() % 64) as usize;
            (0..len).map(|_| next() as u8).collect()
        } else {
            let mut p = good.clone();
            for _ in 0..(1 + next() % 4) {
                let i = (next() as usize) % p.len();
                p[i] = next() as u8;
            }
            p.truncate((next() as usize) % (p.len() + 1));
            p
        };
        let _ = check(
            &desc,
            &rules,
            &t,
            &payload,
            Some(0.5),
            &[],
            SystemTime::now(),
        );
    }
}

#[test]
fn unknown_fields_top_level_and_nested() {
    let v1 = pool(V1);
    let v2 = pool(V2);
    let mut payload = full(&v2);
    payload.set_field_by_name("extra", s("drift"));
    payload.set_field_by_name("more", Value::I64(5));
    let Some(Value::List(steps)) = payload.get_field_by_name_mut("steps") else {
        panic!()
    };
    let Value::Message(step) = &mut steps[2] else {
        panic!()
    };
    step.set_field_by_name("hints", Value::List(vec![s("a"), s("b")]));
    let Some(Value::Message(meta)) = payload.get_field_by_name_mut("meta") else {
        panic!()
    };
    meta.set_field_by_name("team", s("blue"));
    let note = new(
        &v2,
        "Note",
        vec![("body", s("x")), ("pinned", Value::Bool(true))],
    );
    let Some(Value::Map(notes)) = payload.get_field_by_name_mut("notes") else {
        panic!()
    };
    notes.insert(MapKey::String("zed".into()), Value::Message(note));

    let err = run(&ask(&v1), &rules(), &payload.encode_to_vec()).unwrap_err();
    assert_eq!(
        err,
        Violation::UnknownFields(strings(&[
            "7",
            "11",
            "meta.12",
            "steps[2].9",
            "notes[zed].5"
        ]))
    );
    assert_eq!(
        err.to_string(),
        "payload carries fields unknown to the contract (schema drift): 7, 11, meta.12, steps[2].9, notes[zed].5"
    );
    assert_eq!(err.rule(), "unknown_fields");
    assert_eq!(err.reason(), Reason::SchemaDrift);
    assert_eq!(err.reason().class(), Class::FailedPrecondition);
    assert_eq!(
        err.metadata(),
        vec![("fields", "7,11,meta.12,steps[2].9,notes[zed].5".to_string())]
    );

    // Only nested.
    let mut payload = full(&v2);
    let Some(Value::Message(meta)) = payload.get_field_by_name_mut("meta") else {
        panic!()
    };
    meta.set_field_by_name("team", s("blue"));
    let err = run(&ask(&v1), &rules(), &payload.encode_to_vec()).unwrap_err();
    assert_eq!(err, Violation::UnknownFields(strings(&["meta.12"])));

    // The same v2 message without the new fields set passes v1.
    let payload = full(&v2).encode_to_vec();
    assert!(run(&ask(&v1), &rules(), &payload).is_ok());
}

#[test]
fn unknown_fields_come_before_every_later_rule() {
    let v1 = pool(V1);
    let v2 = pool(V2);
    let payload = new(&v2, "Ask", vec![("extra", s("drift"))]).encode_to_vec();
    let mut r = rules();
    r.required_fields = strings(&["ask.text"]);
    r.max_tokens = 1;
    r.min_confidence = Some(0.5);
    let err = run(&ask(&v1), &r, &payload).unwrap_err();
    assert_eq!(err, Violation::UnknownFields(strings(&["7"])));
}

#[test]
fn required_fields() {
    let pool = pool(V1);
    let desc = ask(&pool);
    let mut r = rules();
    r.required_fields = strings(&[
        "ask",
        "ask.text",
        "meta.user",
        "meta.labels",
        "steps",
        "notes",
        "tags",
        "by_id",
        "blob",
        "scores",
    ]);
    assert!(run(&desc, &r, &full(&pool).encode_to_vec()).is_ok());

    // Several missing at once, nested path, unset intermediate.
    let payload = new(
        &pool,
        "Ask",
        vec![(
            "meta",
            Value::Message(new(&pool, "Meta", vec![("priority", Value::I64(1))])),
        )],
    );
    r.required_fields = strings(&["ask.text", "meta.user", "meta.priority", "steps", "meta"]);
    let err = run(&desc, &r, &payload.encode_to_vec()).unwrap_err();
    assert_eq!(
        err,
        Violation::MissingRequired(strings(&["ask.text", "meta.user", "steps"]))
    );
    assert_eq!(
        err.to_string(),
        "missing required fields: ask.text, meta.user, steps"
    );
    assert_eq!(err.rule(), "required_fields");

    // Default scalars and empty lists count as missing; an explicit-presence
    // field set to its default and an empty message count as present.
    let payload = new(
        &pool,
        "Ask",
        vec![
            (
                "ask",
                Value::Message(new(
                    &pool,
                    "Question",
                    vec![("text", s("")), ("lang", s(""))],
                )),
            ),
            ("meta", Value::Message(new(&pool, "Meta", vec![]))),
            ("tags", Value::List(vec![])),
        ],
    );
    r.required_fields = strings(&["ask.text", "ask.lang", "meta", "meta.priority", "tags"]);
    let err = run(&desc, &r, &payload.encode_to_vec()).unwrap_err();
    assert_eq!(
        err,
        Violation::MissingRequired(strings(&["ask.text", "meta.priority", "tags"]))
    );

    // Paths that do not resolve are missing, never a panic.
    r.required_fields = strings(&["nope", "steps.text", "ask.text.x", ""]);
    let err = run(&desc, &r, &full(&pool).encode_to_vec()).unwrap_err();
    assert_eq!(err, Violation::MissingRequired(r.required_fields.clone()));
}

#[test]
fn tokens_budget() {
    let pool = pool(V1);
    let desc = ask(&pool);
    let payload = full(&pool).encode_to_vec();
    let t = tokenizer();
    let expected = FULL_STRINGS.iter().map(|s| t.count(s) as u64).sum::<u64>();
    let mut r = rules();
    r.max_tokens = expected;
    assert_eq!(run(&desc, &r, &payload).unwrap().tokens, expected);
    r.max_tokens = expected - 1;
    let err = run(&desc, &r, &payload).unwrap_err();
    assert_eq!(
        err,
        Violation::TooManyTokens {
            count: expected,
            budget: expected - 1
        }
    );
    assert_eq!(
        err.to_string(),
        format!(
            "payload is {expected} tokens; the contract's max_tokens is {}",
            expected - 1
        )
    );
    assert_eq!(err.rule(), "max_tokens");
}

#[test]
fn special_tokens_are_counted_as_text() {
    let pool = pool(V1);
    let payload = new(
        &pool,
        "Ask",
        vec![("tags", Value::List(vec![s("<|endoftext|>")]))],
    );
    let m = run(&ask(&pool), &rules(), &payload.encode_to_vec()).unwrap();
    assert_eq!(m.tokens, tokenizer().count("<|endoftext|>") as u64);
    assert!(m.tokens > 1);
}

#[test]
fn bytes_budget() {
    let pool = pool(V1);
    let desc = ask(&pool);
    let mut r = rules();
    r.max_bytes = 4;
    r.max_tokens = 1; // would fail too, but bytes are checked first
    let err = run(&desc, &r, &[0xff; 5]).unwrap_err();
    assert_eq!(err, Violation::TooManyBytes { size: 5, budget: 4 });
    assert_eq!(
        err.to_string(),
        "payload is 5 bytes; the contract's max_bytes is 4"
    );
    assert_eq!(err.rule(), "max_bytes");
    assert_eq!(err.reason(), Reason::OverByteBudget);
    assert_eq!(err.reason().class(), Class::FailedPrecondition);

    let payload = full(&pool).encode_to_vec();
    r.max_tokens = 0;
    r.max_bytes = payload.len() as u64;
    assert!(run(&desc, &r, &payload).is_ok());
    r.max_bytes -= 1;
    assert!(matches!(
        run(&desc, &r, &payload),
        Err(Violation::TooManyBytes { .. })
    ));
}

#[test]
fn confidence() {
    let pool = pool(V1);
    let desc = ask(&pool);
    let t = tokenizer();
    let mut r = rules();
    let now = SystemTime::now();
    // No rule: anything goes.
    assert!(check(&desc, &r, &t, &[], None, &[], now).is_ok());
    r.min_confidence = Some(0.7);
    let err = check(&desc, &r, &t, &[], None, &[], now).unwrap_err();
    assert_eq!(err, Violation::ConfidenceUnstated { min: 0.7 });
    assert_eq!(
        err.to_string(),
        "confidence is not stated; the contract requires min_confidence 0.7"
    );
    assert_eq!(err.rule(), "min_confidence");
    let err = check(&desc, &r, &t, &[], Some(0.42), &[], now).unwrap_err();
    assert_eq!(
        err,
        Violation::LowConfidence {
            confidence: 0.42,
            min: 0.7
        }
    );
    assert_eq!(
        err.to_string(),
        "confidence 0.42 is under the contract's min_confidence 0.7"
    );
    assert_eq!(err.rule(), "min_confidence");
    assert!(matches!(
        check(&desc, &r, &t, &[], Some(f64::NAN), &[], now),
        Err(Violation::LowConfidence { .. })
    ));
    assert!(check(&desc, &r, &t, &[], Some(0.7), &[], now).is_ok());
    assert!(check(&desc, &r, &t, &[], Some(0.9), &[], now).is_ok());
}

fn tool_result(name: &str, observed: Option<SystemTime>) -> pb::ToolResult {
    pb::ToolResult {
        tool: name.to_owned(),
        observed_at: observed.map(prost_types::Timestamp::from),
        result: None,
    }
}

#[test]
fn tool_result_age() {
    let pool = pool(V1);
    let desc = ask(&pool);
    let t = tokenizer();
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let stale_age = Duration::from_secs(2 * 3600 + 3 * 60) + Duration::from_millis(1);
    let fresh = tool_result("calc", Some(now - Duration::from_secs(59 * 60)));
    let future = tool_result("clock", Some(now + hour));
    let undated = tool_result("web_search", None);
    let stale = tool_result("web_search", Some(now - stale_age));

    let mut r = rules();
    // No rule: undated and stale results are fine.
    assert!(check(
        &desc,
        &r,
        &t,
        &[],
        None,
        &[undated.clone(), stale.clone()],
        now
    )
    .is_ok());

    r.max_tool_result_age = Some(prost_types::Duration {
        seconds: 3600,
        nanos: 0,
    });
    assert!(check(
        &desc,
        &r,
        &t,
        &[],
        None,
        &[fresh.clone(), future.clone()],
        now
    )
    .is_ok());
    assert!(check(&desc, &r, &t, &[], None, &[], now).is_ok());

    let err = check(&desc, &r, &t, &[], None, &[fresh.clone(), undated], now).unwrap_err();
    assert_eq!(
        err,
        Violation::ToolResultUndated {
            tool: "web_search".into()
        }
    );
    assert_eq!(
        err.to_string(),
        "tool result \"web_search\" has no observed_at; the contract's max_tool_result_age needs it"
    );
    assert_eq!(err.rule(), "tool_result_age");

    let err = check(&desc, &r, &t, &[], None, &[fresh, future, stale], now).unwrap_err();
    let Violation::StaleToolResult { tool, age, max } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(tool, "web_search");
    // Timestamp keeps nanoseconds; SystemTime may be finer on some OSes.
    assert!(
        age.abs_diff(stale_age) < Duration::from_micros(1),
        "{age:?}"
    );
    assert_eq!(*max, hour);
    assert_eq!(
        err.to_string(),
        "tool result \"web_search\" was observed 2h 3m 1s ago; the contract's max_tool_result_age is 1h"
    );
    assert_eq!(err.rule(), "tool_result_age");
    assert_eq!(err.reason(), Reason::StaleToolResult);
    assert_eq!(err.reason().class(), Class::FailedPrecondition);

    // Exactly the max is not stale.
    let edge = tool_result("edge", Some(now - hour));
    assert!(check(&desc, &r, &t, &[], None, &[edge], now).is_ok());
}

#[test]
fn display_of_whole_seconds() {
    let v = Violation::StaleToolResult {
        tool: "web_search".into(),
        age: Duration::from_secs(2 * 3600 + 3 * 60),
        max: Duration::from_secs(3600),
    };
    assert_eq!(
        v.to_string(),
        "tool result \"web_search\" was observed 2h 3m ago; the contract's max_tool_result_age is 1h"
    );
    let many = Violation::UnknownFields((0..60).map(|i| i.to_string()).collect());
    assert!(many.to_string().ends_with(", 49 and 10 more"), "{many}");
}

#[test]
fn required_paths_at_registration() {
    let pool = pool(V1);
    let desc = ask(&pool);
    let good = strings(&[
        "ask",
        "ask.text",
        "ask.lang",
        "meta.user",
        "meta.labels",
        "steps",
        "notes",
        "tags",
        "by_id",
    ]);
    assert_eq!(check_required_paths(&desc, &good), Ok(()));
    assert_eq!(check_required_paths(&desc, &[]), Ok(()));

    let bad = strings(&[
        "ask.txt",
        "nope",
        "ask.text.length",
        "steps.text",
        "notes.body",
        "meta..user",
        "",
        "meta.user",
    ]);
    let errors = check_required_paths(&desc, &bad).unwrap_err();
    assert_eq!(
        errors,
        strings(&[
            "required field \"ask.txt\": acme.v1.Question has no field \"txt\"",
            "required field \"nope\": acme.v1.Ask has no field \"nope\"",
            "required field \"ask.text.length\": ask.text is a string, not a message, so the path cannot continue",
            "required field \"steps.text\": steps is repeated; only the last field of a path may be repeated or a map",
            "required field \"notes.body\": notes is a map; only the last field of a path may be repeated or a map",
            "required field \"meta..user\": empty field name",
            "required field path is empty",
        ])
    );
}

/// Times `check` on string-heavy payloads of ~1 KiB and ~64 KiB.
/// `cargo test --release -- --ignored --nocapture`
#[test]
#[ignore]
fn bench_check() {
    let pool = pool(V1);
    let desc = ask(&pool);
    let t = tokenizer();
    let words = [
        "the",
        "broker",
        "checks",
        "every",
        "handoff",
        "against",
        "its",
        "contract,",
        "counting",
        "tokens",
        "in",
        "all",
        "strings;",
        "agents",
        "pass",
        "work",
        "along",
        "with",
        "confidence",
        "0.87",
        "and",
        "tool",
        "results",
        "from",
        "web_search.",
    ];
    let mut seed = 7_u64;
    let mut sentence = |n: usize| {
        let mut out = String::new();
        for _ in 0..n {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(words[(seed >> 33) as usize % words.len()]);
        }
        out
    };
    for target in [1024_usize, 64 * 1024] {
        let mut steps = Vec::new();
        let mut labels = std::collections::HashMap::new();
        let mut size = 0;
        let mut i = 0;
        while size < target {
            let text = sentence(12);
            size += text.len() + 8;
            steps.push(Value::Message(new(
                &pool,
                "Step",
                vec![("text", Value::String(text)), ("n", Value::U32(i))],
            )));
            if i % 4 == 0 {
                let v = sentence(3);
                size += v.len() + 12;
                labels.insert(MapKey::String(format!("label{i}")), Value::String(v));
            }
            i += 1;
        }
        let msg = new(
            &pool,
            "Ask",
            vec![
                (
                    "ask",
                    Value::Message(new(
                        &pool,
                        "Question",
                        vec![("text", s("Summarize the findings."))],
                    )),
                ),
                (
                    "meta",
                    Value::Message(new(
                        &pool,
                        "Meta",
                        vec![("user", s("ada")), ("labels", Value::Map(labels))],
                    )),
                ),
                ("steps", Value::List(steps)),
            ],
        );
        let payload = msg.encode_to_vec();
        let mut r = rules();
        r.required_fields = strings(&["ask.text", "meta.user", "steps"]);
        r.max_tokens = 1_000_000;
        r.max_bytes = 1 << 20;
        r.min_confidence = Some(0.5);
        r.max_tool_result_age = Some(prost_types::Duration {
            seconds: 3600,
            nanos: 0,
        });
        let now = SystemTime::now();
        let tools = [tool_result("web_search", Some(now))];
        let run = || check(&desc, &r, &t, &payload, Some(0.9), &tools, now).unwrap();
        let measured = run();
        let iters = if target < 4096 { 20_000 } else { 300 };
        let start = std::time::Instant::now();
        for _ in 0..iters {
            std::hint::black_box(run());
        }
        let per = start.elapsed() / iters;
        // The tokenizer alone, on the same strings, for comparison.
        let strings_only = {
            let decoded = DynamicMessage::decode(desc.clone(), payload.as_slice()).unwrap();
            let start = std::time::Instant::now();
            for _ in 0..iters {
                let mut scan = Scan {
                    tokenizer: &t,
                    tokens: 0,
                    unknown: false,
                };
                scan.message(&decoded);
                std::hint::black_box(scan.tokens);
            }
            start.elapsed() / iters
        };
        println!(
            "check: {} bytes, {} tokens, {} strings: {per:?} per check ({strings_only:?} in the scan)",
            measured.bytes,
            measured.tokens,
            i + i / 4 * 2 + 3,
        );
    }
}
