//! Traces: an OpenTelemetry span for every handoff, exported over OTLP.
//!
//! Off unless `otlp_endpoint` is set. Then [`Traces::start`] builds a
//! tracer provider (`service.name = handoffd`) with a batch span processor
//! and the OTLP/gRPC exporter, and the gRPC edge makes one PRODUCER span
//! per handoff it is asked to accept ([`Traces::send`]), named
//! `send <target>` (`send (final)`, `send barrier <id>`), with the
//! OpenTelemetry messaging attributes and `gen_ai.agent.name` /
//! `gen_ai.conversation.id`.
//!
//! Propagation is W3C trace context. A span continues the caller's trace:
//! the request's `trace_context` field first (it is explicit, and it is
//! what an agent copies from the delivery it consumes), else the call's
//! gRPC metadata (`traceparent`, `tracestate` headers), else it starts a
//! new trace; a malformed `traceparent` counts as absent. The handoff is
//! then stored with the `send` span's own context in its `trace_context`,
//! so each delivery carries the context it was created in, and the next
//! agent's handoff is a child of it: one trace shows a whole run.
//!
//! A barrier's release continues the trace of the barrier's opening (its
//! spec's `trace_context`, recorded from the call that opened it), in a
//! PRODUCER span `release barrier <id>` linked to the span of each
//! branch's handoff ([`Traces::release`]); without traces on, the release
//! carries the opening's context as it is. Each delivery is made in a
//! CONSUMER span `receive <agent>`, a child of its handoff's span, whose
//! context the delivery carries ([`Traces::receive`]): the agent's next
//! handoff is its child.
//!
//! The spans are `tracing` spans turned into OpenTelemetry spans by
//! `tracing-opentelemetry`, in a subscriber this broker owns rather than
//! the process-wide one that writes the logs: several brokers in one
//! process (the tests) each export to their own collector, and logs are
//! the same with traces on or off. The provider is flushed and shut down
//! when the broker stops ([`Traces::shutdown`]).

use std::{collections::HashMap, time::Duration};

use handoff_proto::pb;
use opentelemetry::{
    propagation::{Extractor, TextMapPropagator},
    trace::{TraceContextExt, TracerProvider as _},
    Context,
};
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::{propagation::TraceContextPropagator, trace::SdkTracerProvider, Resource};
use tonic::metadata::MetadataMap;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

use crate::config::Config;

/// The W3C field naming the parent span (`00-<trace id>-<span id>-<flags>`).
pub const TRACEPARENT: &str = "traceparent";
/// The W3C field carrying vendor-specific trace state along a traceparent.
pub const TRACESTATE: &str = "tracestate";

/// `messaging.system` of every span: the broker itself (NATS is its store,
/// not what agents address).
pub const MESSAGING_SYSTEM: &str = "handoff";

/// Why traces could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The OTLP exporter refused the endpoint.
    #[error("otlp_endpoint {endpoint:?}: {reason}")]
    Exporter {
        /// The configured endpoint.
        endpoint: String,
        /// What the exporter said.
        reason: String,
    },
}

/// The broker's tracing pipeline: present only when `otlp_endpoint` is set.
#[derive(Clone)]
pub struct Traces {
    provider: SdkTracerProvider,
    /// A `tracing` subscriber with only the OpenTelemetry layer, bound to
    /// this broker's provider; spans made in it end in it.
    dispatch: tracing::Dispatch,
}

impl std::fmt::Debug for Traces {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Traces").finish_non_exhaustive()
    }
}

