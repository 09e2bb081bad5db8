//! Building a handoff request.

use std::{collections::HashMap, time::SystemTime};

use crate::{error::Result, pb, Error, ErrorKind};

/// A handoff to send: built with [`Handoff::to`], [`Handoff::final_result`]
/// or [`Handoff::to_barrier`],
/// refined with the builder methods, sent with
/// [`Client::handoff`](crate::Client::handoff) or
/// [`Delivery::handoff`](crate::Delivery::handoff).
#[derive(Debug, Clone)]
pub struct Handoff {
    pub(crate) req: pb::HandoffRequest,
}

impl Handoff {
    /// A handoff of `payload` to `target` within `run_id`.
    pub fn to<M: prost::Message + prost::Name>(
        run_id: impl Into<String>,
        target: impl Into<String>,
        payload: &M,
    ) -> Result<Handoff> {
        Ok(Handoff {
            req: pb::HandoffRequest {
                run_id: run_id.into(),
                target_agent: target.into(),
                payload: Some(encode(payload)?),
                ..Default::default()
            },
        })
    }

    /// A final handoff: the run completes with `payload` as its result.
    pub fn final_result<M: prost::Message + prost::Name>(
        run_id: impl Into<String>,
        payload: &M,
    ) -> Result<Handoff> {
        Ok(Handoff {
            req: pb::HandoffRequest {
                run_id: run_id.into(),
                r#final: true,
                payload: Some(encode(payload)?),
                ..Default::default()
            },
        })
    }

    /// A branch result for barrier `barrier_id`, branch `key`, within
    /// `run_id`: delivered to the barrier instead of an agent, status
    /// ARRIVED unless [`branch_status`](Handoff::branch_status) says
    /// otherwise. Sent through [`Delivery::handoff`](crate::Delivery::handoff)
    /// from a delivery of the branch, `run_id` may be empty, and
    /// `barrier_id` and `key` may both be empty: they are then the
    /// delivery's (the barrier and key travel along a branch's chain of
    /// agents). [`Delivery::to_barrier`](crate::Delivery::to_barrier)
    /// is the shorthand; use this builder for a confidence, warnings or
    /// tool results.
    pub fn to_barrier<M: prost::Message + prost::Name>(
        run_id: impl Into<String>,
        barrier_id: impl Into<String>,
        key: impl Into<String>,
        result: &M,
    ) -> Result<Handoff> {
        Ok(Handoff {
            req: pb::HandoffRequest {
                run_id: run_id.into(),
                to_barrier: true,
                barrier_id: barrier_id.into(),
                branch_key: key.into(),
                payload: Some(encode(result)?),
                ..Default::default()
            },
        })
    }

    /// The status a branch result reports: ARRIVED (the default), FAILED
    /// or SKIPPED; add a [`warning`](Handoff::warning) saying why.
    pub fn branch_status(mut self, status: pb::BranchStatus) -> Self {
        self.req.branch_status = status as i32;
        self
    }

    /// A handoff to `target` within `run_id` of a payload the broker
    /// already stores by reference, as a delivery received it
    /// ([`Delivery::payload_ref`](crate::Delivery::payload_ref)): the
    /// payload is not uploaded again. The broker checks that the reference
    /// names a stored payload of this run with its size and digest, and
    /// checks the target's contract on the whole payload.
    /// [`Delivery::forward_to`](crate::Delivery::forward_to) is the
    /// shorthand from a delivery.
    pub fn forward(
        run_id: impl Into<String>,
        target: impl Into<String>,
        reference: &pb::PayloadRef,
    ) -> Handoff {
        Handoff {
            req: pb::HandoffRequest {
                run_id: run_id.into(),
                target_agent: target.into(),
                payload_ref: Some(reference.clone()),
                ..Default::default()
            },
        }
    }

    /// A handoff from a raw request (for payloads already encoded).
    pub fn from_request(req: pb::HandoffRequest) -> Handoff {
        Handoff { req }
    }

    /// Names the agent handing off.
    pub fn from_agent(mut self, source: impl Into<String>) -> Self {
        self.req.source_agent = source.into();
        self
    }

