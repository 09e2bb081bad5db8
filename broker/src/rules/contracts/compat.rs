//! Compatibility between two versions of a contract.
//!
//! A new version of a contract is checked against the latest registered one
//! with [`check`], under the compatibility mode of the new version:
//!
//! - **BACKWARD** (also when the mode is unspecified): receivers on the new
//!   version can read payloads written for the old one.
//! - **FORWARD**: receivers on the old version can read payloads written
//!   for the new one.
//! - **FULL**: both BACKWARD and FORWARD.
//! - **NONE**: any change is accepted; nothing is checked.
//!
//! The contract's message is compared with its new version and so,
//! recursively, is every message type reachable through its fields
//! (singular, repeated and map values alike) whose full name is the same in
//! both versions; each pair of types is compared once, so recursive types
//! terminate. Fields are matched by number, enum values by number; names do
//! not matter on the wire. Field paths in `ContractRules.required_fields`
//! are resolved by field name from the contract's message, descending
//! through message-typed fields that are not maps.
//!
//! | change | BACKWARD | FORWARD | FULL |
//! | --- | --- | --- | --- |
//! | field added (its path not required) | ok | ok | ok |
//! | field removed (its path not required in the old rules); its number should then be `reserved` | ok | ok | ok |
//! | required field removed: a path of the old rules that no longer resolves in the new message, or resolves to other field numbers | ok | breaks | breaks |
//! | requirement dropped: a path of the old rules that still resolves but is not in the new rules | ok | breaks | breaks |
//! | required field added: a path of the new rules that is not in the old rules | breaks | ok | breaks |
//! | type changed: same number, another scalar kind (strict: `int32` to `int64` too), another message or enum full name, scalar to message or enum, or another map key or value type | breaks | breaks | breaks |
//! | number reused: a type change where the field name changed too | breaks | breaks | breaks |
//! | cardinality changed: singular, repeated and map are all different | breaks | breaks | breaks |
//! | enum value removed: a number of the old enum is absent from the new one | breaks | ok | breaks |
//! | enum value added | ok | ok | ok |
//! | field or enum value renamed, same number and type | ok | ok | ok |
//! | field moved into or out of a `oneof` | ok | ok | ok |
//!
//! Each incompatibility is one line naming the message (or enum) full name,
//! the field (or value) number and name, and the old and new types:
//!
//! - `acme.v1.Subtask field 3 "count": type changed from int32 to string`
//! - `acme.v1.Subtask number 3 reused: was "count" int32, now "label" string`
//! - `acme.v1.Subtask field 1 "title": cardinality changed from string to repeated string`
//! - `acme.v1.Status value 2 "STATUS_DONE" removed`
//! - `acme.v1.Subtask required field "ask.text" removed`
//! - `acme.v1.Subtask required field "title" added`
//!
//! Message and enum types are named by full name, scalars by their `.proto`
//! keyword, with `repeated T` and `map<K, V>` for the other cardinalities.
//! The lines are sorted and deduplicated.

use std::collections::{BTreeSet, HashSet};

use super::kind_name;
use handoff_proto::pb::{Compatibility, ContractRules};
use prost_reflect::{EnumDescriptor, FieldDescriptor, Kind, MessageDescriptor};

/// Every way `new` breaks `mode` relative to `old`; empty when compatible.
///
/// See the [module documentation](self) for what each mode checks.
pub fn check(
    mode: Compatibility,
    old: &MessageDescriptor,
    old_rules: &ContractRules,
    new: &MessageDescriptor,
    new_rules: &ContractRules,
) -> Vec<String> {
    let (backward, forward) = match mode {
        Compatibility::None => return Vec::new(),
        Compatibility::Unspecified | Compatibility::Backward => (true, false),
        Compatibility::Forward => (false, true),
        Compatibility::Full => (true, true),
    };
    let mut walk = Walk {
        backward,
        messages: HashSet::new(),
        enums: HashSet::new(),
        found: BTreeSet::new(),
    };
    walk.message(old, new);
    let root = label(old.full_name(), new.full_name());
    if forward {
        for path in &old_rules.required_fields {
            let before = resolve(old, path);
            let after = resolve(new, path);
            if after.is_none() || (before.is_some() && before != after) {
                walk.found
                    .insert(format!("{root} required field \"{path}\" removed"));
            } else if !new_rules.required_fields.contains(path) {
                // Still there, but new senders may now leave it out.
                walk.found.insert(format!(
                    "{root} required field \"{path}\" no longer required"
                ));
            }
        }
    }
    if backward {
        let before: HashSet<&str> = old_rules
            .required_fields
            .iter()
            .map(String::as_str)
            .collect();
        for path in &new_rules.required_fields {
            if !before.contains(path.as_str()) {
                walk.found
                    .insert(format!("{root} required field \"{path}\" added"));
            }
        }
    }
    walk.found.into_iter().collect()
}

