//! The run state's rules: key names, limits, and how a delta makes the
//! next revision (merge policies, pinned keys, conflicts against a base
//! revision). Pure: the use case in [`crate::app::state`] reads the latest
//! revision, calls [`apply`], and writes the result with compare-and-set.

use std::collections::BTreeSet;

use handoff_proto::pb;
use prost::Message as _;
use prost_types::{value::Kind, ListValue, Struct, Value};

use crate::error::{BrokerError, Reason};

/// The longest state key.
pub const MAX_KEY_LEN: usize = 256;

/// How many recent deltas a revision remembers, so a retried handoff is
/// recognised instead of applied twice: a retry is recognised while fewer
/// than this many other deltas landed in its run since its first attempt
/// (a handoff that consumes a delivery is recognised for ever, by the
/// delivery's claim, before its delta is looked at).
pub const RECENT: usize = 64;

/// Size limits of a run's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The largest encoded value of one key.
    pub value_bytes: usize,
    /// The largest state document (keys and encoded values).
    pub document_bytes: usize,
}

/// Checks a state key: `[A-Za-z0-9_.-]{1,256}`.
pub fn validate_key(field: &str, key: &str) -> Result<(), BrokerError> {
    let problem = if key.is_empty() {
        Some("is empty".to_string())
    } else if key.len() > MAX_KEY_LEN {
        Some(format!("is {} bytes; at most {MAX_KEY_LEN}", key.len()))
    } else {
        key.chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
            .map(|c| format!("holds {c:?}; keys are [A-Za-z0-9_.-]"))
    };
    match problem {
        None => Ok(()),
        Some(p) => Err(BrokerError::malformed(
            field.to_string(),
            format!("{field}: state key {:?} {p}", shorten(key)),
        )),
    }
}

fn shorten(s: &str) -> String {
    s.chars().take(64).collect()
}

/// Checks a delta's shape: valid keys, each key in one operation only.
pub fn validate_delta(delta: &pb::StateDelta) -> Result<(), BrokerError> {
    let mut seen = BTreeSet::new();
    let keys = delta
        .set
        .keys()
        .map(|k| ("state_delta.set", k))
        .chain(delta.append.keys().map(|k| ("state_delta.append", k)))
        .chain(delta.merge.keys().map(|k| ("state_delta.merge", k)))
        .chain(delta.unset.iter().map(|k| ("state_delta.unset", k)));
    for (field, key) in keys {
        validate_key(field, key)?;
        if !seen.insert(key.as_str()) {
            return Err(BrokerError::malformed(
                field,
                format!("state key {key:?} appears in more than one operation of the delta"),
            ));
        }
    }
    for (key, value) in &delta.set {
        if value.kind.is_none() {
            return Err(BrokerError::malformed(
                format!("state_delta.set[{key}]"),
                format!("state key {key:?}: a value must be set (use unset to remove a key)"),
            ));
        }
    }
    Ok(())
}

/// Whether the delta changes nothing.
pub fn is_empty(delta: &pb::StateDelta) -> bool {
    delta.set.is_empty()
        && delta.append.is_empty()
        && delta.merge.is_empty()
        && delta.unset.is_empty()
}

fn policy_of(record: &pb::StateRecord, key: &str) -> pb::MergePolicy {
    record
        .policies
        .get(key)
        .and_then(|p| pb::MergePolicy::try_from(*p).ok())
        .unwrap_or(pb::MergePolicy::Replace)
}

fn type_name(value: Option<&Value>) -> &'static str {
    match value.and_then(|v| v.kind.as_ref()) {
        None => "nothing",
        Some(Kind::NullValue(_)) => "null",
        Some(Kind::NumberValue(_)) => "a number",
        Some(Kind::StringValue(_)) => "a string",
        Some(Kind::BoolValue(_)) => "a bool",
        Some(Kind::StructValue(_)) => "a struct",
        Some(Kind::ListValue(_)) => "a list",
    }
}

