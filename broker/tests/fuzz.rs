//! Property tests of what decodes untrusted bytes and strings: delivery
//! ids, names and grant patterns, handoff requests, state deltas, barrier
//! specs, contract descriptor sets, trace contexts and configuration. Each holds for any
//! input: no panic, and a refusal is the precise reason (never an
//! internal error). `./dev test` runs a short budget (proptest's 256
//! cases each); `./dev fuzz [CASES]` runs each target for CASES cases
//! (default 1,000,000) on a release build.

use std::collections::BTreeMap;

use handoff_proto::pb;
use handoffd::{
    error::{Class, Reason},
    rules::{barrier, contracts, grants, handoff, names, state},
    Config,
};
use proptest::prelude::*;

/// Short strings that are sometimes valid names, sometimes not.
fn name() -> impl Strategy<Value = String> {
    prop_oneof!["[A-Za-z0-9_-]{1,12}", ".{0,12}", "[A-Za-z0-9_.*-]{0,140}",]
}

/// Arbitrary `google.protobuf.Value`s, nested a little.
fn value() -> impl Strategy<Value = prost_types::Value> {
    use prost_types::value::Kind;
    let leaf = prop_oneof![
        Just(Kind::NullValue(0)),
        any::<f64>().prop_map(Kind::NumberValue),
        ".{0,40}".prop_map(Kind::StringValue),
        any::<bool>().prop_map(Kind::BoolValue),
    ]
    .prop_map(|k| prost_types::Value { kind: Some(k) });
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|values| prost_types::Value {
                kind: Some(Kind::ListValue(prost_types::ListValue { values })),
            }),
            prop::collection::btree_map(".{0,8}", inner, 0..4).prop_map(|m| prost_types::Value {
                kind: Some(Kind::StructValue(prost_types::Struct {
                    fields: m.into_iter().collect(),
                })),
            }),
        ]
    })
}

fn delta() -> impl Strategy<Value = pb::StateDelta> {
    (
        prop::collection::btree_map("[A-Za-z0-9_.-]{0,8}|.{0,8}", value(), 0..4),
        prop::collection::vec(".{0,8}", 0..3),
        any::<u64>(),
    )
        .prop_map(|(set, unset, base)| pb::StateDelta {
            set: set.into_iter().collect(),
            unset,
            base_revision: (base % 5 > 0).then_some(base % 4),
            ..Default::default()
        })
}

/// A refusal the input earned: not an internal error.
fn precise(e: &handoffd::BrokerError) -> bool {
    e.class() != Class::Internal
}