/// The state of one comparison: what was visited and what was found.
struct Walk {
    /// Whether BACKWARD is checked (enum values removed).
    backward: bool,
    /// Pairs of message full names (old, new) already compared.
    messages: HashSet<(String, String)>,
    /// Pairs of enum full names (old, new) already compared.
    enums: HashSet<(String, String)>,
    /// The incompatibilities, sorted and deduplicated.
    found: BTreeSet<String>,
}

impl Walk {
    /// Compares the fields of two versions of a message, by number.
    fn message(&mut self, old: &MessageDescriptor, new: &MessageDescriptor) {
        let key = (old.full_name().to_owned(), new.full_name().to_owned());
        if !self.messages.insert(key) {
            return;
        }
        let owner = label(old.full_name(), new.full_name());
        for old_field in old.fields() {
            // A field only in `old` was removed, one only in `new` was added:
            // both are compatible (required paths are checked separately).
            if let Some(new_field) = new.get_field(old_field.number()) {
                self.field(&owner, &old_field, &new_field);
            }
        }
    }

    /// Compares two versions of a field with the same number.
    fn field(&mut self, owner: &str, old: &FieldDescriptor, new: &FieldDescriptor) {
        let before = Shape::of(old);
        let after = Shape::of(new);
        let change = if before.cardinality() != after.cardinality() {
            "cardinality changed"
        } else if !before.same_types(&after) {
            "type changed"
        } else {
            // Same shape and types (perhaps renamed): compare what they hold.
            for (o, n) in before.kinds().into_iter().zip(after.kinds()) {
                self.kind(o, n);
            }
            return;
        };
        // Either change breaks both directions, and every mode but NONE
        // checks at least one of them.
        let number = old.number();
        let line = if old.name() == new.name() {
            format!(
                "{owner} field {number} \"{}\": {change} from {before} to {after}",
                old.name()
            )
        } else {
            format!(
                "{owner} number {number} reused: was \"{}\" {before}, now \"{}\" {after}",
                old.name(),
                new.name()
            )
        };
        self.found.insert(line);
    }

    /// Recurses into the message or enum types of a field whose types match.
    fn kind(&mut self, old: &Kind, new: &Kind) {
        match (old, new) {
            (Kind::Message(o), Kind::Message(n)) => self.message(o, n),
            (Kind::Enum(o), Kind::Enum(n)) => self.enumeration(o, n),
            _ => {}
        }
    }

    /// Compares two versions of an enum, by value number.
    fn enumeration(&mut self, old: &EnumDescriptor, new: &EnumDescriptor) {
        // Only a removed value matters, and only for BACKWARD.
        if !self.backward {
            return;
        }
        let key = (old.full_name().to_owned(), new.full_name().to_owned());
        if !self.enums.insert(key) {
            return;
        }
        let owner = label(old.full_name(), new.full_name());
        for value in old.values() {
            if new.get_value(value.number()).is_none() {
                self.found.insert(format!(
                    "{owner} value {} \"{}\" removed",
                    value.number(),
                    value.name()
                ));
            }
        }
    }
}

/// The cardinality and element types of a field.
enum Shape {
    Singular(Kind),
    Repeated(Kind),
    Map(Kind, Kind),
}