    /// Retrying with the same key answers the first handoff instead of
    /// storing a second one.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.req.idempotency_key = key.into();
        self
    }

    /// Confidence in [0, 1] (default 1).
    pub fn confidence(mut self, confidence: f64) -> Self {
        self.req.confidence = Some(confidence);
        self
    }

    /// Adds a warning for the receiver.
    pub fn warning(mut self, warning: impl Into<String>) -> Self {
        self.req.warnings.push(warning.into());
        self
    }

    /// Adds a tool result with the time it was observed.
    pub fn tool_result<M: prost::Message + prost::Name>(
        mut self,
        tool: impl Into<String>,
        observed_at: SystemTime,
        result: &M,
    ) -> Result<Self> {
        self.req.tool_results.push(pb::ToolResult {
            tool: tool.into(),
            observed_at: Some(observed_at.into()),
            result: Some(encode(result)?),
        });
        Ok(self)
    }

    /// Adds a parent handoff id (recorded; depth comes from the consumed delivery).
    pub fn parent(mut self, handoff_id: impl Into<String>) -> Self {
        self.req.parent_ids.push(handoff_id.into());
        self
    }

    /// Declares that the consumed delivery fans out: several handoffs
    /// complete one delivery, to one or more targets (a planner handing
    /// out subtasks). The broker refuses a second handoff from one
    /// delivery to another target (ALREADY_EXISTS) unless every handoff
    /// from it declares fan-out. Give each one a distinct
    /// [`idempotency_key`](Handoff::idempotency_key): handoffs from one
    /// delivery to one target with the same key are the same handoff.
    /// A fan-out handoff leaves the consumed delivery unsettled: ack it
    /// after the last one.
    pub fn fan_out(mut self) -> Self {
        self.req.fan_out = true;
        self
    }

    /// Sets trace-propagation fields (W3C `traceparent`, `tracestate`,
    /// ...). A broker with traces on makes its `send` span a child of the
    /// `traceparent` given here (else of the call's `traceparent` gRPC
    /// header), and stores the handoff with the `send` span's context.
    /// Without one, [`Delivery::handoff`](crate::Delivery::handoff) fills
    /// in the consumed delivery's.
    pub fn trace_context(mut self, fields: HashMap<String, String>) -> Self {
        self.req.trace_context = fields;
        self
    }

    /// Changes to the run state, applied atomically with this handoff (a
    /// refused handoff changes nothing).
    pub fn state_delta(mut self, delta: crate::StateDelta) -> Self {
        self.req.state_delta = Some(delta.into_proto());
        self
    }

    /// Asks for a run-state key (a question to the target, an owner or a
    /// human). If the run state already holds it, the broker counts a stale
    /// re-ask and answers the value in [`Receipt::answers`].
    pub fn asks_for(mut self, key: impl Into<String>) -> Self {
        self.req.asks_for.push(key.into());
        self
    }

    /// Sets the W3C `traceparent` (`00-<trace id>-<span id>-<flags>`) the
    /// handoff continues: the caller's current span, so the broker's
    /// `send` span joins the caller's trace. Other trace-context fields
    /// are kept.
    pub fn traceparent(mut self, traceparent: impl Into<String>) -> Self {
        self.req
            .trace_context
            .retain(|k, _| !k.eq_ignore_ascii_case(TRACEPARENT));
        self.req
            .trace_context
            .insert(TRACEPARENT.to_string(), traceparent.into());
        self
    }

    /// The request as it will be sent.
    pub fn request(&self) -> &pb::HandoffRequest {
        &self.req
    }
}

/// The W3C field naming the parent span.
pub(crate) const TRACEPARENT: &str = "traceparent";
/// The W3C field of vendor trace state that travels with a traceparent.
pub(crate) const TRACESTATE: &str = "tracestate";

/// The value of `key` in trace-context `fields`, whatever its case.
pub(crate) fn field<'a>(fields: &'a HashMap<String, String>, key: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(key))
        .map(|(_, v)| v.as_str())
}

