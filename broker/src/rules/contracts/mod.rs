//! Contracts: typed, versioned payload schemas with rules, checked on
//! every handoff at the door.
//!
//! Versions live in the `handoff_contracts` bucket (one key per version,
//! created with compare-and-set); every replica keeps a [`Registry`] of
//! compiled versions, filled from the bucket on a miss and kept current by
//! a watch. [`compat`] decides whether a new version may follow the latest
//! one, [`validate`] checks a payload against a version's message and
//! rules, and [`tokens`] counts BPE tokens.

pub mod compat;
pub mod dropped;
pub mod tokens;
pub mod validate;

use std::{collections::BTreeMap, fmt::Write as _, sync::Arc};

use dashmap::DashMap;
use handoff_proto::pb;
use prost_reflect::{Cardinality, DescriptorPool, Kind, MessageDescriptor};
use sha2::{Digest, Sha256};

use crate::error::{BrokerError, Reason};

/// Longest message type name accepted.
const MAX_TYPE_NAME: usize = 256;

/// A contract version ready to check payloads against.
#[derive(Debug)]
pub struct Compiled {
    /// The version as stored.
    pub contract: pb::Contract,
    /// Its message type.
    pub message: MessageDescriptor,
    /// Its rules (defaults when none were given).
    pub rules: pb::ContractRules,
}

impl Compiled {
    /// Compiles a stored or requested version: decodes its descriptor set
    /// and finds its message type.
    pub fn new(contract: pb::Contract) -> Result<Compiled, BrokerError> {
        let message = message_of(&contract.file_descriptor_set, &contract.message_type)?;
        let rules = contract.rules.clone().unwrap_or_default();
        Ok(Compiled {
            contract,
            message,
            rules,
        })
    }

    /// The compatibility mode, with BACKWARD for unspecified.
    pub fn mode(&self) -> pb::Compatibility {
        mode_of(self.contract.compatibility)
    }
}

/// A compatibility value as a mode, with BACKWARD for unspecified.
pub fn mode_of(value: i32) -> pb::Compatibility {
    match pb::Compatibility::try_from(value) {
        Ok(pb::Compatibility::Unspecified) | Err(_) => pb::Compatibility::Backward,
        Ok(m) => m,
    }
}

/// Name of a mode for messages.
pub fn mode_name(mode: pb::Compatibility) -> &'static str {
    match mode {
        pb::Compatibility::None => "NONE",
        pb::Compatibility::Forward => "FORWARD",
        pb::Compatibility::Full => "FULL",
        pb::Compatibility::Backward | pb::Compatibility::Unspecified => "BACKWARD",
    }
}

/// Finds `message_type` in an encoded `FileDescriptorSet`.
pub fn message_of(
    file_descriptor_set: &[u8],
    message_type: &str,
) -> Result<MessageDescriptor, BrokerError> {
    let pool = DescriptorPool::decode(file_descriptor_set).map_err(|e| {
        BrokerError::invalid(
            Reason::InvalidContract,
            "file_descriptor_set",
            format!("file_descriptor_set is not a valid descriptor set: {e}"),
        )
    })?;
    pool.get_message_by_name(message_type).ok_or_else(|| {
        BrokerError::invalid(
            Reason::InvalidContract,
            "file_descriptor_set",
            format!("file_descriptor_set does not define message {message_type:?}"),
        )
    })
}