impl Traces {
    /// The pipeline `config` asks for: `None` (no provider, no exporter,
    /// no thread) when `otlp_endpoint` is unset. Call it inside the tokio
    /// runtime: the exporter's gRPC channel runs on it.
    pub fn start(config: &Config) -> Result<Option<Traces>, TraceError> {
        let Some(endpoint) = config.otlp_endpoint.as_deref() else {
            return Ok(None);
        };
        let error = |e: &dyn std::fmt::Display| TraceError::Exporter {
            endpoint: endpoint.to_string(),
            reason: e.to_string(),
        };
        let mut builder = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint);
        if endpoint.starts_with("https:") {
            builder = builder
                .with_tls_config(tonic::transport::ClientTlsConfig::new().with_native_roots());
        }
        let exporter = builder.build().map_err(|e| error(&e))?;
        let resource = Resource::builder()
            .with_service_name("handoffd")
            .with_attribute(opentelemetry::KeyValue::new(
                "service.version",
                env!("CARGO_PKG_VERSION"),
            ))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_resource(resource)
            .with_batch_exporter(exporter)
            .build();
        let layer = tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("handoffd"))
            .with_location(false)
            .with_threads(false)
            .with_target(false)
            .with_level(false)
            .with_tracked_inactivity(false);
        let dispatch = tracing::Dispatch::new(tracing_subscriber::registry().with(layer));
        tracing::info!(endpoint, "exporting traces over OTLP");
        Ok(Some(Traces { provider, dispatch }))
    }

    /// Opens the PRODUCER span of `req` (a handoff about to be accepted),
    /// a child of the caller's context (see [`parent_context`]), and
    /// writes the span's own context into `req.trace_context` (other
    /// fields there are kept), so the stored envelope carries it. End it
    /// with [`SendSpan::end`].
    pub fn send(&self, req: &mut pb::HandoffRequest, metadata: &MetadataMap) -> SendSpan {
        let parent = parent_context(&req.trace_context, metadata);
        let name = send_name(req);
        let span = tracing::dispatcher::with_default(&self.dispatch, || {
            tracing::info_span!(
                parent: None,
                "send",
                otel.name = name.as_str(),
                otel.kind = "producer",
                otel.status_code = tracing::field::Empty,
                messaging.system = MESSAGING_SYSTEM,
                messaging.operation.type = "send",
                messaging.operation.name = "send",
                messaging.destination.name = tracing::field::Empty,
                messaging.message.id = tracing::field::Empty,
                gen_ai.agent.name = tracing::field::Empty,
                gen_ai.conversation.id = tracing::field::Empty,
                handoff.final = req.r#final,
                handoff.barrier.id = tracing::field::Empty,
                handoff.branch.key = tracing::field::Empty,
                handoff.depth = tracing::field::Empty,
                handoff.duplicate = tracing::field::Empty,
                error.type = tracing::field::Empty,
            )
        });
        // A new span has not started yet: setting its parent cannot fail.
        let _ = span.set_parent(parent);
        let destination = if req.to_barrier {
            req.barrier_id.as_str()
        } else {
            req.target_agent.as_str()
        };
        let fields = [
            ("messaging.destination.name", destination),
            ("gen_ai.agent.name", req.source_agent.as_str()),
            ("gen_ai.conversation.id", req.run_id.as_str()),
            ("handoff.barrier.id", req.barrier_id.as_str()),
            ("handoff.branch.key", req.branch_key.as_str()),
        ];
        for (field, value) in fields {
            if !value.is_empty() {
                span.record(field, value);
            }
        }
        let send = SendSpan { span };
        send.propagate(&mut req.trace_context);
        send
    }

    /// Makes the PRODUCER span of a barrier's release, a child of the
    /// barrier's opening (`spec.trace_context`) linked to the span of each
    /// branch result's handoff, and returns its context, for the release
    /// handoff to carry. The span has no duration of its own: it marks
    /// where the branches join.
    pub fn release(
        &self,
        spec: &pb::BarrierSpec,
        branches: &[pb::BranchResult],
    ) -> HashMap<String, String> {
        let parent = parent_context(&spec.trace_context, &MetadataMap::new());
        let name = format!("release barrier {}", spec.barrier_id);
        let span = tracing::dispatcher::with_default(&self.dispatch, || {
            tracing::info_span!(
                parent: None,
                "release",
                otel.name = name.as_str(),
                otel.kind = "producer",
                messaging.system = MESSAGING_SYSTEM,
                messaging.operation.type = "send",
                messaging.operation.name = "release",
                messaging.destination.name = spec.target_agent.as_str(),
                gen_ai.conversation.id = spec.run_id.as_str(),
                handoff.barrier.id = spec.barrier_id.as_str(),
                handoff.branches = i64::try_from(branches.len()).unwrap_or(i64::MAX),
            )
        });
        let _ = span.set_parent(parent);
        let propagator = TraceContextPropagator::new();
        for branch in branches {
            let cx =
                propagator.extract_with_context(&Context::new(), &Fields(&branch.trace_context));
            let sc = cx.span().span_context().clone();
            if sc.is_valid() {
                span.add_link_with_attributes(
                    sc,
                    vec![opentelemetry::KeyValue::new(
                        "handoff.branch.key",
                        branch.key.clone(),
                    )],
                );
            }
        }
        let mut fields = spec.trace_context.clone();
        inject(&span, &mut fields);
        fields
    }

    /// Makes the CONSUMER span of one delivery of `envelope` to `agent`, a
    /// child of the span the handoff was stored with, and returns its
    /// context, for the delivery to carry (the agent's next handoff is its
    /// child).
    pub fn receive(
        &self,
        envelope: &pb::HandoffEnvelope,
        agent: &str,
        attempt: u32,
    ) -> HashMap<String, String> {
        let parent = parent_context(&envelope.trace_context, &MetadataMap::new());
        let name = format!("receive {agent}");
        let span = tracing::dispatcher::with_default(&self.dispatch, || {
            tracing::info_span!(
                parent: None,
                "receive",
                otel.name = name.as_str(),
                otel.kind = "consumer",
                messaging.system = MESSAGING_SYSTEM,
                messaging.operation.type = "receive",
                messaging.operation.name = "receive",
                messaging.destination.name = agent,
                messaging.message.id = envelope.id.as_str(),
                gen_ai.agent.name = agent,
                gen_ai.conversation.id = envelope.run_id.as_str(),
                handoff.attempt = i64::from(attempt),
            )
        });
        let _ = span.set_parent(parent);
        let mut fields = envelope.trace_context.clone();
        inject(&span, &mut fields);
        fields
    }

    /// Exports what is buffered and stops the exporter, within `timeout`
    /// (off the async threads: the SDK's shutdown blocks).
    pub async fn shutdown(self, timeout: Duration) {
        let provider = self.provider.clone();
        drop(self);
        let done = tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(timeout));
        match tokio::time::timeout(timeout + Duration::from_secs(1), done).await {
            Ok(Ok(Ok(()))) => tracing::debug!("traces flushed"),
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "traces not flushed on exit"),
            Ok(Err(e)) => tracing::warn!(error = %e, "traces not flushed on exit"),
            Err(_) => tracing::warn!(?timeout, "traces not flushed on exit: timed out"),
        }
    }
}