proptest! {
    // Cases from PROPTEST_CASES (256 by default); a failing case is
    // printed, not written next to the sources.
    #![proptest_config(ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn delivery_ids(s in ".{0,200}", bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        for text in [s, base64_url(&bytes)] {
            if let Err(e) = handoff::decode_token(&text) {
                prop_assert_eq!(e.reason(), Reason::BadDeliveryId);
            }
        }
    }

    #[test]
    fn delivery_ids_round_trip(
        agent in "[A-Za-z0-9_-]{1,20}", seq in 1u64.., id in "[a-z0-9-]{1,40}", attempt in any::<u32>(),
    ) {
        let token = pb::DeliveryToken {
            agent,
            stream_sequence: seq,
            ack_subject: "$JS.ACK.x".into(),
            handoff_id: id,
            attempt,
            ..Default::default()
        };
        let decoded = handoff::decode_token(&handoff::encode_token(&token));
        prop_assert_eq!(decoded.ok(), Some(token));
    }

    #[test]
    fn names_and_patterns(value in name(), pattern in name()) {
        let valid = !value.is_empty()
            && value.len() <= 128
            && value.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        match names::validate("agent", &value) {
            Ok(()) => prop_assert!(valid, "{value:?} accepted"),
            Err(e) => {
                prop_assert!(!valid, "{value:?} refused");
                prop_assert_eq!(e.reason(), Reason::InvalidName);
            }
        }
        let _ = grants::matches(&pattern, &value);
        let principal = pb::Principal {
            name: value,
            grants: vec![pb::Grant { action: 3, pattern, deny: false }],
        };
        if let Err(e) = grants::validate(&principal) {
            prop_assert_eq!(e.class(), Class::InvalidArgument);
        }
    }

    #[test]
    fn handoff_requests(
        run_id in name(), source in name(), target in name(), key in ".{0,300}",
        asks in prop::collection::vec(".{0,10}", 0..3),
        payload in prop::collection::vec(any::<u8>(), 0..64),
        type_url in ".{0,60}", confidence in proptest::option::of(any::<f64>()),
        delta in proptest::option::of(delta()), barrier_id in name(), branch_key in ".{0,20}",
        flags in any::<(bool, bool, bool)>(),
    ) {
        let req = pb::HandoffRequest {
            run_id,
            source_agent: source,
            target_agent: target,
            idempotency_key: key,
            asks_for: asks,
            payload: Some(prost_types::Any { type_url, value: payload }),
            confidence,
            state_delta: delta,
            barrier_id,
            branch_key,
            to_barrier: flags.0,
            fan_out: flags.1,
            r#final: flags.2,
            ..Default::default()
        };
        if let Err(e) = handoff::validate_handoff(&req, 1 << 20) {
            prop_assert!(precise(&e), "{e}");
        }
    }

    #[test]
    fn state_deltas(d in delta(), seed in delta(), value_bytes in 1usize..512, document_bytes in 1usize..4096) {
        let limits = state::Limits { value_bytes, document_bytes };
        if let Err(e) = state::validate_delta(&d) {
            prop_assert!(precise(&e), "{e}");
            return Ok(());
        }
        let at = prost_types::Timestamp::default();
        let head = state::apply("run", None, &seed, "h0", "a", limits, at).ok();
        if let Err(e) = state::apply("run", head.as_ref(), &d, "h1", "a", limits, at) {
            prop_assert!(precise(&e), "{e}");
        }
    }

    #[test]
    fn barrier_specs(
        run_id in name(), barrier_id in name(), target in name(),
        keys in prop::collection::vec(".{0,10}", 0..6), count in 0u32..20_000,
        mode in any::<i32>(), quorum in any::<u32>(),
        timeout in proptest::option::of(any::<(i64, i32)>()),
    ) {
        let spec = pb::BarrierSpec {
            run_id,
            barrier_id,
            target_agent: target,
            branch_keys: keys,
            branch_count: count,
            mode,
            quorum,
            timeout: timeout.map(|(seconds, nanos)| prost_types::Duration { seconds, nanos }),
            ..Default::default()
        };
        let _ = barrier::branch_keys(&spec);
    }

    #[test]
    fn contract_descriptor_sets(bytes in prop::collection::vec(any::<u8>(), 0..512), name in ".{0,40}") {
        if let Err(e) = contracts::message_of(&bytes, &name) {
            prop_assert_eq!(e.reason(), Reason::InvalidContract);
        }
        if let Err(e) = contracts::validate_type_name("message_type", &name) {
            prop_assert!(precise(&e));
        }
    }

    #[test]
    fn trace_contexts(
        fields in prop::collection::hash_map(
            prop_oneof!["traceparent", "tracestate", "Traceparent", ".{0,12}"],
            prop_oneof![
                "00-[0-9a-f]{32}-[0-9a-f]{16}-0[01]",
                "[0-9a-z=,@-]{0,700}",
                ".{0,80}",
            ],
            0..4,
        ),
        header in prop_oneof!["00-[0-9a-f]{32}-[0-9a-f]{16}-01", "[ -~]{0,60}"],
    ) {
        // What a barrier keeps of a caller's trace context: a valid
        // traceparent and a bounded tracestate only, whatever was sent.
        let mut metadata = tonic::metadata::MetadataMap::new();
        if let Ok(v) = header.parse() {
            metadata.insert(handoffd::trace::TRACEPARENT, v);
        }
        let kept = handoffd::trace::opening_context(&fields, &metadata);
        for (k, v) in &kept {
            prop_assert!(k == "traceparent" || k == "tracestate", "{k}");
            prop_assert!(v.len() <= 512);
        }
        prop_assert!(kept.is_empty() || kept.contains_key("traceparent"));
    }

    #[test]
    fn configuration(values in prop::collection::btree_map(config_key(), ".{0,30}", 0..6)) {
        let values: BTreeMap<String, String> = values;
        // Every problem is listed; nothing panics.
        if let Err(problems) = Config::from_layers(&values) {
            prop_assert!(!problems.is_empty());
        }
    }
}

fn config_key() -> impl Strategy<Value = String> {
    let keys: Vec<String> = handoffd::config::KEYS
        .iter()
        .map(|k| k.name.to_string())
        .collect();
    prop::sample::select(keys)
}

fn base64_url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}
