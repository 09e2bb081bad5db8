//! The door check: one handoff payload against a contract version's message
//! type and rules.
//!
//! [`check`] runs the rules cheapest first and returns the first one that
//! fails: `max_bytes` on the raw bytes, decoding, unknown fields (schema
//! drift), required fields, `max_tokens`, `min_confidence`, then
//! `max_tool_result_age`. A single walk over the decoded message both
//! detects unknown fields and counts the tokens of every string; the paths
//! of unknown fields are only worked out when there are some.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::fmt::{self, Write as _};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use handoff_proto::pb;
use prost_reflect::{
    DynamicMessage, FieldDescriptor, Kind, MapKey, MessageDescriptor, ReflectMessage, Value,
};

use super::{kind_name, tokens::Tokenizer};
use crate::error::Reason;

/// Unknown-field paths listed in a [`Violation`]'s message at most; the
/// rest are counted.
const MAX_LISTED_PATHS: usize = 50;

const NANOS_PER_SEC: i128 = 1_000_000_000;

/// What the check measured, carried in the handoff envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measured {
    /// BPE tokens over every string value in the payload.
    pub tokens: u64,
    /// Length of the encoded payload.
    pub bytes: u64,
}

/// Why a payload was refused. `Display` gives the message a client sees.
#[derive(Debug, Clone, PartialEq)]
pub enum Violation {
    /// The payload does not decode as the message: the full error text,
    /// type name included.
    Decode(String),
    /// Paths of fields unknown to the contract (schema drift), e.g. `7`,
    /// `steps[2].9`, `meta.12`, `notes[k].5`.
    UnknownFields(Vec<String>),
    /// Every required path that is missing.
    MissingRequired(Vec<String>),
    /// The payload's strings have more tokens than `max_tokens`.
    TooManyTokens { count: u64, budget: u64 },
    /// The encoded payload is longer than `max_bytes`.
    TooManyBytes { size: u64, budget: u64 },
    /// The contract has a `min_confidence` and the handoff states none.
    ConfidenceUnstated { min: f64 },
    /// The stated confidence is under `min_confidence` (or is NaN).
    LowConfidence { confidence: f64, min: f64 },
    /// A tool result has no `observed_at` while the contract has a
    /// `max_tool_result_age`.
    ToolResultUndated { tool: String },
    /// A tool result is older than `max_tool_result_age`.
    StaleToolResult {
        tool: String,
        age: Duration,
        max: Duration,
    },
}

