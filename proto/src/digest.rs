//! The intent digest: a hex SHA-256 of a run's pinned context and its
//! pinned state keys, attached by the broker to every delivery and checked
//! by the SDKs, so a pinned ask that changed on the way is noticed.
//!
//! The encoding is fixed and language-neutral (the Python SDK computes the
//! same bytes): `handoff.v1 intent\n`, then the ask, then each pinned field
//! and each pinned state key in byte order of its name, each item as its
//! length in decimal, `:`, its bytes and `\n`; a state value is its
//! canonical protobuf encoding (`google.protobuf.Value`).

use prost::Message as _;
use sha2::{Digest as _, Sha256};

use crate::pb;

/// The intent digest of `pinned` and the pinned keys of `state` (none when
/// the run has no state), as lowercase hex.
pub fn intent_digest(pinned: Option<&pb::PinnedContext>, state: Option<&pb::RunState>) -> String {
    let mut hash = Sha256::new();
    let mut item = |bytes: &[u8]| {
        hash.update(bytes.len().to_string().as_bytes());
        hash.update(b":");
        hash.update(bytes);
        hash.update(b"\n");
    };
    item(b"handoff.v1 intent");
    let ask = pinned.map(|p| p.ask.as_str()).unwrap_or_default();
    item(ask.as_bytes());
    let mut fields: Vec<_> = pinned
        .map(|p| p.fields.iter().collect())
        .unwrap_or_default();
    fields.sort();
    item(fields.len().to_string().as_bytes());
    for (k, v) in fields {
        item(k.as_bytes());
        item(v.as_bytes());
    }
    let mut keys: Vec<&String> = state
        .map(|s| s.pinned_keys.iter().collect())
        .unwrap_or_default();
    keys.sort();
    keys.dedup();
    item(keys.len().to_string().as_bytes());
    for key in keys {
        item(key.as_bytes());
        let value = state
            .and_then(|s| s.values.get(key))
            .map(|v| v.encode_to_vec())
            .unwrap_or_default();
        item(&value);
    }
    hash.finalize()
        .iter()
        .fold(String::with_capacity(64), |mut s, b| {
            use std::fmt::Write as _;
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pinned(ask: &str) -> pb::PinnedContext {
        pb::PinnedContext {
            ask: ask.to_string(),
            fields: [
                ("a".to_string(), "1".to_string()),
                ("b".to_string(), "2".to_string()),
            ]
            .into(),
        }
    }

    #[test]
    fn a_changed_ask_field_or_pinned_value_changes_the_digest() {
        let base = intent_digest(Some(&pinned("find flights")), None);
        assert_eq!(base, intent_digest(Some(&pinned("find flights")), None));
        assert_ne!(base, intent_digest(Some(&pinned("find hotels")), None));
        let mut other = pinned("find flights");
        other.fields.insert("b".to_string(), "3".to_string());
        assert_ne!(base, intent_digest(Some(&other), None));
        let state = |v: &str| pb::RunState {
            pinned_keys: vec!["order_id".to_string()],
            values: [(
                "order_id".to_string(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue(v.to_string())),
                },
            )]
            .into(),
            ..Default::default()
        };
        let with = intent_digest(Some(&pinned("find flights")), Some(&state("A-1")));
        assert_ne!(base, with);
        assert_ne!(
            with,
            intent_digest(Some(&pinned("find flights")), Some(&state("A-2")))
        );
    }

    #[test]
    fn no_ambiguity_between_ask_and_fields() {
        let a = pb::PinnedContext {
            ask: "x\n1:y".to_string(),
            fields: Default::default(),
        };
        let b = pb::PinnedContext {
            ask: "x".to_string(),
            fields: [("y".to_string(), String::new())].into(),
        };
        assert_ne!(intent_digest(Some(&a), None), intent_digest(Some(&b), None));
    }
}