fn mismatch(key: &str, wants: &str, held: Option<&Value>) -> BrokerError {
    BrokerError::Refused {
        reason: Reason::StateTypeMismatch,
        message: format!(
            "state key {key:?}: {wants}, but it holds {}",
            type_name(held)
        ),
        metadata: vec![
            ("key", key.to_string()),
            ("holds", type_name(held).to_string()),
        ],
    }
}

/// The state a run starts with (revision 1).
pub fn seed(
    run_id: &str,
    seed: &pb::StateSeed,
    limits: Limits,
    at: prost_types::Timestamp,
) -> Result<pb::StateRecord, BrokerError> {
    for key in seed.values.keys() {
        validate_key("state.values", key)?;
    }
    for key in &seed.pinned_keys {
        validate_key("state.pinned_keys", key)?;
    }
    for (key, policy) in &seed.policies {
        validate_key("state.policies", key)?;
        if pb::MergePolicy::try_from(*policy).is_err() {
            return Err(BrokerError::malformed(
                format!("state.policies[{key}]"),
                format!("state key {key:?}: unknown merge policy {policy}"),
            ));
        }
    }
    let mut record = pb::StateRecord {
        run_id: run_id.to_string(),
        revision: 1,
        pinned_keys: seed
            .pinned_keys
            .iter()
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect(),
        policies: seed.policies.clone(),
        at: Some(at),
        ..Default::default()
    };
    let mut added = Vec::new();
    for (key, value) in &seed.values {
        let ok = match (policy_of(&record, key), &value.kind) {
            (pb::MergePolicy::Append, Some(Kind::ListValue(_))) => true,
            (pb::MergePolicy::Append, _) => false,
            (pb::MergePolicy::Merge, Some(Kind::StructValue(_))) => true,
            (pb::MergePolicy::Merge, _) => false,
            _ => value.kind.is_some(),
        };
        if !ok {
            return Err(BrokerError::malformed(
                format!("state.values[{key}]"),
                format!(
                    "state key {key:?} holds {} where its policy wants {}",
                    type_name(Some(value)),
                    match policy_of(&record, key) {
                        pb::MergePolicy::Append => "a list",
                        pb::MergePolicy::Merge => "a struct",
                        _ => "a value",
                    }
                ),
            ));
        }
        record.entries.insert(
            key.clone(),
            pb::StateEntry {
                value: Some(value.clone()),
                changed_at: 1,
            },
        );
        added.push(key.clone());
    }
    added.sort();
    check_sizes(&record, added.iter().map(String::as_str), limits)?;
    record.change = Some(pb::StateChange {
        revision: 1,
        added,
        ..Default::default()
    });
    Ok(record)
}

/// The revision a handoff's delta made, if it is among the revisions
/// `record` remembers.
pub fn applied(record: &pb::StateRecord, handoff_id: &str) -> Option<u64> {
    record
        .recent
        .iter()
        .find(|a| a.handoff_id == handoff_id)
        .map(|a| a.revision)
}

/// How often a revision is stored whole: the first, and every one whose
/// number is a multiple of this; the others store only what they wrote.
/// A revision no cache holds is rebuilt from at most this many records.
pub const SNAPSHOT_EVERY: u64 = 16;

/// Whether `revision` is stored whole.
pub fn is_snapshot(revision: u64) -> bool {
    revision <= 1 || revision.is_multiple_of(SNAPSHOT_EVERY)
}

/// The revision stored whole that `revision` is rebuilt from.
pub fn snapshot_of(revision: u64) -> u64 {
    if revision < SNAPSHOT_EVERY {
        1
    } else {
        revision - revision % SNAPSHOT_EVERY
    }
}

