//! `handoffctl run export`: a run's record, timeline and every state
//! revision as one JSON document (protobuf's JSON mapping), to keep what
//! the broker purges `retention` after the run ends.
//!
//! It reads what `handoffctl run show` and `state show` read (`GetRun`,
//! `GetState`), so it needs the same right: the run's owner, or a grant to
//! read its runs.

use handoff_client::Client;
use handoff_proto::FILE_DESCRIPTOR_SET;
use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};
use serde_json::{json, Value};

/// Why a run could not be exported.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The broker refused or failed a read.
    #[error(transparent)]
    Broker(#[from] handoff_client::Error),
    /// A message could not be written as JSON.
    #[error("writing {what} as JSON: {reason}")]
    Json {
        /// What was being written.
        what: String,
        /// Why it failed.
        reason: String,
    },
}

/// The export of run `run_id`: `{"format", "run", "timeline", "state",
/// "result"}`. `run.result` is decoded through its registered contract when
/// the broker has it; otherwise it is left out of `run` and given whole in
/// `result` (`{"@type", "value"}`, the value base64).
pub async fn export(client: &Client, run_id: &str) -> Result<Value, ExportError> {
    let resp = client.get_run(run_id).await?;
    let mut run = resp.run.unwrap_or_default();
    let mut pool = api_pool()?;
    let mut result = Value::Null;
    if let Some(any) = run.result.take() {
        let type_name = any.type_url.rsplit('/').next().unwrap_or_default();
        let known = pool.get_message_by_name(type_name).is_some()
            || match client.get_contract(type_name, 0).await {
                Ok(contract) => pool
                    .decode_file_descriptor_set(contract.file_descriptor_set.as_slice())
                    .is_ok(),
                Err(_) => false,
            };
        if known && pool.get_message_by_name(type_name).is_some() {
            run.result = Some(any);
        } else {
            result = json!({
                "@type": any.type_url,
                "value": base64_of(&any.value),
            });
        }
    }
    let run_json = to_json(&pool, "handoff.v1.Run", &run.encode_to_vec(), "the run")?;
    let mut timeline = Vec::with_capacity(resp.timeline.len());
    for event in &resp.timeline {
        timeline.push(to_json(
            &pool,
            "handoff.v1.Event",
            &event.encode_to_vec(),
            "an event",
        )?);
    }
    // Every revision, oldest first: the latest says how many there are.
    let mut state = Vec::new();
    let latest = match client.get_state(run_id, 0).await {
        Ok(latest) => latest.latest_revision,
        Err(e) if e.reason() == Some("STATE_REVISION_NOT_FOUND") => 0,
        Err(e) => return Err(e.into()),
    };
    for revision in 1..=latest {
        let at = client.get_state(run_id, revision).await?;
        state.push(to_json(
            &pool,
            "handoff.v1.GetStateResponse",
            &at.encode_to_vec(),
            "a state revision",
        )?);
    }
    Ok(json!({
        "format": "handoff.run-export.v1",
        "run": run_json,
        "timeline": timeline,
        "state": state,
        "result": result,
    }))
}

/// The API's own messages.
fn api_pool() -> Result<DescriptorPool, ExportError> {
    DescriptorPool::decode(FILE_DESCRIPTOR_SET).map_err(|e| ExportError::Json {
        what: "the API's descriptors".to_string(),
        reason: e.to_string(),
    })
}

/// `bytes`, a `name` message, in protobuf's JSON mapping (field names as
/// in the .proto files, enums by name, unset fields left out).
fn to_json(
    pool: &DescriptorPool,
    name: &str,
    bytes: &[u8],
    what: &str,
) -> Result<Value, ExportError> {
    let failed = |reason: String| ExportError::Json {
        what: what.to_string(),
        reason,
    };
    let descriptor = pool
        .get_message_by_name(name)
        .ok_or_else(|| failed(format!("{name} is not among the API's messages")))?;
    let message = DynamicMessage::decode(descriptor, bytes).map_err(|e| failed(e.to_string()))?;
    let options = SerializeOptions::new().use_proto_field_name(true);
    message
        .serialize_with_options(serde_json::value::Serializer, &options)
        .map_err(|e| failed(e.to_string()))
}

/// Standard base64 with padding, as protobuf's JSON mapping writes bytes.
fn base64_of(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