impl Violation {
    /// Short rule token for events and metrics.
    pub fn rule(&self) -> &'static str {
        match self {
            Violation::Decode(_) => "decode",
            Violation::UnknownFields(_) => "unknown_fields",
            Violation::MissingRequired(_) => "required_fields",
            Violation::TooManyTokens { .. } => "max_tokens",
            Violation::TooManyBytes { .. } => "max_bytes",
            Violation::ConfidenceUnstated { .. } | Violation::LowConfidence { .. } => {
                "min_confidence"
            }
            Violation::ToolResultUndated { .. } | Violation::StaleToolResult { .. } => {
                "tool_result_age"
            }
        }
    }

    /// The stable reason of the refusal: `PAYLOAD_UNDECODABLE` (bad input)
    /// for a payload that does not decode, a FAILED_PRECONDITION reason
    /// for every rule.
    pub fn reason(&self) -> Reason {
        match self {
            Violation::Decode(_) => Reason::PayloadUndecodable,
            Violation::UnknownFields(_) => Reason::SchemaDrift,
            Violation::MissingRequired(_) => Reason::MissingRequiredFields,
            Violation::TooManyTokens { .. } => Reason::OverTokenBudget,
            Violation::TooManyBytes { .. } => Reason::OverByteBudget,
            Violation::ConfidenceUnstated { .. } | Violation::LowConfidence { .. } => {
                Reason::LowConfidence
            }
            Violation::ToolResultUndated { .. } | Violation::StaleToolResult { .. } => {
                Reason::StaleToolResult
            }
        }
    }

    /// What was measured against what, as `ErrorInfo` metadata: field
    /// paths comma-separated, counts and budgets as decimal numbers, ages
    /// in milliseconds.
    pub fn metadata(&self) -> Vec<(&'static str, String)> {
        match self {
            Violation::Decode(_) => Vec::new(),
            Violation::UnknownFields(paths) | Violation::MissingRequired(paths) => {
                vec![("fields", paths.join(","))]
            }
            Violation::TooManyTokens { count, budget } => {
                vec![("count", count.to_string()), ("budget", budget.to_string())]
            }
            Violation::TooManyBytes { size, budget } => {
                vec![("count", size.to_string()), ("budget", budget.to_string())]
            }
            Violation::ConfidenceUnstated { min } => vec![("min_confidence", min.to_string())],
            Violation::LowConfidence { confidence, min } => vec![
                ("confidence", confidence.to_string()),
                ("min_confidence", min.to_string()),
            ],
            Violation::ToolResultUndated { tool } => vec![("tool", tool.clone())],
            Violation::StaleToolResult { tool, age, max } => vec![
                ("tool", tool.clone()),
                ("age_ms", age.as_millis().to_string()),
                ("max_age_ms", max.as_millis().to_string()),
            ],
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::Decode(text) => f.write_str(text),
            Violation::UnknownFields(paths) => {
                f.write_str("payload carries fields unknown to the contract (schema drift): ")?;
                write_list(f, paths)
            }
            Violation::MissingRequired(paths) => {
                f.write_str("missing required fields: ")?;
                write_list(f, paths)
            }
            Violation::TooManyTokens { count, budget } => write!(
                f,
                "payload is {count} tokens; the contract's max_tokens is {budget}"
            ),
            Violation::TooManyBytes { size, budget } => write!(
                f,
                "payload is {size} bytes; the contract's max_bytes is {budget}"
            ),
            Violation::ConfidenceUnstated { min } => write!(
                f,
                "confidence is not stated; the contract requires min_confidence {min}"
            ),
            Violation::LowConfidence { confidence, min } => write!(
                f,
                "confidence {confidence} is under the contract's min_confidence {min}"
            ),
            Violation::ToolResultUndated { tool } => write!(
                f,
                "tool result {tool:?} has no observed_at; the contract's max_tool_result_age needs it"
            ),
            Violation::StaleToolResult { tool, age, max } => write!(
                f,
                "tool result {tool:?} was observed {} ago; the contract's max_tool_result_age is {}",
                // Up for the age, so that a result just past a whole-second
                // limit never reads as exactly the limit.
                humantime::format_duration(whole_seconds(*age, true)),
                humantime::format_duration(whole_seconds(*max, false)),
            ),
        }
    }
}

impl std::error::Error for Violation {}

/// `a, b, c`, or `a, b, ... and 12 more` past [`MAX_LISTED_PATHS`].
fn write_list(f: &mut fmt::Formatter<'_>, items: &[String]) -> fmt::Result {
    for (i, item) in items.iter().take(MAX_LISTED_PATHS).enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        f.write_str(item)?;
    }
    if items.len() > MAX_LISTED_PATHS {
        write!(f, " and {} more", items.len() - MAX_LISTED_PATHS)?;
    }
    Ok(())
}

fn whole_seconds(d: Duration, up: bool) -> Duration {
    let nanos = d.subsec_nanos();
    let carry = if up { nanos > 0 } else { nanos >= 500_000_000 };
    Duration::from_secs(d.as_secs().saturating_add(u64::from(carry)))
}

/// Checks that every required path resolves in `message`, for registration.
///
/// Returns one line per bad path: an empty path or segment, a field name
/// the message does not have, a path that continues through a non-message
/// field, or one that continues through a repeated or map field (only the
/// last element of a path may be repeated or a map).
pub fn check_required_paths(
    message: &MessageDescriptor,
    paths: &[String],
) -> Result<(), Vec<String>> {
    let errors: Vec<String> = paths
        .iter()
        .filter_map(|path| required_path(message, path).err())
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// Resolves one required path on descriptors, or says why it does not.
fn required_path(message: &MessageDescriptor, path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("required field path is empty".to_owned());
    }
    let (parents, last) = match path.rsplit_once('.') {
        Some((parents, last)) => (Some(parents), last),
        None => (None, path),
    };
    let mut desc = message.clone();
    let mut end = 0;
    for segment in parents.into_iter().flat_map(|p| p.split('.')) {
        let field = field_named(&desc, path, segment)?;
        end += segment.len();
        let prefix = &path[..end];
        end += 1; // the dot
        if field.is_map() || field.is_list() {
            let what = if field.is_map() { "a map" } else { "repeated" };
            return Err(format!(
                "required field {path:?}: {prefix} is {what}; only the last field of a path may be repeated or a map"
            ));
        }
        match field.kind() {
            Kind::Message(next) => desc = next,
            other => {
                return Err(format!(
                    "required field {path:?}: {prefix} is a {}, not a message, so the path cannot continue",
                    kind_name(&other)
                ))
            }
        }
    }
    field_named(&desc, path, last).map(|_| ())
}