/// How `record` (whole, as [`apply`] made it) is stored: whole at a
/// snapshot, otherwise as a delta that keeps only the entries it wrote
/// (what it remembers, the pinned keys and the policies come from the
/// revisions before it).
pub fn stored_form(record: &pb::StateRecord) -> pb::StateRecord {
    if is_snapshot(record.revision) {
        return record.clone();
    }
    pb::StateRecord {
        run_id: record.run_id.clone(),
        revision: record.revision,
        entries: record
            .entries
            .iter()
            .filter(|(_, e)| e.changed_at == record.revision)
            .map(|(k, e)| (k.clone(), e.clone()))
            .collect(),
        pinned_keys: Vec::new(),
        policies: Default::default(),
        handoff_id: record.handoff_id.clone(),
        source_agent: record.source_agent.clone(),
        at: record.at,
        delta: record.delta.clone(),
        change: record.change.clone(),
        recent: Vec::new(),
        partial: true,
    }
}

/// The whole revision that `stored` (as stored) makes over `previous`, the
/// whole revision before it; a revision stored whole is itself.
pub fn rebuild(previous: &pb::StateRecord, stored: pb::StateRecord) -> pb::StateRecord {
    if !stored.partial {
        return stored;
    }
    let mut entries = previous.entries.clone();
    entries.extend(stored.entries);
    let recent = std::iter::once(pb::AppliedDelta {
        handoff_id: stored.handoff_id.clone(),
        revision: stored.revision,
    })
    .chain(previous.recent.iter().cloned())
    .take(RECENT)
    .collect();
    pb::StateRecord {
        entries,
        pinned_keys: previous.pinned_keys.clone(),
        policies: previous.policies.clone(),
        recent,
        partial: false,
        ..stored
    }
}