/// The PRODUCER span of one handoff, open until [`SendSpan::end`].
#[derive(Debug)]
pub struct SendSpan {
    span: tracing::Span,
}

impl SendSpan {
    /// The span's trace id (32 hex digits), for logs.
    pub fn trace_id(&self) -> String {
        self.span
            .context()
            .span()
            .span_context()
            .trace_id()
            .to_string()
    }

    /// Replaces the W3C fields of `fields` with this span's context;
    /// leaves them as they are if the span has none.
    fn propagate(&self, fields: &mut HashMap<String, String>) {
        inject(&self.span, fields);
    }

    /// Records how the handoff went and ends the span: the handoff's id,
    /// depth and whether it repeated an accepted one, or the error reason
    /// (status ERROR) when it was refused.
    pub fn end(self, outcome: Result<&pb::HandoffResponse, &tonic::Status>) {
        match outcome {
            Ok(r) => {
                self.span
                    .record("messaging.message.id", r.handoff_id.as_str());
                self.span.record("handoff.depth", i64::from(r.depth));
                self.span.record("handoff.duplicate", r.duplicate);
            }
            Err(status) => {
                use tonic_types::StatusExt as _;
                let reason = status
                    .get_error_details()
                    .error_info()
                    .map(|i| i.reason.clone())
                    .unwrap_or_else(|| format!("{:?}", status.code()));
                self.span.record("otel.status_code", "ERROR");
                self.span.record("error.type", reason.as_str());
            }
        }
    }
}

/// Replaces the W3C fields of `fields` with `span`'s context; leaves them
/// as they are if the span has none.
fn inject(span: &tracing::Span, fields: &mut HashMap<String, String>) {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return;
    }
    let mut injected = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut injected);
    fields
        .retain(|k, _| !k.eq_ignore_ascii_case(TRACEPARENT) && !k.eq_ignore_ascii_case(TRACESTATE));
    fields.extend(injected);
}

/// The longest `tracestate` a barrier records (W3C allows 32 members of
/// at most 256 characters; vendors keep far less).
const MAX_TRACESTATE: usize = 512;

