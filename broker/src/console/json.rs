//! Payloads as JSON through their registered contracts, and answers and
//! fork payloads read from the console's forms into their contracts.

use std::sync::Arc;

use handoff_proto::pb;
use prost::Message as _;
use prost_reflect::{
    DeserializeOptions, DynamicMessage, Kind, MessageDescriptor, SerializeOptions,
};

use crate::{
    app::Broker,
    error::{BrokerError, Reason},
    rules::contracts::{pick, Compiled},
};

/// The message type an `Any`'s URL names.
pub(crate) fn type_name(type_url: &str) -> &str {
    type_url.rsplit('/').next().unwrap_or(type_url)
}

/// The contract version of `message_type` (`version` 0: the latest).
fn contract(broker: &Broker, message_type: &str, version: u32) -> Option<Arc<Compiled>> {
    let versions = broker.contracts().versions(message_type)?;
    if version > 0 {
        if let Some(c) = versions.iter().find(|c| c.contract.version == version) {
            return Some(c.clone());
        }
    }
    pick(&versions, 0, 0)
}

/// A decoded message as pretty JSON with the `.proto` field names.
fn message_json(message: &DynamicMessage) -> Option<String> {
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::pretty(&mut out);
    let options = SerializeOptions::new()
        .use_proto_field_name(true)
        .skip_default_fields(false);
    message.serialize_with_options(&mut ser, &options).ok()?;
    String::from_utf8(out).ok()
}

/// A payload as JSON: through the registered contract of its type (the
/// version it was checked against, else the latest), a barrier's release
/// branch by branch. `None`: no contract here decodes it.
pub(crate) fn payload_json(
    broker: &Broker,
    any: &prost_types::Any,
    version: u32,
) -> Option<String> {
    let name = type_name(&any.type_url);
    if name == "handoff.v1.BarrierRelease" {
        return release_json(broker, any);
    }
    let compiled = contract(broker, name, version)?;
    let message = DynamicMessage::decode(compiled.message.clone(), any.value.as_slice()).ok()?;
    message_json(&message)
}

/// A barrier's release: its branches, each payload through its contract.
fn release_json(broker: &Broker, any: &prost_types::Any) -> Option<String> {
    let release = pb::BarrierRelease::decode(any.value.as_slice()).ok()?;
    let branches: Vec<serde_json::Value> = release
        .branches
        .iter()
        .map(|b| {
            let payload = b.payload.as_ref().map(|p| {
                payload_json(broker, p, 0)
                    .and_then(|j| serde_json::from_str::<serde_json::Value>(&j).ok())
                    .unwrap_or_else(
                        || serde_json::json!({ "type": p.type_url, "bytes": p.value.len() }),
                    )
            });
            serde_json::json!({
                "key": b.key,
                "status": pb::BranchStatus::try_from(b.status)
                    .map(|s| s.as_str_name())
                    .unwrap_or("BRANCH_STATUS_UNSPECIFIED"),
                "source_agent": b.source_agent,
                "confidence": b.confidence,
                "payload": payload,
                "payload_ref": b.payload_ref.as_ref().map(|r| serde_json::json!({
                    "size": r.size, "type": r.type_url,
                })),
            })
        })
        .collect();
    let value = serde_json::json!({
        "barrier_id": release.barrier_id,
        "failure": release.failure,
        "confidence": release.confidence,
        "warnings": release.warnings,
        "missing": release.missing,
        "failed": release.failed,
        "branches": branches,
    });
    serde_json::to_string_pretty(&value).ok()
}

fn bad_answer(field: &'static str, why: impl Into<String>) -> BrokerError {
    BrokerError::invalid(Reason::PayloadUndecodable, field, why.into())
}

/// Reads a JSON object into `desc` and packs it as an `Any`.
fn pack(
    desc: &MessageDescriptor,
    value: serde_json::Value,
    field: &'static str,
) -> Result<prost_types::Any, BrokerError> {
    let options = DeserializeOptions::new().deny_unknown_fields(true);
    let message = DynamicMessage::deserialize_with_options(desc.clone(), value, &options)
        .map_err(|e| bad_answer(field, format!("{field}: not a {}: {e}", desc.full_name())))?;
    Ok(prost_types::Any {
        type_url: format!("type.googleapis.com/{}", desc.full_name()),
        value: message.encode_to_vec(),
    })
}