/// The next revision: `delta` applied to `head` (`None`: the run has no
/// state yet). Refused, with nothing changed, when the delta touches a
/// pinned key, conflicts with a change after its base revision, writes a
/// value of the wrong type, or breaks a size limit.
pub fn apply(
    run_id: &str,
    head: Option<&pb::StateRecord>,
    delta: &pb::StateDelta,
    handoff_id: &str,
    source_agent: &str,
    limits: Limits,
    at: prost_types::Timestamp,
) -> Result<pb::StateRecord, BrokerError> {
    let empty = pb::StateRecord {
        run_id: run_id.to_string(),
        ..Default::default()
    };
    let head = head.unwrap_or(&empty);
    let revision = head.revision + 1;

    // Pinned keys never change.
    let touched = delta
        .set
        .keys()
        .chain(delta.append.keys())
        .chain(delta.merge.keys())
        .chain(delta.unset.iter());
    let pinned: Vec<&String> = touched
        .filter(|k| head.pinned_keys.contains(k))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    if let Some(first) = pinned.first() {
        return Err(BrokerError::Refused {
            reason: Reason::PinnedKey,
            message: format!(
                "state key {first:?} is pinned: no delta may change or remove it (pinned keys: {})",
                pinned
                    .iter()
                    .map(|k| format!("{k:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            metadata: vec![(
                "keys",
                pinned
                    .iter()
                    .map(|k| k.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
            )],
        });
    }

    // Conflicts: a replaced or removed key changed after the base.
    if let Some(base) = delta.base_revision {
        if base > head.revision {
            return Err(BrokerError::malformed(
                "state_delta.base_revision",
                format!(
                    "base_revision {base} is ahead of the run state's revision {}",
                    head.revision
                ),
            ));
        }
        let replaced = delta
            .set
            .keys()
            .filter(|k| policy_of(head, k) == pb::MergePolicy::Replace)
            .chain(delta.unset.iter());
        let conflicts: BTreeSet<&String> = replaced
            .filter(|k| head.entries.get(*k).is_some_and(|e| e.changed_at > base))
            .collect();
        if !conflicts.is_empty() {
            let keys: Vec<&str> = conflicts.iter().map(|k| k.as_str()).collect();
            return Err(BrokerError::Refused {
                reason: Reason::StateConflict,
                message: format!(
                    "state keys {} changed after base_revision {base} (the state is at revision {}): read the state again and retry",
                    keys.iter().map(|k| format!("{k:?}")).collect::<Vec<_>>().join(", "),
                    head.revision
                ),
                metadata: vec![
                    ("keys", keys.join(",")),
                    ("base_revision", base.to_string()),
                    ("revision", head.revision.to_string()),
                ],
            });
        }
    }

    let mut next = pb::StateRecord {
        run_id: run_id.to_string(),
        revision,
        entries: head.entries.clone(),
        pinned_keys: head.pinned_keys.clone(),
        policies: head.policies.clone(),
        handoff_id: handoff_id.to_string(),
        source_agent: source_agent.to_string(),
        at: Some(at),
        delta: Some(delta.clone()),
        change: None,
        recent: Vec::new(),
        partial: false,
    };
    let mut written: Vec<(&String, Value)> = Vec::new();
    for (key, value) in &delta.set {
        let held = held(head, key);
        let new = match policy_of(head, key) {
            pb::MergePolicy::Append => {
                let items = match &value.kind {
                    Some(Kind::ListValue(l)) => l.values.clone(),
                    _ => vec![value.clone()],
                };
                appended(key, held, items)?
            }
            pb::MergePolicy::Merge => match &value.kind {
                Some(Kind::StructValue(s)) => merged(key, held, s)?,
                _ => {
                    return Err(mismatch(
                        key,
                        "its merge policy takes a struct",
                        Some(value),
                    ))
                }
            },
            _ => value.clone(),
        };
        written.push((key, new));
    }
    for (key, list) in &delta.append {
        written.push((key, appended(key, held(head, key), list.values.clone())?));
    }
    for (key, fields) in &delta.merge {
        written.push((key, merged(key, held(head, key), fields)?));
    }
    let mut change = pb::StateChange {
        revision,
        ..Default::default()
    };
    for (key, value) in written {
        match held(head, key) {
            None => change.added.push(key.clone()),
            Some(old) if *old == value => continue,
            Some(_) => change.changed.push(key.clone()),
        }
        next.entries.insert(
            key.clone(),
            pb::StateEntry {
                value: Some(value),
                changed_at: revision,
            },
        );
    }
    for key in &delta.unset {
        if held(head, key).is_some() {
            change.removed.push(key.clone());
            // A tombstone: the key is gone, and when it went is kept for
            // conflict checks.
            next.entries.insert(
                key.clone(),
                pb::StateEntry {
                    value: None,
                    changed_at: revision,
                },
            );
        }
    }
    change.added.sort();
    change.changed.sort();
    change.removed.sort();
    check_sizes(
        &next,
        change
            .added
            .iter()
            .chain(change.changed.iter())
            .map(String::as_str),
        limits,
    )?;
    next.change = Some(change);
    next.recent = std::iter::once(pb::AppliedDelta {
        handoff_id: handoff_id.to_string(),
        revision,
    })
    .chain(head.recent.iter().cloned())
    .take(RECENT)
    .collect();
    Ok(next)
}

/// A revision that records a handoff without a delta changes nothing:
/// none is written; this is the revision it hands over.
fn held<'a>(record: &'a pb::StateRecord, key: &str) -> Option<&'a Value> {
    record.entries.get(key).and_then(|e| e.value.as_ref())
}

fn appended(key: &str, held: Option<&Value>, items: Vec<Value>) -> Result<Value, BrokerError> {
    let mut values = match held.and_then(|v| v.kind.as_ref()) {
        None => Vec::new(),
        Some(Kind::ListValue(l)) => l.values.clone(),
        Some(_) => return Err(mismatch(key, "an append needs a list", held)),
    };
    values.extend(items);
    Ok(Value {
        kind: Some(Kind::ListValue(ListValue { values })),
    })
}

fn merged(key: &str, held: Option<&Value>, fields: &Struct) -> Result<Value, BrokerError> {
    let mut out = match held.and_then(|v| v.kind.as_ref()) {
        None => Struct::default(),
        Some(Kind::StructValue(s)) => s.clone(),
        Some(_) => return Err(mismatch(key, "a merge needs a struct", held)),
    };
    for (k, v) in &fields.fields {
        out.fields.insert(k.clone(), v.clone());
    }
    Ok(Value {
        kind: Some(Kind::StructValue(out)),
    })
}