impl Shape {
    fn of(field: &FieldDescriptor) -> Self {
        match field.kind() {
            Kind::Message(entry) if field.is_map() => {
                match (entry.get_field(1), entry.get_field(2)) {
                    (Some(key), Some(value)) => Shape::Map(key.kind(), value.kind()),
                    _ => Shape::Repeated(Kind::Message(entry)),
                }
            }
            kind if field.is_list() => Shape::Repeated(kind),
            kind => Shape::Singular(kind),
        }
    }

    fn cardinality(&self) -> &'static str {
        match self {
            Shape::Singular(_) => "singular",
            Shape::Repeated(_) => "repeated",
            Shape::Map(..) => "map",
        }
    }

    /// The element types: one, or the key and the value of a map.
    fn kinds(&self) -> Vec<&Kind> {
        match self {
            Shape::Singular(kind) | Shape::Repeated(kind) => vec![kind],
            Shape::Map(key, value) => vec![key, value],
        }
    }

    /// Whether both shapes hold the same types (cardinality aside).
    fn same_types(&self, other: &Shape) -> bool {
        let (mine, theirs) = (self.kinds(), other.kinds());
        mine.len() == theirs.len() && mine.into_iter().zip(theirs).all(|(a, b)| same_kind(a, b))
    }
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Shape::Singular(kind) => f.write_str(&kind_name(kind)),
            Shape::Repeated(kind) => write!(f, "repeated {}", kind_name(kind)),
            Shape::Map(key, value) => write!(f, "map<{}, {}>", kind_name(key), kind_name(value)),
        }
    }
}

/// Whether two types are the same: the same scalar kind, or message or
/// enum types of the same full name (from different pools).
fn same_kind(a: &Kind, b: &Kind) -> bool {
    match (a, b) {
        (Kind::Message(x), Kind::Message(y)) => x.full_name() == y.full_name(),
        (Kind::Enum(x), Kind::Enum(y)) => x.full_name() == y.full_name(),
        (Kind::Message(_) | Kind::Enum(_), _) | (_, Kind::Message(_) | Kind::Enum(_)) => false,
        _ => a == b,
    }
}

/// How a type is named in a line: its full name, or both when it changed.
fn label(old: &str, new: &str) -> String {
    if old == new {
        old.to_owned()
    } else {
        format!("{old} (now {new})")
    }
}

