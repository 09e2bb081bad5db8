//! Contracts: a protobuf message type registered with the broker, with its
//! rules. Build one with [`ContractSpec`], register it with
//! [`Client::register_contract`](crate::Client::register_contract).

use std::time::Duration;

use crate::pb;

/// A contract version to register: [`ContractSpec::of`] or
/// [`ContractSpec::named`], then the builder methods for its rules.
///
/// ```
/// use std::time::Duration;
/// use handoff_client::ContractSpec;
/// use handoff_proto::{demo::Subtask, DEMO_FILE_DESCRIPTOR_SET};
///
/// let spec = ContractSpec::of::<Subtask>(DEMO_FILE_DESCRIPTOR_SET)
///     .require("instruction")
///     .max_tokens(200)
///     .max_tool_result_age(Duration::from_secs(3600));
/// assert_eq!(spec.request().message_type, "handoff.demo.v1.Subtask");
/// ```
#[derive(Debug, Clone)]
pub struct ContractSpec {
    req: pb::RegisterContractRequest,
}

impl ContractSpec {
    /// The contract of message type `T`, defined in `file_descriptor_set`
    /// (an encoded `google.protobuf.FileDescriptorSet` holding `T` and
    /// everything it imports, such as
    /// [`handoff_proto::DEMO_FILE_DESCRIPTOR_SET`] or the output of
    /// `tonic::include_file_descriptor_set!`).
    pub fn of<T: prost::Name>(file_descriptor_set: impl Into<Vec<u8>>) -> ContractSpec {
        ContractSpec::named(T::full_name(), file_descriptor_set)
    }

    /// The contract of the message type with full name `message_type`
    /// (`acme.research.v1.Subtask`, no leading dot), defined in
    /// `file_descriptor_set`.
    pub fn named(
        message_type: impl Into<String>,
        file_descriptor_set: impl Into<Vec<u8>>,
    ) -> ContractSpec {
        ContractSpec {
            req: pb::RegisterContractRequest {
                message_type: message_type.into(),
                file_descriptor_set: file_descriptor_set.into(),
                ..Default::default()
            },
        }
    }

    /// The version to register. Default (0): the next version, or the
    /// latest when its content is identical, so registering the same spec
    /// again is a no-op.
    pub fn version(mut self, version: u32) -> Self {
        self.req.version = version;
        self
    }

    /// The contract's compatibility mode: how each version must relate to
    /// the one before it. Version 1 sets it (default: BACKWARD); a later
    /// version is always checked under the contract's mode, so leave it
    /// unset there (naming another mode is refused with
    /// `COMPATIBILITY_MODE_FIXED`; see [`crate::Client::set_compatibility`]).
    pub fn compatibility(mut self, compatibility: pb::Compatibility) -> Self {
        self.req.compatibility = compatibility as i32;
        self
    }

    /// Adds a required field path, dot-separated from the contract's
    /// message (`ask.text`): a scalar must differ from its default, a
    /// message must be set, a repeated or map field must be non-empty.
    pub fn require(mut self, path: impl Into<String>) -> Self {
        self.rules().required_fields.push(path.into());
        self
    }

    /// Budget of BPE tokens over every string value in the payload
    /// (0: none).
    pub fn max_tokens(mut self, tokens: u64) -> Self {
        self.rules().max_tokens = tokens;
        self
    }

    /// Budget of the encoded payload in bytes (0: none).
    pub fn max_bytes(mut self, bytes: u64) -> Self {
        self.rules().max_bytes = bytes;
        self
    }

    /// Lowest confidence accepted, in [0, 1]; every handoff must then
    /// state its confidence ([`Handoff::confidence`](crate::Handoff::confidence)).
    pub fn min_confidence(mut self, confidence: f64) -> Self {
        self.rules().min_confidence = Some(confidence);
        self
    }

    /// Oldest tool result accepted, by its `observed_at`; every tool
    /// result must then carry `observed_at`. A duration too large for
    /// protobuf leaves the rule unset.
    pub fn max_tool_result_age(mut self, age: Duration) -> Self {
        self.rules().max_tool_result_age = prost_types::Duration::try_from(age).ok();
        self
    }

    /// A top-level field that must be carried over: a handoff consuming a
    /// delivery whose payload has a value in a field of this name, leaving
    /// it empty, is refused (`DROPPED_FIELD`).
    pub fn carry(mut self, field: impl Into<String>) -> Self {
        self.rules().carry.push(field.into());
        self
    }

    /// The request as it will be sent.
    pub fn request(&self) -> &pb::RegisterContractRequest {
        &self.req
    }

    /// The request, to send with the raw client.
    pub fn into_request(self) -> pb::RegisterContractRequest {
        self.req
    }

    fn rules(&mut self) -> &mut pb::ContractRules {
        self.req.rules.get_or_insert_with(Default::default)
    }
}

/// What the broker answered to [`Client::register_contract`](crate::Client::register_contract).
#[derive(Debug, Clone, PartialEq)]
pub struct RegisteredContract {
    /// The contract version as stored (with its version, fingerprint and
    /// registration time).
    pub contract: pb::Contract,
    /// False when this exact content was already registered (a no-op).
    pub created: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use handoff_proto::{demo, DEMO_FILE_DESCRIPTOR_SET};

    #[test]
    fn of_uses_the_full_name_and_the_descriptors() {
        let req = ContractSpec::of::<demo::Subtask>(DEMO_FILE_DESCRIPTOR_SET).into_request();
        assert_eq!(req.message_type, "handoff.demo.v1.Subtask");
        assert_eq!(req.file_descriptor_set, DEMO_FILE_DESCRIPTOR_SET);
        assert_eq!(req.version, 0);
        assert_eq!(req.compatibility, pb::Compatibility::Unspecified as i32);
        assert_eq!(req.rules, None);
    }

    #[test]
    fn rules_accumulate() {
        let req = ContractSpec::named("acme.v1.Thing", vec![1, 2, 3])
            .version(2)
            .compatibility(pb::Compatibility::Full)
            .require("a")
            .require("b.c")
            .max_tokens(100)
            .max_bytes(4096)
            .min_confidence(0.5)
            .max_tool_result_age(Duration::from_secs(90))
            .carry("order_id")
            .into_request();
        assert_eq!(req.message_type, "acme.v1.Thing");
        assert_eq!(req.file_descriptor_set, vec![1, 2, 3]);
        assert_eq!(req.version, 2);
        assert_eq!(req.compatibility, pb::Compatibility::Full as i32);
        assert_eq!(
            req.rules,
            Some(pb::ContractRules {
                required_fields: vec!["a".to_string(), "b.c".to_string()],
                max_tokens: 100,
                max_bytes: 4096,
                min_confidence: Some(0.5),
                max_tool_result_age: Some(prost_types::Duration {
                    seconds: 90,
                    nanos: 0
                }),
                carry: vec!["order_id".to_string()],
            })
        );
    }
}