fn field_named(
    desc: &MessageDescriptor,
    path: &str,
    segment: &str,
) -> Result<FieldDescriptor, String> {
    if segment.is_empty() {
        return Err(format!("required field {path:?}: empty field name"));
    }
    desc.get_field_by_name(segment).ok_or_else(|| {
        format!(
            "required field {path:?}: {} has no field {segment:?}",
            desc.full_name()
        )
    })
}

/// Checks one payload (the `Any.value` bytes) against a contract version's
/// message and rules. Returns what it measured, or the first rule that
/// fails (see the module docs for the order).
pub fn check(
    message: &MessageDescriptor,
    rules: &pb::ContractRules,
    tokenizer: &Tokenizer,
    payload: &[u8],
    confidence: Option<f64>,
    tool_results: &[pb::ToolResult],
    now: SystemTime,
) -> Result<Measured, Violation> {
    let bytes = u64::try_from(payload.len()).unwrap_or(u64::MAX);
    if rules.max_bytes != 0 && bytes > rules.max_bytes {
        return Err(Violation::TooManyBytes {
            size: bytes,
            budget: rules.max_bytes,
        });
    }

    let decoded = DynamicMessage::decode(message.clone(), payload).map_err(|e| {
        Violation::Decode(format!(
            "payload does not decode as {}: {e}",
            message.full_name()
        ))
    })?;

    let mut scan = Scan {
        tokenizer,
        tokens: 0,
        unknown: false,
    };
    scan.message(&decoded);
    if scan.unknown {
        let mut paths = Vec::new();
        unknown_paths(&decoded, &mut String::new(), &mut paths);
        return Err(Violation::UnknownFields(paths));
    }

    let missing: Vec<String> = rules
        .required_fields
        .iter()
        .filter(|path| !is_present(&decoded, path))
        .cloned()
        .collect();
    if !missing.is_empty() {
        return Err(Violation::MissingRequired(missing));
    }

    if rules.max_tokens != 0 && scan.tokens > rules.max_tokens {
        return Err(Violation::TooManyTokens {
            count: scan.tokens,
            budget: rules.max_tokens,
        });
    }

    if let Some(min) = rules.min_confidence {
        match confidence {
            None => return Err(Violation::ConfidenceUnstated { min }),
            Some(c) => {
                // NaN compares as None: refused too.
                if !matches!(
                    c.partial_cmp(&min),
                    Some(Ordering::Greater | Ordering::Equal)
                ) {
                    return Err(Violation::LowConfidence { confidence: c, min });
                }
            }
        }
    }

    if let Some(max) = &rules.max_tool_result_age {
        let max =
            duration_from_nanos(i128::from(max.seconds) * NANOS_PER_SEC + i128::from(max.nanos));
        let now = since_epoch_nanos(now);
        for result in tool_results {
            let Some(observed) = &result.observed_at else {
                return Err(Violation::ToolResultUndated {
                    tool: result.tool.clone(),
                });
            };
            let observed =
                i128::from(observed.seconds) * NANOS_PER_SEC + i128::from(observed.nanos);
            // A timestamp in the future is age 0.
            let age = duration_from_nanos(now.saturating_sub(observed));
            if age > max {
                return Err(Violation::StaleToolResult {
                    tool: result.tool.clone(),
                    age,
                    max,
                });
            }
        }
    }

    Ok(Measured {
        tokens: scan.tokens,
        bytes,
    })
}

/// Nanoseconds from the Unix epoch to `t`, negative before it.
fn since_epoch_nanos(t: SystemTime) -> i128 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(after) => i128::try_from(after.as_nanos()).unwrap_or(i128::MAX),
        Err(before) => i128::try_from(before.duration().as_nanos()).map_or(i128::MIN, |n| -n),
    }
}

/// A non-negative duration from signed nanoseconds: zero when negative,
/// saturating when too long.
fn duration_from_nanos(nanos: i128) -> Duration {
    if nanos <= 0 {
        return Duration::ZERO;
    }
    let secs = u64::try_from(nanos / NANOS_PER_SEC).unwrap_or(u64::MAX);
    let sub = u32::try_from(nanos % NANOS_PER_SEC).unwrap_or(0);
    Duration::new(secs, sub)
}

/// The fast pass over a decoded payload: counts the tokens of every string
/// and notes whether any message in the tree has unknown fields. Allocates
/// nothing of its own.
struct Scan<'t> {
    tokenizer: &'t Tokenizer,
    tokens: u64,
    unknown: bool,
}