/// The field numbers along a dot-separated path of field names from `root`,
/// or `None` when a name is missing or an intermediate field is not a
/// message (or is a map).
fn resolve(root: &MessageDescriptor, path: &str) -> Option<Vec<u32>> {
    let mut message = root.clone();
    let mut numbers = Vec::new();
    let mut names = path.split('.').peekable();
    while let Some(name) = names.next() {
        let field = message.get_field_by_name(name)?;
        numbers.push(field.number());
        if names.peek().is_some() {
            match field.kind() {
                Kind::Message(next) if !field.is_map() => message = next,
                _ => return None,
            }
        }
    }
    Some(numbers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::contracts::testing::pool;
    use prost_reflect::DescriptorPool;

    const ROOT: &str = "acme.v1.Subtask";

    const BASE: &str = r#"
syntax = "proto3";
package acme.v1;

enum Status {
  STATUS_UNSPECIFIED = 0;
  STATUS_OPEN = 1;
  STATUS_DONE = 2;
}

message Ask {
  string text = 1;
  repeated string tags = 2;
}

message Node {
  Subtask owner = 1;
  repeated Node children = 2;
}

message Subtask {
  string title = 1;
  int32 count = 3;
  Status status = 4;
  Ask ask = 5;
  map<string, int32> labels = 6;
  Subtask child = 7;
  oneof target {
    string agent = 8;
  }
  string note = 9;
  Node node = 10;
  map<string, Ask> asks = 11;
}
"#;

    /// `BASE` with each `(from, to)` replaced; fails if `from` is absent.
    fn edit(edits: &[(&str, &str)]) -> String {
        let mut source = BASE.to_owned();
        for (from, to) in edits {
            assert!(source.contains(from), "BASE lacks {from:?}");
            source = source.replacen(from, to, 1);
        }
        source
    }

    fn rules(paths: &[&str]) -> ContractRules {
        ContractRules {
            required_fields: paths.iter().map(|p| (*p).to_owned()).collect(),
            ..Default::default()
        }
    }

    /// Checks `ROOT` from `old` to `new` under every mode and asserts the
    /// exact lines expected for BACKWARD, FORWARD and FULL (NONE: always
    /// none; unspecified: as BACKWARD).
    #[allow(clippy::too_many_arguments)]
    fn assert_modes(
        old: &str,
        old_required: &[&str],
        new: &str,
        new_required: &[&str],
        backward: &[&str],
        forward: &[&str],
        full: &[&str],
    ) {
        let (old_pool, new_pool) = (pool(old), pool(new));
        let old_message = old_pool.get_message_by_name(ROOT).expect("old root");
        let new_message = new_pool.get_message_by_name(ROOT).expect("new root");
        let (old_rules, new_rules) = (rules(old_required), rules(new_required));
        let run = |mode| check(mode, &old_message, &old_rules, &new_message, &new_rules);
        let owned = |lines: &[&str]| lines.iter().map(|l| (*l).to_owned()).collect::<Vec<_>>();
        assert_eq!(run(Compatibility::None), Vec::<String>::new(), "NONE");
        assert_eq!(run(Compatibility::Backward), owned(backward), "BACKWARD");
        assert_eq!(
            run(Compatibility::Unspecified),
            owned(backward),
            "UNSPECIFIED"
        );
        assert_eq!(run(Compatibility::Forward), owned(forward), "FORWARD");
        assert_eq!(run(Compatibility::Full), owned(full), "FULL");
    }

    /// A change compatible in every mode.
    fn assert_compatible(new: &str) {
        assert_modes(BASE, &[], new, &[], &[], &[], &[]);
    }

    /// A change that breaks every mode but NONE with exactly `lines`.
    fn assert_breaks_all(new: &str, lines: &[&str]) {
        assert_modes(BASE, &[], new, &[], lines, lines, lines);
    }

    /// Like [`assert_breaks_all`], from another old version than `BASE`.
    fn assert_breaks_all_from(old: &str, new: &str, lines: &[&str]) {
        assert_modes(old, &[], new, &[], lines, lines, lines);
    }

    #[test]
    fn identical_versions_are_compatible() {
        assert_compatible(BASE);
    }

    #[test]
    fn field_added_is_compatible() {
        assert_compatible(&edit(&[(
            "string note = 9;",
            "string note = 9;\n  repeated string extra = 12;",
        )]));
    }

    #[test]
    fn field_removed_is_compatible() {
        assert_compatible(&edit(&[("string note = 9;", "reserved 9;")]));
        // Removed in a nested message too.
        assert_compatible(&edit(&[("repeated string tags = 2;", "")]));
    }

    #[test]
    fn required_field_removed_breaks_forward() {
        let new = edit(&[("string text = 1;", "reserved 1;")]);
        let line = "acme.v1.Subtask required field \"ask.text\" removed";
        assert_modes(BASE, &["ask.text"], &new, &[], &[], &[line], &[line]);
        // Still listed as required in the new rules: the same.
        assert_modes(
            BASE,
            &["ask.text"],
            &new,
            &["ask.text"],
            &[],
            &[line],
            &[line],
        );
    }

    #[test]
    fn required_path_no_longer_resolvable_breaks_forward() {
        // The intermediate field renamed: "ask.text" no longer resolves.
        let new = edit(&[("Ask ask = 5;", "Ask question = 5;")]);
        let removed = "acme.v1.Subtask required field \"ask.text\" removed";
        let added = "acme.v1.Subtask required field \"question.text\" added";
        assert_modes(
            BASE,
            &["ask.text"],
            &new,
            &["question.text"],
            &[added],
            &[removed],
            &[removed, added],
        );
        // The name now designates another field number.
        let new = edit(&[("string text = 1;", "string body = 1;\n  string text = 3;")]);
        assert_modes(
            BASE,
            &["ask.text"],
            &new,
            &["ask.text"],
            &[],
            &[removed],
            &[removed],
        );
    }

    #[test]
    fn dropping_a_requirement_breaks_forward() {
        let line = "acme.v1.Subtask required field \"title\" no longer required";
        assert_modes(BASE, &["title"], BASE, &[], &[], &[line], &[line]);
    }

    #[test]
    fn required_field_kept_is_compatible() {
        let new = edit(&[("string note = 9;", "")]);
        assert_modes(
            BASE,
            &["ask.text", "title"],
            &new,
            &["ask.text", "title"],
            &[],
            &[],
            &[],
        );
    }

    #[test]
    fn required_field_added_breaks_backward() {
        let line = "acme.v1.Subtask required field \"title\" added";
        assert_modes(BASE, &[], BASE, &["title"], &[line], &[], &[line]);
        // A new field, required from the start.
        let new = edit(&[("string note = 9;", "string note = 9;\n  string owner = 12;")]);
        let line = "acme.v1.Subtask required field \"owner\" added";
        assert_modes(
            BASE,
            &["title"],
            &new,
            &["title", "owner"],
            &[line],
            &[],
            &[line],
        );
    }

    #[test]
    fn scalar_type_changed_breaks_all() {
        assert_breaks_all(
            &edit(&[("int32 count = 3;", "string count = 3;")]),
            &["acme.v1.Subtask field 3 \"count\": type changed from int32 to string"],
        );
        // Strict: even a wire-compatible widening is reported.
        assert_breaks_all(
            &edit(&[("int32 count = 3;", "int64 count = 3;")]),
            &["acme.v1.Subtask field 3 \"count\": type changed from int32 to int64"],
        );
    }

    #[test]
    fn message_and_enum_type_changed_breaks_all() {
        assert_breaks_all(
            &edit(&[("Ask ask = 5;", "Node ask = 5;")]),
            &["acme.v1.Subtask field 5 \"ask\": type changed from acme.v1.Ask to acme.v1.Node"],
        );
        assert_breaks_all(
            &edit(&[("Ask ask = 5;", "string ask = 5;")]),
            &["acme.v1.Subtask field 5 \"ask\": type changed from acme.v1.Ask to string"],
        );
        assert_breaks_all(
            &edit(&[("Status status = 4;", "int32 status = 4;")]),
            &["acme.v1.Subtask field 4 \"status\": type changed from acme.v1.Status to int32"],
        );
        assert_breaks_all(
            &edit(&[("map<string, int32> labels = 6;", "map<string, int64> labels = 6;")]),
            &["acme.v1.Subtask field 6 \"labels\": type changed from map<string, int32> to map<string, int64>"],
        );
    }

    #[test]
    fn number_reused_breaks_all() {
        assert_breaks_all(
            &edit(&[("int32 count = 3;", "string label = 3;")]),
            &["acme.v1.Subtask number 3 reused: was \"count\" int32, now \"label\" string"],
        );
        assert_breaks_all(
            &edit(&[("string title = 1;", "repeated string titles = 1;")]),
            &["acme.v1.Subtask number 1 reused: was \"title\" string, now \"titles\" repeated string"],
        );
    }

    #[test]
    fn cardinality_changed_breaks_all() {
        assert_breaks_all(
            &edit(&[("string title = 1;", "repeated string title = 1;")]),
            &["acme.v1.Subtask field 1 \"title\": cardinality changed from string to repeated string"],
        );
        assert_breaks_all(
            &edit(&[("repeated string tags = 2;", "string tags = 2;")]),
            &["acme.v1.Ask field 2 \"tags\": cardinality changed from repeated string to string"],
        );
        assert_breaks_all(
            &edit(&[(
                "map<string, int32> labels = 6;",
                "repeated string labels = 6;",
            )]),
            &["acme.v1.Subtask field 6 \"labels\": cardinality changed from map<string, int32> to repeated string"],
        );
    }

    #[test]
    fn enum_value_removed_breaks_backward() {
        let new = edit(&[("STATUS_DONE = 2;", "reserved 2;")]);
        let line = "acme.v1.Status value 2 \"STATUS_DONE\" removed";
        assert_modes(BASE, &[], &new, &[], &[line], &[], &[line]);
    }

    #[test]
    fn enum_value_added_or_renamed_is_compatible() {
        assert_compatible(&edit(&[(
            "STATUS_DONE = 2;",
            "STATUS_DONE = 2;\n  STATUS_LATE = 3;",
        )]));
        assert_compatible(&edit(&[("STATUS_DONE = 2;", "STATUS_FINISHED = 2;")]));
    }

    #[test]
    fn field_renamed_is_compatible() {
        assert_compatible(&edit(&[
            ("string title = 1;", "string heading = 1;"),
            ("string text = 1;", "string body = 1;"),
        ]));
    }

    #[test]
    fn oneof_moves_are_compatible() {
        assert_compatible(&edit(&[
            (
                "oneof target {\n    string agent = 8;\n  }",
                "string agent = 8;",
            ),
            (
                "string note = 9;",
                "oneof about {\n    string note = 9;\n  }",
            ),
        ]));
    }

    #[test]
    fn nested_change_found_through_recursion() {
        assert_breaks_all(
            &edit(&[("repeated string tags = 2;", "repeated int32 tags = 2;")]),
            &["acme.v1.Ask field 2 \"tags\": type changed from repeated string to repeated int32"],
        );
        // Ask reached through a map value only.
        let source = edit(&[("Ask ask = 5;", "")]);
        let changed = source.replacen("string text = 1;", "bytes text = 1;", 1);
        assert_breaks_all_from(
            &source,
            &changed,
            &["acme.v1.Ask field 1 \"text\": type changed from string to bytes"],
        );
        // Status reached only through Node, itself recursive.
        let source = edit(&[
            ("Status status = 4;", "int32 status = 4;"),
            (
                "Subtask owner = 1;",
                "Subtask owner = 1;\n  Status state = 3;",
            ),
        ]);
        let removed = source.replacen("STATUS_DONE = 2;", "", 1);
        let line = "acme.v1.Status value 2 \"STATUS_DONE\" removed";
        assert_modes(&source, &[], &removed, &[], &[line], &[], &[line]);
    }

    #[test]
    fn recursive_types_terminate_and_report_once() {
        // Subtask -> Subtask, Subtask -> Node -> Subtask, Node -> Node.
        let line = "acme.v1.Subtask field 3 \"count\": type changed from int32 to uint32";
        assert_breaks_all(&edit(&[("int32 count = 3;", "uint32 count = 3;")]), &[line]);
        let line = "acme.v1.Node field 2 \"children\": cardinality changed from repeated acme.v1.Node to acme.v1.Node";
        assert_breaks_all(
            &edit(&[("repeated Node children = 2;", "Node children = 2;")]),
            &[line],
        );
    }

    #[test]
    fn lines_are_sorted_and_deduplicated() {
        let new = edit(&[
            ("int32 count = 3;", "string count = 3;"),
            ("STATUS_DONE = 2;", ""),
            ("string text = 1;", "bytes text = 1;"),
        ]);
        let ask = "acme.v1.Ask field 1 \"text\": type changed from string to bytes";
        let status = "acme.v1.Status value 2 \"STATUS_DONE\" removed";
        let count = "acme.v1.Subtask field 3 \"count\": type changed from int32 to string";
        let title = "acme.v1.Subtask required field \"title\" added";
        assert_modes(
            BASE,
            &[],
            &new,
            &["title", "title"],
            &[ask, status, count, title],
            &[ask, count],
            &[ask, status, count, title],
        );
    }

    #[test]
    fn demo_contracts_are_compatible_with_themselves() {
        let pool = DescriptorPool::decode(handoff_proto::DEMO_FILE_DESCRIPTOR_SET)
            .expect("demo descriptor set");
        let mut checked = 0;
        for message in pool.all_messages() {
            for mode in [
                Compatibility::Backward,
                Compatibility::Forward,
                Compatibility::Full,
            ] {
                let rules = ContractRules::default();
                assert_eq!(
                    check(mode, &message, &rules, &message, &rules),
                    Vec::<String>::new(),
                    "{}",
                    message.full_name()
                );
            }
            checked += 1;
        }
        assert!(checked > 0);
    }
}