fn check_sizes<'a>(
    record: &pb::StateRecord,
    written: impl Iterator<Item = &'a str>,
    limits: Limits,
) -> Result<(), BrokerError> {
    for key in written {
        let size = held(record, key).map_or(0, |v| v.encoded_len());
        if limits.value_bytes > 0 && size > limits.value_bytes {
            return Err(BrokerError::Refused {
                reason: Reason::StateTooLarge,
                message: format!(
                    "state key {key:?} would hold {size} bytes; a value may hold at most {} (max_state_value_bytes)",
                    limits.value_bytes
                ),
                metadata: vec![
                    ("key", key.to_string()),
                    ("size", size.to_string()),
                    ("limit", limits.value_bytes.to_string()),
                ],
            });
        }
    }
    let total = document_size(record);
    if limits.document_bytes > 0 && total > limits.document_bytes {
        return Err(BrokerError::Refused {
            reason: Reason::StateTooLarge,
            message: format!(
                "the run state would hold {total} bytes; it may hold at most {} (max_state_bytes)",
                limits.document_bytes
            ),
            metadata: vec![
                ("key", String::new()),
                ("size", total.to_string()),
                ("limit", limits.document_bytes.to_string()),
            ],
        });
    }
    Ok(())
}

/// The size of a state document: its keys and encoded values, and the keys
/// removed (kept, with when, for conflict checks).
pub fn document_size(record: &pb::StateRecord) -> usize {
    record
        .entries
        .iter()
        .map(|(k, e)| k.len() + e.value.as_ref().map_or(8, |v| v.encoded_len()))
        .sum()
}

/// The state a delivery carries: the whole record, or only the keys the
/// agent reads (`reads` empty: all).
pub fn view(record: &pb::StateRecord, reads: &[String]) -> pb::RunState {
    let values = record
        .entries
        .iter()
        .filter(|(k, _)| reads.is_empty() || reads.contains(k) || record.pinned_keys.contains(k))
        .filter_map(|(k, e)| e.value.clone().map(|v| (k.clone(), v)))
        .collect();
    pb::RunState {
        run_id: record.run_id.clone(),
        revision: record.revision,
        values,
        pinned_keys: record.pinned_keys.clone(),
        policies: record.policies.clone(),
    }
}

