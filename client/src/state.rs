//! The run state from an agent's side: the [`StateDelta`] a handoff
//! carries, and reading values out of a [`pb::RunState`].
//!
//! Values are `google.protobuf.Value`s ([`Value`]): strings, numbers,
//! bools, lists and structs convert with `.into()`.

use std::collections::BTreeMap;

pub use handoff_proto::digest::intent_digest;
use handoff_proto::pb;
pub use prost_types::Value;
use prost_types::{value::Kind, ListValue, Struct};

/// Explicit changes to a run's state, applied by the broker atomically with
/// the handoff that carries them ([`crate::Handoff::state_delta`]).
///
/// Made from a delivery ([`crate::Delivery::state_delta`]) it is based on
/// the revision that delivery carried: a key it replaces or removes that
/// another handoff changed since is refused (ABORTED, `STATE_CONFLICT`,
/// [`crate::ErrorKind::Conflict`]); disjoint keys, appends and merges
/// combine.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StateDelta {
    delta: pb::StateDelta,
}

impl StateDelta {
    /// An empty delta that overwrites whatever is held (no base revision).
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty delta based on `revision`.
    pub fn based_on(revision: u64) -> Self {
        StateDelta {
            delta: pb::StateDelta {
                base_revision: Some(revision),
                ..Default::default()
            },
        }
    }

    /// Writes `value` to `key` through the key's merge policy (replace,
    /// append or merge).
    pub fn set(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.delta.set.insert(key.into(), value.into());
        self
    }

    /// Appends `items` to the list held by `key` (a new list if absent).
    pub fn append(
        mut self,
        key: impl Into<String>,
        items: impl IntoIterator<Item = Value>,
    ) -> Self {
        let values = items.into_iter().collect();
        self.delta.append.insert(key.into(), ListValue { values });
        self
    }

    /// Merges `fields` into the struct held by `key` (a new struct if
    /// absent), one level deep.
    pub fn merge(
        mut self,
        key: impl Into<String>,
        fields: impl IntoIterator<Item = (String, Value)>,
    ) -> Self {
        let fields = fields.into_iter().collect();
        self.delta.merge.insert(key.into(), Struct { fields });
        self
    }

    /// Removes `key`.
    pub fn unset(mut self, key: impl Into<String>) -> Self {
        self.delta.unset.push(key.into());
        self
    }

    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        let d = &self.delta;
        d.set.is_empty() && d.append.is_empty() && d.merge.is_empty() && d.unset.is_empty()
    }

    /// The delta as sent.
    pub fn into_proto(self) -> pb::StateDelta {
        self.delta
    }
}

/// A string value of a state.
pub fn as_str(value: &Value) -> Option<&str> {
    match &value.kind {
        Some(Kind::StringValue(s)) => Some(s),
        _ => None,
    }
}

/// A number value of a state.
pub fn as_f64(value: &Value) -> Option<f64> {
    match &value.kind {
        Some(Kind::NumberValue(n)) => Some(*n),
        _ => None,
    }
}

/// A bool value of a state.
pub fn as_bool(value: &Value) -> Option<bool> {
    match &value.kind {
        Some(Kind::BoolValue(b)) => Some(*b),
        _ => None,
    }
}

/// The items of a list value of a state.
pub fn as_list(value: &Value) -> Option<&[Value]> {
    match &value.kind {
        Some(Kind::ListValue(l)) => Some(&l.values),
        _ => None,
    }
}

/// The fields of a struct value of a state.
pub fn as_struct(value: &Value) -> Option<&BTreeMap<String, Value>> {
    match &value.kind {
        Some(Kind::StructValue(s)) => Some(&s.fields),
        _ => None,
    }
}

/// Whether the intent digest a delivery carries matches its pinned context
/// and pinned state keys (a delivery without one has nothing to check).
pub fn intent_intact(delivery: &pb::Delivery) -> bool {
    delivery.pinned_digest.is_empty()
        || delivery.pinned_digest
            == handoff_proto::digest::intent_digest(
                delivery.pinned.as_ref(),
                delivery.state.as_ref(),
            )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_every_operation() {
        let d = StateDelta::based_on(3)
            .set("city", "Oslo")
            .set("nights", 2.0)
            .append("notes", ["a".into(), "b".into()])
            .merge("profile", [("name".to_string(), "Ann".into())])
            .unset("draft")
            .into_proto();
        assert_eq!(d.base_revision, Some(3));
        assert_eq!(d.set.get("city").and_then(as_str), Some("Oslo"));
        assert_eq!(d.set.get("nights").and_then(as_f64), Some(2.0));
        assert_eq!(d.append.get("notes").map(|l| l.values.len()), Some(2));
        assert_eq!(d.merge.get("profile").map(|s| s.fields.len()), Some(1));
        assert_eq!(d.unset, vec!["draft".to_string()]);
        assert!(StateDelta::new().is_empty());
    }

    #[test]
    fn a_changed_pinned_ask_fails_the_intent_check() {
        let pinned = pb::PinnedContext {
            ask: "book a flight".to_string(),
            ..Default::default()
        };
        let mut delivery = pb::Delivery {
            pinned_digest: handoff_proto::digest::intent_digest(Some(&pinned), None),
            pinned: Some(pinned),
            ..Default::default()
        };
        assert!(intent_intact(&delivery));
        if let Some(p) = delivery.pinned.as_mut() {
            p.ask = "book a hotel".to_string();
        }
        assert!(!intent_intact(&delivery));
    }
}