impl Scan<'_> {
    fn message(&mut self, msg: &DynamicMessage) {
        if msg.unknown_fields().next().is_some() {
            // The check fails on the unknown fields; the count is moot.
            self.unknown = true;
            return;
        }
        for (_, value) in msg.fields() {
            self.value(value);
            if self.unknown {
                return;
            }
        }
        if has_extensions(msg) {
            for (_, value) in msg.extensions() {
                self.value(value);
                if self.unknown {
                    return;
                }
            }
        }
    }

    fn value(&mut self, value: &Value) {
        match value {
            Value::String(s) => self.text(s),
            Value::Message(m) => self.message(m),
            Value::List(items) => {
                // Lists are homogeneous: skip scalar lists at once.
                if matches!(items.first(), Some(Value::String(_) | Value::Message(_))) {
                    for item in items {
                        self.value(item);
                        if self.unknown {
                            return;
                        }
                    }
                }
            }
            Value::Map(entries) => {
                for (key, value) in entries {
                    if let MapKey::String(s) = key {
                        self.text(s);
                    }
                    self.value(value);
                    if self.unknown {
                        return;
                    }
                }
            }
            _ => {}
        }
    }

    fn text(&mut self, s: &str) {
        let n = u64::try_from(self.tokenizer.count(s)).unwrap_or(u64::MAX);
        self.tokens = self.tokens.saturating_add(n);
    }
}

fn has_extensions(msg: &DynamicMessage) -> bool {
    msg.descriptor().extension_ranges().len() > 0
}

/// The slow pass, only when [`Scan`] saw unknown fields: their paths, in
/// field-number order, list indexes and map keys in order.
fn unknown_paths(msg: &DynamicMessage, path: &mut String, out: &mut Vec<String>) {
    let mut last = None;
    for field in msg.unknown_fields() {
        let number = field.number();
        if last == Some(number) {
            continue; // a repeated unknown field: one path is enough
        }
        last = Some(number);
        out.push(if path.is_empty() {
            number.to_string()
        } else {
            format!("{path}.{number}")
        });
    }
    for (field, value) in msg.fields() {
        let mark = path.len();
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(field.name());
        value_unknown_paths(value, path, out);
        path.truncate(mark);
    }
    if has_extensions(msg) {
        for (extension, value) in msg.extensions() {
            let mark = path.len();
            if !path.is_empty() {
                path.push('.');
            }
            let _ = write!(path, "({})", extension.full_name());
            value_unknown_paths(value, path, out);
            path.truncate(mark);
        }
    }
}

fn value_unknown_paths(value: &Value, path: &mut String, out: &mut Vec<String>) {
    match value {
        Value::Message(m) => unknown_paths(m, path, out),
        Value::List(items) => {
            for (i, item) in items.iter().enumerate() {
                if let Value::Message(m) = item {
                    let mark = path.len();
                    let _ = write!(path, "[{i}]");
                    unknown_paths(m, path, out);
                    path.truncate(mark);
                }
            }
        }
        Value::Map(entries) => {
            let mut sorted: Vec<(&MapKey, &DynamicMessage)> = entries
                .iter()
                .filter_map(|(key, value)| value.as_message().map(|m| (key, m)))
                .collect();
            sorted.sort_unstable_by(|a, b| a.0.cmp(b.0));
            for (key, m) in sorted {
                let mark = path.len();
                let _ = match key {
                    MapKey::Bool(k) => write!(path, "[{k}]"),
                    MapKey::I32(k) => write!(path, "[{k}]"),
                    MapKey::I64(k) => write!(path, "[{k}]"),
                    MapKey::U32(k) => write!(path, "[{k}]"),
                    MapKey::U64(k) => write!(path, "[{k}]"),
                    MapKey::String(k) => write!(path, "[{k}]"),
                };
                unknown_paths(m, path, out);
                path.truncate(mark);
            }
        }
        _ => {}
    }
}

/// Whether a dot-separated path is present in `msg`: each step set (a
/// message set, a scalar different from its default, a repeated or map
/// field non-empty). A path that does not resolve is missing.
fn is_present(msg: &DynamicMessage, path: &str) -> bool {
    let mut current = msg;
    let mut segments = path.split('.').peekable();
    while let Some(segment) = segments.next() {
        let Some(field) = current.descriptor().get_field_by_name(segment) else {
            return false;
        };
        if !current.has_field(&field) {
            return false;
        }
        if segments.peek().is_none() {
            return true;
        }
        if field.is_list() || field.is_map() {
            return false;
        }
        match current.get_field(&field) {
            Cow::Borrowed(Value::Message(next)) => current = next,
            _ => return false,
        }
    }
    false
}

#[cfg(test)]
mod tests;