/// The fields of an answer's form: each top-level field of the answer's
/// contract, with how it is typed in (scalars as inputs, the rest as
/// JSON).
pub(crate) struct FormField {
    pub(crate) name: String,
    pub(crate) input: Input,
}

/// How a field is typed in.
pub(crate) enum Input {
    Text,
    Number,
    Checkbox,
    Choice(Vec<String>),
    Json,
}

/// The form of an answer of `message_type` (`None`: no contract here).
pub(crate) fn answer_form(
    broker: &Broker,
    message_type: &str,
    version: u32,
) -> Option<Vec<FormField>> {
    let compiled = contract(broker, message_type, version)?;
    Some(
        compiled
            .message
            .fields()
            .map(|f| {
                let input = if f.is_list() || f.is_map() {
                    Input::Json
                } else {
                    match f.kind() {
                        Kind::String => Input::Text,
                        Kind::Bool => Input::Checkbox,
                        Kind::Enum(e) => {
                            Input::Choice(e.values().map(|v| v.name().to_string()).collect())
                        }
                        Kind::Message(_) | Kind::Bytes => Input::Json,
                        _ => Input::Number,
                    }
                };
                FormField {
                    name: f.name().to_string(),
                    input,
                }
            })
            .collect(),
    )
}

/// An answer read from its form (`field.<name>` inputs) into the request's
/// answer contract (the latest version in its range).
pub(crate) fn answer_from_form(
    broker: &Broker,
    request: &pb::InputRequest,
    form: &[(String, String)],
) -> Result<prost_types::Any, BrokerError> {
    let wanted = request
        .answer
        .as_ref()
        .filter(|a| !a.message_type.is_empty())
        .ok_or_else(|| bad_answer("answer", "the request names no answer contract"))?;
    let versions = broker
        .contracts()
        .versions(&wanted.message_type)
        .unwrap_or_default();
    let compiled = pick(&versions, wanted.min_version, wanted.max_version)
        .ok_or_else(|| BrokerError::ContractNotFound(wanted.message_type.clone()))?;
    let desc = &compiled.message;
    let mut object = serde_json::Map::new();
    for field in desc.fields() {
        let key = format!("field.{}", field.name());
        let given: Vec<&str> = form
            .iter()
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| v.as_str())
            .collect();
        let Some(text) = given.last().map(|t| t.trim()) else {
            continue;
        };
        if text.is_empty() {
            continue;
        }
        let value = if field.is_list() || field.is_map() {
            serde_json::from_str(text)
                .map_err(|e| bad_answer("answer", format!("{}: not JSON: {e}", field.name())))?
        } else {
            match field.kind() {
                Kind::String => serde_json::Value::String(text.to_string()),
                Kind::Bool => serde_json::Value::Bool(matches!(text, "on" | "true" | "1")),
                Kind::Enum(_) => serde_json::Value::String(text.to_string()),
                Kind::Message(_) | Kind::Bytes => serde_json::from_str(text).map_err(|e| {
                    bad_answer("answer", format!("{}: not JSON: {e}", field.name()))
                })?,
                // Numbers: JSON's reading (64-bit integers as strings are
                // taken too).
                _ => serde_json::from_str(text).map_err(|_| {
                    bad_answer(
                        "answer",
                        format!("{}: {text:?} is not a number", field.name()),
                    )
                })?,
            }
        };
        object.insert(field.name().to_string(), value);
    }
    pack(desc, serde_json::Value::Object(object), "answer")
}

/// A fork's payload: JSON read into the contract the target agent accepts.
pub(crate) async fn payload_for_agent(
    broker: &Broker,
    agent: &str,
    text: &str,
) -> Result<prost_types::Any, BrokerError> {
    let spec = broker.agent(agent).await?;
    let accepts = spec
        .accepts
        .filter(|a| !a.message_type.is_empty())
        .ok_or_else(|| {
            bad_answer(
                "payload",
                format!("agent {agent} declares no contract it accepts: fork it with handoffctl"),
            )
        })?;
    let versions = broker
        .contracts()
        .versions(&accepts.message_type)
        .unwrap_or_default();
    let compiled = pick(&versions, accepts.min_version, accepts.max_version)
        .ok_or_else(|| BrokerError::ContractNotFound(accepts.message_type.clone()))?;
    let value: serde_json::Value = match text.trim() {
        "" => serde_json::Value::Object(Default::default()),
        t => serde_json::from_str(t)
            .map_err(|e| bad_answer("payload", format!("payload: not JSON: {e}")))?,
    };
    pack(&compiled.message, value, "payload")
}