/// The W3C fields of the context a call continues (see
/// [`parent_context`]), checked: what a barrier records of its opening,
/// traces on or off. Nothing else the caller sent is kept; empty when
/// there is no valid `traceparent`.
pub fn opening_context(
    fields: &HashMap<String, String>,
    metadata: &MetadataMap,
) -> HashMap<String, String> {
    let cx = parent_context(fields, metadata);
    let mut out = HashMap::new();
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&cx, &mut out);
    }
    out.retain(|k, v| k != TRACESTATE || v.len() <= MAX_TRACESTATE);
    out
}

/// The span name of a handoff: `send <target>`, `send (final)` for a
/// run's final result, `send barrier <id>` for a branch result.
pub fn send_name(req: &pb::HandoffRequest) -> String {
    if req.r#final {
        "send (final)".to_string()
    } else if req.to_barrier {
        match req.barrier_id.as_str() {
            "" => "send barrier".to_string(),
            id => format!("send barrier {id}"),
        }
    } else {
        format!("send {}", req.target_agent)
    }
}

/// The context a span continues: the W3C fields of `fields` (a request's
/// `trace_context`) when they hold a valid `traceparent`, else those of
/// the call's gRPC metadata, else none (a new trace). Malformed values are
/// ignored.
pub fn parent_context(fields: &HashMap<String, String>, metadata: &MetadataMap) -> Context {
    let propagator = TraceContextPropagator::new();
    let from_fields = propagator.extract_with_context(&Context::new(), &Fields(fields));
    if from_fields.span().span_context().is_valid() {
        return from_fields;
    }
    let from_metadata = propagator.extract_with_context(&Context::new(), &Metadata(metadata));
    if from_metadata.span().span_context().is_valid() {
        return from_metadata;
    }
    Context::new()
}

/// A request's `trace_context` map, read with case-insensitive keys.
struct Fields<'a>(&'a HashMap<String, String>);

impl Extractor for Fields<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// gRPC metadata (HTTP/2 headers, lower-case); binary entries are skipped.
struct Metadata<'a>(&'a MetadataMap);

impl Extractor for Metadata<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CALLER: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    const OTHER: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn ids(cx: &Context) -> Option<(String, String)> {
        let span = cx.span();
        let sc = span.span_context();
        sc.is_valid()
            .then(|| (sc.trace_id().to_string(), sc.span_id().to_string()))
    }

    #[test]
    fn the_request_field_wins_over_metadata_and_malformed_values_are_ignored() {
        let mut metadata = MetadataMap::new();
        metadata.insert(TRACEPARENT, OTHER.parse().expect("ascii"));
        let mut fields = HashMap::new();
        fields.insert("Traceparent".to_string(), CALLER.to_string());

        let both = parent_context(&fields, &metadata);
        assert_eq!(
            ids(&both),
            Some((
                "0af7651916cd43dd8448eb211c80319c".into(),
                "b7ad6b7169203331".into()
            ))
        );
        let only_metadata = parent_context(&HashMap::new(), &metadata);
        assert_eq!(
            ids(&only_metadata).map(|(t, _)| t),
            Some("4bf92f3577b34da6a3ce929d0e0e4736".into())
        );
        // A malformed field falls back to the metadata; nothing valid
        // anywhere is a new trace, not an error.
        fields.insert("Traceparent".to_string(), "00-zz-yy-01".to_string());
        assert_eq!(
            ids(&parent_context(&fields, &metadata)),
            ids(&only_metadata)
        );
        let mut bad = MetadataMap::new();
        bad.insert(TRACEPARENT, "garbage".parse().expect("ascii"));
        assert_eq!(ids(&parent_context(&fields, &bad)), None);
        fields.insert(
            "traceparent".to_string(),
            "00-00000000000000000000000000000000-b7ad6b7169203331-01".to_string(),
        );
        assert_eq!(ids(&parent_context(&fields, &MetadataMap::new())), None);
    }

    #[test]
    fn names_follow_the_destination() {
        let mut req = pb::HandoffRequest {
            target_agent: "writer".into(),
            ..Default::default()
        };
        assert_eq!(send_name(&req), "send writer");
        req.to_barrier = true;
        req.target_agent.clear();
        assert_eq!(send_name(&req), "send barrier");
        req.barrier_id = "join-1".into();
        assert_eq!(send_name(&req), "send barrier join-1");
        req.to_barrier = false;
        req.r#final = true;
        assert_eq!(send_name(&req), "send (final)");
    }

    #[test]
    fn unset_endpoint_starts_nothing() {
        let traces = Traces::start(&Config::default());
        assert!(matches!(traces, Ok(None)), "{traces:?}");
    }
}