/// The keys of `asks_for` the state holds, with their values.
pub fn answers(
    record: Option<&pb::StateRecord>,
    asks_for: &[String],
) -> std::collections::HashMap<String, Value> {
    let Some(record) = record else {
        return Default::default();
    };
    asks_for
        .iter()
        .filter_map(|k| held(record, k).map(|v| (k.clone(), v.clone())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        value_bytes: 1024,
        document_bytes: 4096,
    };

    fn s(v: &str) -> Value {
        Value {
            kind: Some(Kind::StringValue(v.to_string())),
        }
    }

    fn at() -> prost_types::Timestamp {
        prost_types::Timestamp::default()
    }

    fn seeded() -> pb::StateRecord {
        let spec = pb::StateSeed {
            values: [
                ("order_id".to_string(), s("A-1")),
                (
                    "notes".to_string(),
                    Value {
                        kind: Some(Kind::ListValue(ListValue::default())),
                    },
                ),
            ]
            .into(),
            pinned_keys: vec!["order_id".to_string()],
            policies: [
                ("notes".to_string(), pb::MergePolicy::Append as i32),
                ("profile".to_string(), pb::MergePolicy::Merge as i32),
            ]
            .into(),
        };
        seed("r", &spec, LIMITS, at()).expect("seed")
    }

    fn set(key: &str, v: Value, base: Option<u64>) -> pb::StateDelta {
        pb::StateDelta {
            set: [(key.to_string(), v)].into(),
            base_revision: base,
            ..Default::default()
        }
    }

    #[test]
    fn revisions_stored_as_deltas_rebuild_every_revision_whole() {
        // Fifty revisions: appends, replaces and removals, each made whole
        // by `apply`, then stored the way the store keeps them.
        let mut whole = vec![seeded()];
        for i in 2..=50u64 {
            let head = whole.last().expect("a head");
            let delta = match i % 3 {
                0 => pb::StateDelta {
                    append: [(
                        "notes".to_string(),
                        ListValue {
                            values: vec![s(&format!("n{i}"))],
                        },
                    )]
                    .into(),
                    ..Default::default()
                },
                1 => set(&format!("k{}", i % 5), s(&format!("v{i}")), None),
                _ => pb::StateDelta {
                    unset: vec![format!("k{}", (i + 1) % 5)],
                    set: [("last".to_string(), s(&i.to_string()))].into(),
                    ..Default::default()
                },
            };
            let next = apply("r", Some(head), &delta, &format!("h{i}"), "a", LIMITS, at())
                .expect("applied");
            whole.push(next);
        }
        let stored: Vec<pb::StateRecord> = whole.iter().map(stored_form).collect();
        for (record, kept) in whole.iter().zip(&stored) {
            assert_eq!(kept.partial, !is_snapshot(record.revision));
            if kept.partial {
                assert!(kept.recent.is_empty() && kept.pinned_keys.is_empty());
                assert!(
                    kept.entries.len() < record.entries.len(),
                    "only what it wrote"
                );
            } else {
                assert_eq!(kept, record);
            }
        }
        assert!(is_snapshot(1) && is_snapshot(16) && is_snapshot(48) && !is_snapshot(17));
        for target in 1..=50u64 {
            let base = snapshot_of(target);
            assert!(is_snapshot(base) && base <= target && target - base < SNAPSHOT_EVERY);
            let mut current = stored[(base - 1) as usize].clone();
            for r in base + 1..=target {
                current = rebuild(&current, stored[(r - 1) as usize].clone());
            }
            assert_eq!(current, whole[(target - 1) as usize], "revision {target}");
        }
        // A record stored whole (as before deltas) is itself.
        assert_eq!(rebuild(&whole[3], whole[4].clone()), whole[4]);
    }

    #[test]
    fn keys_are_checked() {
        assert!(validate_key("k", "a.b-c_9").is_ok());
        for bad in ["", "a b", "a*", &"x".repeat(257)] {
            let e = validate_key("k", bad).expect_err(bad);
            assert_eq!(e.reason(), Reason::MalformedRequest);
        }
        let twice = pb::StateDelta {
            set: [("a".to_string(), s("1"))].into(),
            unset: vec!["a".to_string()],
            ..Default::default()
        };
        assert!(validate_delta(&twice).is_err());
    }

    #[test]
    fn pinned_keys_never_change() {
        let head = seeded();
        let e = apply(
            "r",
            Some(&head),
            &set("order_id", s("A-2"), None),
            "h",
            "a",
            LIMITS,
            at(),
        )
        .expect_err("pinned");
        assert_eq!(e.reason(), Reason::PinnedKey);
        let unset = pb::StateDelta {
            unset: vec!["order_id".to_string()],
            ..Default::default()
        };
        let e = apply("r", Some(&head), &unset, "h", "a", LIMITS, at()).expect_err("pinned");
        assert_eq!(e.reason(), Reason::PinnedKey);
    }

    #[test]
    fn stale_base_conflicts_on_the_same_key_and_merges_disjoint_keys() {
        let head = seeded();
        let r2 = apply(
            "r",
            Some(&head),
            &set("city", s("Oslo"), Some(1)),
            "h1",
            "a",
            LIMITS,
            at(),
        )
        .expect("first");
        assert_eq!(r2.revision, 2);
        let e = apply(
            "r",
            Some(&r2),
            &set("city", s("Rome"), Some(1)),
            "h2",
            "b",
            LIMITS,
            at(),
        )
        .expect_err("conflict");
        assert_eq!(e.reason(), Reason::StateConflict);
        assert!(e.metadata().contains(&("keys", "city".to_string())));
        let r3 = apply(
            "r",
            Some(&r2),
            &set("date", s("May"), Some(1)),
            "h3",
            "b",
            LIMITS,
            at(),
        )
        .expect("disjoint");
        assert_eq!(r3.revision, 3);
        assert!(held(&r3, "city").is_some() && held(&r3, "date").is_some());
        assert_eq!(applied(&r3, "h1"), Some(2));
        assert_eq!(applied(&r3, "h3"), Some(3));
    }

    #[test]
    fn append_and_merge_policies_combine_without_conflict() {
        let head = seeded();
        let r2 = apply(
            "r",
            Some(&head),
            &set("notes", s("one"), Some(1)),
            "h1",
            "a",
            LIMITS,
            at(),
        )
        .expect("append");
        let r3 = apply(
            "r",
            Some(&r2),
            &set("notes", s("two"), Some(1)),
            "h2",
            "b",
            LIMITS,
            at(),
        )
        .expect("append again from the same base");
        match held(&r3, "notes").and_then(|v| v.kind.clone()) {
            Some(Kind::ListValue(l)) => assert_eq!(l.values, vec![s("one"), s("two")]),
            other => panic!("not a list: {other:?}"),
        }
        let fields = |k: &str, v: &str| Value {
            kind: Some(Kind::StructValue(Struct {
                fields: [(k.to_string(), s(v))].into(),
            })),
        };
        let r4 = apply(
            "r",
            Some(&r3),
            &set("profile", fields("name", "Ann"), None),
            "h3",
            "a",
            LIMITS,
            at(),
        )
        .expect("merge");
        let r5 = apply(
            "r",
            Some(&r4),
            &set("profile", fields("city", "Oslo"), None),
            "h4",
            "a",
            LIMITS,
            at(),
        )
        .expect("merge");
        match held(&r5, "profile").and_then(|v| v.kind.clone()) {
            Some(Kind::StructValue(st)) => assert_eq!(st.fields.len(), 2),
            other => panic!("not a struct: {other:?}"),
        }
        let e = apply(
            "r",
            Some(&r5),
            &set("profile", s("x"), None),
            "h5",
            "a",
            LIMITS,
            at(),
        )
        .expect_err("merge needs a struct");
        assert_eq!(e.reason(), Reason::StateTypeMismatch);
    }

    #[test]
    fn limits_refuse_and_name_the_key() {
        let head = seeded();
        let big = s(&"x".repeat(2000));
        let e = apply(
            "r",
            Some(&head),
            &set("big", big, None),
            "h",
            "a",
            LIMITS,
            at(),
        )
        .expect_err("too large");
        assert_eq!(e.reason(), Reason::StateTooLarge);
        assert!(e.metadata().contains(&("key", "big".to_string())));
    }

    #[test]
    fn unset_leaves_a_tombstone_that_conflicts() {
        let head = seeded();
        let r2 = apply(
            "r",
            Some(&head),
            &set("city", s("Oslo"), None),
            "h1",
            "a",
            LIMITS,
            at(),
        )
        .expect("set");
        let gone = pb::StateDelta {
            unset: vec!["city".to_string()],
            ..Default::default()
        };
        let r3 = apply("r", Some(&r2), &gone, "h2", "a", LIMITS, at()).expect("unset");
        assert_eq!(
            r3.change.as_ref().map(|c| c.removed.clone()),
            Some(vec!["city".to_string()])
        );
        assert!(!view(&r3, &[]).values.contains_key("city"));
        let e = apply(
            "r",
            Some(&r3),
            &set("city", s("Rome"), Some(2)),
            "h3",
            "b",
            LIMITS,
            at(),
        )
        .expect_err("removed after base");
        assert_eq!(e.reason(), Reason::StateConflict);
    }

    #[test]
    fn a_view_keeps_read_keys_and_pinned_ones() {
        let head = apply(
            "r",
            Some(&seeded()),
            &set("city", s("Oslo"), None),
            "h",
            "a",
            LIMITS,
            at(),
        )
        .expect("set");
        let v = view(&head, &["city".to_string()]);
        let mut keys: Vec<_> = v.values.keys().cloned().collect();
        keys.sort();
        assert_eq!(keys, vec!["city".to_string(), "order_id".to_string()]);
    }
}