/// Packs a message as a `google.protobuf.Any`.
pub fn encode<M: prost::Message + prost::Name>(msg: &M) -> Result<prost_types::Any> {
    prost_types::Any::from_msg(msg)
        .map_err(|e| Error::new(ErrorKind::InvalidArgument, e.to_string()))
}

/// Unpacks a `google.protobuf.Any` as `M`, checking its type.
pub fn decode<M: prost::Message + prost::Name + Default>(any: &prost_types::Any) -> Result<M> {
    any.to_msg::<M>().map_err(|e| {
        Error::new(
            ErrorKind::Decode,
            format!(
                "payload of type {:?} does not decode as {}: {e}",
                any.type_url,
                M::full_name()
            ),
        )
    })
}

/// The message type named by an `Any` type URL (what follows its last
/// `/`).
pub(crate) fn type_name(type_url: &str) -> &str {
    type_url.rsplit('/').next().unwrap_or(type_url)
}

/// What the broker answered to an accepted handoff.
#[derive(Debug, Clone, PartialEq)]
pub struct Receipt {
    /// The handoff's id.
    pub handoff_id: String,
    /// Its position in the inbox stream (0 for a final handoff).
    pub sequence: u64,
    /// True when the request repeated an accepted handoff.
    pub duplicate: bool,
    /// Its depth in the run.
    pub depth: u32,
    /// The run-state revision the handoff hands over (0: the run has no
    /// state).
    pub state_revision: u64,
    /// The keys it asked for that the run state already held, with their
    /// values: use them instead of asking.
    pub answers: HashMap<String, crate::state::Value>,
    /// Payload fields the broker saw dropped on this edge.
    pub dropped_fields: Vec<String>,
}

impl From<pb::HandoffResponse> for Receipt {
    fn from(r: pb::HandoffResponse) -> Receipt {
        Receipt {
            handoff_id: r.handoff_id,
            sequence: r.sequence,
            duplicate: r.duplicate,
            depth: r.depth,
            state_revision: r.state_revision,
            answers: r.answers,
            dropped_fields: r.dropped_fields,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use handoff_proto::demo;

    #[test]
    fn builder_fills_the_request() {
        let task = demo::Subtask {
            index: 1,
            of: 3,
            instruction: "read".to_string(),
            sources: vec![],
        };
        let h = Handoff::to("run-1", "worker", &task).and_then(|h| {
            h.idempotency_key("k1")
                .fan_out()
                .confidence(0.8)
                .tool_result("search", SystemTime::UNIX_EPOCH, &demo::Citation::default())
        });
        let req = match h {
            Ok(h) => h.req,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(req.run_id, "run-1");
        assert_eq!(req.target_agent, "worker");
        assert!(req.fan_out);
        assert!(!req.r#final);
        assert_eq!(req.idempotency_key, "k1");
        assert_eq!(req.confidence, Some(0.8));
        assert_eq!(req.tool_results.len(), 1);
        let payload = req.payload.unwrap_or_default();
        assert!(
            payload.type_url.ends_with("/handoff.demo.v1.Subtask"),
            "{}",
            payload.type_url
        );
        assert_eq!(decode::<demo::Subtask>(&payload).ok(), Some(task));
        let err = decode::<demo::Ask>(&payload).err().map(|e| e.kind());
        assert_eq!(err, Some(ErrorKind::Decode));
    }

    #[test]
    fn traceparent_replaces_only_the_traceparent() {
        let mut fields = HashMap::new();
        fields.insert("TraceParent".to_string(), "old".to_string());
        fields.insert("tracestate".to_string(), "k=v".to_string());
        let h = Handoff::to("run-1", "worker", &demo::Citation::default())
            .map(|h| h.trace_context(fields).traceparent("new"));
        let req = match h {
            Ok(h) => h.req,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(req.trace_context.len(), 2, "{:?}", req.trace_context);
        assert_eq!(field(&req.trace_context, TRACEPARENT), Some("new"));
        assert_eq!(field(&req.trace_context, TRACESTATE), Some("k=v"));
    }
}
