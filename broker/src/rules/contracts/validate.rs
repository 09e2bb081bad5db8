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
mod tests {
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
}