/// Checks a message type's full name: protobuf identifiers joined by dots
/// (it also becomes part of a key/value key).
pub fn validate_type_name(field: &'static str, name: &str) -> Result<(), BrokerError> {
    let bad = |reason: &str| BrokerError::InvalidName {
        field,
        value: name.chars().take(64).collect(),
        reason: reason.to_string(),
    };
    if name.is_empty() {
        return Err(bad("is empty"));
    }
    if name.len() > MAX_TYPE_NAME {
        return Err(bad(&format!("is longer than {MAX_TYPE_NAME} bytes")));
    }
    let ident_ok = |part: &str| {
        let mut chars = part.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    if !name.split('.').all(ident_ok) {
        return Err(bad(
            "is not a message type's full name (identifiers joined by '.', e.g. acme.v1.Subtask)",
        ));
    }
    Ok(())
}

/// The message type named by an `Any` type URL (the part after the last
/// `/`).
pub fn type_of_url(type_url: &str) -> &str {
    type_url.rsplit('/').next().unwrap_or(type_url)
}

/// A digest of everything that decides how payloads are checked: the
/// message type and every type reachable from it (field numbers, names,
/// kinds, cardinalities, enum values), the mode and the rules. Descriptor
/// sets that differ only in comments, options or unrelated types give the
/// same fingerprint.
pub fn fingerprint(
    message: &MessageDescriptor,
    mode: pb::Compatibility,
    rules: &pb::ContractRules,
) -> String {
    let mut canon = String::new();
    let _ = writeln!(canon, "mode {}", mode_name(mode));
    // `carry` came after the first contracts were stored: an empty one is
    // left out, so their fingerprints stay what they were.
    let mut rules_text = format!("{rules:?}");
    if rules.carry.is_empty() {
        rules_text = rules_text.replace(", carry: []", "");
    }
    let _ = writeln!(canon, "rules {rules_text}");
    let mut seen = BTreeMap::new();
    let mut todo = vec![message.clone()];
    while let Some(m) = todo.pop() {
        if seen.contains_key(m.full_name()) {
            continue;
        }
        let mut text = String::new();
        let mut fields: Vec<_> = m.fields().collect();
        fields.sort_by_key(|f| f.number());
        for f in fields {
            let card = match f.cardinality() {
                Cardinality::Repeated if f.is_map() => "map",
                Cardinality::Repeated => "repeated",
                Cardinality::Required => "required",
                Cardinality::Optional if f.supports_presence() => "optional",
                Cardinality::Optional => "singular",
            };
            let kind = match f.kind() {
                Kind::Message(inner) => {
                    todo.push(inner.clone());
                    format!("message {}", inner.full_name())
                }
                Kind::Enum(e) => {
                    let mut values: Vec<_> = e
                        .values()
                        .map(|v| (v.number(), v.name().to_string()))
                        .collect();
                    values.sort();
                    format!("enum {} {values:?}", e.full_name())
                }
                other => format!("{other:?}"),
            };
            let _ = writeln!(text, "  {} {} {card} {kind}", f.number(), f.name());
        }
        seen.insert(m.full_name().to_string(), text);
    }
    for (name, text) in &seen {
        let _ = writeln!(canon, "message {name}\n{text}");
    }
    Sha256::digest(canon.as_bytes())
        .iter()
        .fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// A type as written in a `.proto` file, message and enum types by full name.
pub fn kind_name(kind: &Kind) -> String {
    let name = match kind {
        Kind::Double => "double",
        Kind::Float => "float",
        Kind::Int32 => "int32",
        Kind::Int64 => "int64",
        Kind::Uint32 => "uint32",
        Kind::Uint64 => "uint64",
        Kind::Sint32 => "sint32",
        Kind::Sint64 => "sint64",
        Kind::Fixed32 => "fixed32",
        Kind::Fixed64 => "fixed64",
        Kind::Sfixed32 => "sfixed32",
        Kind::Sfixed64 => "sfixed64",
        Kind::Bool => "bool",
        Kind::String => "string",
        Kind::Bytes => "bytes",
        Kind::Message(message) => message.full_name(),
        Kind::Enum(enumeration) => enumeration.full_name(),
    };
    name.to_owned()
}

/// Compiled contract versions by message type, shared by every RPC.
#[derive(Default)]
pub struct Registry {
    versions: DashMap<String, BTreeMap<u32, Arc<Compiled>>>,
}

impl Registry {
    /// Adds (or replaces) a version.
    pub fn insert(&self, compiled: Arc<Compiled>) {
        self.versions
            .entry(compiled.contract.message_type.clone())
            .or_default()
            .insert(compiled.contract.version, compiled);
    }

    /// Every known version of a type, oldest first; `None` when the type
    /// is not known here.
    pub fn versions(&self, message_type: &str) -> Option<Vec<Arc<Compiled>>> {
        self.versions
            .get(message_type)
            .map(|v| v.values().cloned().collect())
    }

    /// Whether any version of the type is known here.
    pub fn knows(&self, message_type: &str) -> bool {
        self.versions.contains_key(message_type)
    }

    /// Every known version of every type.
    pub fn all(&self) -> Vec<Arc<Compiled>> {
        let mut out: Vec<_> = self
            .versions
            .iter()
            .flat_map(|e| e.value().values().cloned().collect::<Vec<_>>())
            .collect();
        out.sort_by(|a, b| {
            (a.contract.message_type.as_str(), a.contract.version)
                .cmp(&(b.contract.message_type.as_str(), b.contract.version))
        });
        out
    }
}

/// The highest version in `[min, max]` (0 = unbounded) of a list sorted
/// oldest first.
pub fn pick(versions: &[Arc<Compiled>], min: u32, max: u32) -> Option<Arc<Compiled>> {
    versions
        .iter()
        .rev()
        .find(|c| c.contract.version >= min && (max == 0 || c.contract.version <= max))
        .cloned()
}

/// A range for messages: `[2, 4]`, `[2, latest]`.
pub fn range_name(min: u32, max: u32) -> String {
    let max = if max == 0 {
        "latest".to_string()
    } else {
        max.to_string()
    };
    format!("[{}, {max}]", min.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_names() {
        for ok in ["acme.v1.Subtask", "Plan", "_x.y_2.Z"] {
            assert!(validate_type_name("t", ok).is_ok(), "{ok}");
        }
        for bad in ["", "a..b", ".a", "a.", "a.1b", "a b", "a/b", "a>b"] {
            assert!(validate_type_name("t", bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            type_of_url("type.googleapis.com/acme.v1.Ask"),
            "acme.v1.Ask"
        );
        assert_eq!(type_of_url("acme.v1.Ask"), "acme.v1.Ask");
    }

    #[test]
    fn fingerprints_follow_the_schema_not_the_bytes() {
        let ask = message_of(
            handoff_proto::DEMO_FILE_DESCRIPTOR_SET,
            "handoff.demo.v1.Ask",
        )
        .expect("demo Ask");
        let sub = message_of(
            handoff_proto::DEMO_FILE_DESCRIPTOR_SET,
            "handoff.demo.v1.Subtask",
        )
        .expect("demo Subtask");
        let rules = pb::ContractRules::default();
        let a = fingerprint(&ask, pb::Compatibility::Backward, &rules);
        assert_eq!(a, fingerprint(&ask, pb::Compatibility::Backward, &rules));
        assert_eq!(a.len(), 64);
        assert_ne!(a, fingerprint(&sub, pb::Compatibility::Backward, &rules));
        assert_ne!(a, fingerprint(&ask, pb::Compatibility::Full, &rules));
        let strict = pb::ContractRules {
            max_tokens: 10,
            ..Default::default()
        };
        assert_ne!(a, fingerprint(&ask, pb::Compatibility::Backward, &strict));
    }

    #[test]
    fn picks_the_highest_version_in_range() {
        let make = |v: u32| {
            Arc::new(Compiled {
                contract: pb::Contract {
                    message_type: "handoff.demo.v1.Ask".into(),
                    version: v,
                    ..Default::default()
                },
                message: message_of(
                    handoff_proto::DEMO_FILE_DESCRIPTOR_SET,
                    "handoff.demo.v1.Ask",
                )
                .expect("demo Ask"),
                rules: pb::ContractRules::default(),
            })
        };
        let all = vec![make(1), make(2), make(3)];
        let v = |c: Option<Arc<Compiled>>| c.map(|c| c.contract.version);
        assert_eq!(v(pick(&all, 0, 0)), Some(3));
        assert_eq!(v(pick(&all, 0, 2)), Some(2));
        assert_eq!(v(pick(&all, 2, 2)), Some(2));
        assert_eq!(v(pick(&all, 4, 0)), None);
        assert_eq!(range_name(0, 0), "[1, latest]");
    }
}

/// Compiles `.proto` source for the rules' unit tests.
#[cfg(test)]
pub(crate) mod testing {
    use prost_reflect::DescriptorPool;
    use protox::file::{File, FileResolver};

    /// A resolver serving a single in-memory file named `t.proto`.
    struct Source(String);

    impl FileResolver for Source {
        fn open_file(&self, name: &str) -> Result<File, protox::Error> {
            if name == "t.proto" {
                File::from_source(name, &self.0)
            } else {
                Err(protox::Error::file_not_found(name))
            }
        }
    }

    /// The descriptor pool of `source`, compiled as `t.proto`.
    pub(crate) fn pool(source: &str) -> DescriptorPool {
        let mut compiler = protox::Compiler::with_file_resolver(Source(source.to_owned()));
        compiler.include_imports(true);
        compiler.open_file("t.proto").expect("compile t.proto");
        DescriptorPool::from_file_descriptor_set(compiler.file_descriptor_set())
            .expect("descriptor pool")
    }
}
