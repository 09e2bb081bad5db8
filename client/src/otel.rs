//! OpenTelemetry spans made by the SDK, with the cargo feature `otel`
//! (without it, none, and nothing here costs anything).
//!
//! The spans go to the tracer provider the application installed globally
//! (`opentelemetry::global::set_tracer_provider`), under the tracer
//! `handoff-client`:
//!
//! - a CLIENT span `handoff <target>` (`handoff (final)`, `handoff barrier
//!   <id>`, `fan-out <barrier>`) around each call that hands off, a child
//!   of the trace context the request carries, else of the current
//!   context; the request carries the span's own context, so the broker's
//!   `send` span is its child;
//! - a CONSUMER span `process <agent>` for each delivery, from its arrival
//!   until the delivery (and every clone of it) is dropped, a child of the
//!   context the delivery carries; the handoffs made from the delivery
//!   continue it.
//!
//! Contexts travel as W3C `traceparent` / `tracestate` fields.

use std::collections::HashMap;

use handoff_proto::pb;

use crate::handoff::{TRACEPARENT, TRACESTATE};

/// A span the SDK made (empty without the `otel` feature, or when the
/// application installed no tracer provider).
#[derive(Default)]
pub(crate) struct SdkSpan {
    #[cfg(feature = "otel")]
    cx: Option<opentelemetry::Context>,
}

impl std::fmt::Debug for SdkSpan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SdkSpan").finish_non_exhaustive()
    }
}

impl SdkSpan {
    /// The CONSUMER span of `delivery`, received by `agent`.
    pub(crate) fn process(agent: &str, delivery: &pb::Delivery) -> SdkSpan {
        #[cfg(feature = "otel")]
        {
            let Some(h) = delivery.handoff.as_ref() else {
                return SdkSpan::default();
            };
            let attributes = vec![
                opentelemetry::KeyValue::new("messaging.system", "handoff"),
                opentelemetry::KeyValue::new("messaging.operation.type", "process"),
                opentelemetry::KeyValue::new("messaging.destination.name", agent.to_string()),
                opentelemetry::KeyValue::new("messaging.message.id", h.id.clone()),
                opentelemetry::KeyValue::new("gen_ai.agent.name", agent.to_string()),
                opentelemetry::KeyValue::new("gen_ai.conversation.id", h.run_id.clone()),
                opentelemetry::KeyValue::new("handoff.attempt", i64::from(delivery.attempt)),
            ];
            on::start(
                format!("process {agent}"),
                opentelemetry::trace::SpanKind::Consumer,
                on::extract(&h.trace_context),
                attributes,
            )
        }
        #[cfg(not(feature = "otel"))]
        {
            let _ = (agent, delivery);
            SdkSpan::default()
        }
    }

    /// The CLIENT span of a call named `name` in run `run_id` whose
    /// request carries `fields`: a child of them when they name a
    /// `traceparent`, else of the current context. Its own context is
    /// written into `fields`.
    pub(crate) fn call(
        name: String,
        run_id: &str,
        fields: &mut HashMap<String, String>,
    ) -> SdkSpan {
        #[cfg(feature = "otel")]
        {
            let parent = on::extract(fields);
            let attributes = vec![
                opentelemetry::KeyValue::new("messaging.system", "handoff"),
                opentelemetry::KeyValue::new("messaging.operation.type", "send"),
                opentelemetry::KeyValue::new("gen_ai.conversation.id", run_id.to_string()),
            ];
            let span = on::start(
                name,
                opentelemetry::trace::SpanKind::Client,
                parent,
                attributes,
            );
            span.inject(fields);
            span
        }
        #[cfg(not(feature = "otel"))]
        {
            let _ = (name, run_id, fields);
            SdkSpan::default()
        }
    }

    /// Writes this span's context into `fields` (replacing their W3C
    /// fields); `false`, leaving them as they are, when it has none.
    pub(crate) fn inject(&self, fields: &mut HashMap<String, String>) -> bool {
        #[cfg(feature = "otel")]
        if let Some(cx) = &self.cx {
            use opentelemetry::trace::TraceContextExt as _;
            let span = cx.span();
            let sc = span.span_context();
            if sc.is_valid() {
                fields.retain(|k, _| {
                    !k.eq_ignore_ascii_case(TRACEPARENT) && !k.eq_ignore_ascii_case(TRACESTATE)
                });
                fields.insert(
                    TRACEPARENT.to_string(),
                    format!(
                        "00-{}-{}-{:02x}",
                        sc.trace_id(),
                        sc.span_id(),
                        sc.trace_flags().to_u8()
                    ),
                );
                let state = sc.trace_state().header();
                if !state.is_empty() {
                    fields.insert(TRACESTATE.to_string(), state);
                }
                return true;
            }
        }
        let _ = (fields, TRACEPARENT, TRACESTATE);
        false
    }

    /// Ends the span with the outcome of its call: an error sets status
    /// ERROR with the error's reason.
    pub(crate) fn end<T>(self, outcome: &crate::Result<T>) {
        #[cfg(feature = "otel")]
        if let (Some(cx), Err(e)) = (&self.cx, outcome) {
            use opentelemetry::trace::TraceContextExt as _;
            let span = cx.span();
            let reason = e.reason().unwrap_or("").to_string();
            span.set_attribute(opentelemetry::KeyValue::new("error.type", reason));
            span.set_status(opentelemetry::trace::Status::error(e.to_string()));
        }
        let _ = outcome;
    }
}

#[cfg(feature = "otel")]
mod on {
    use std::collections::HashMap;

    use opentelemetry::{
        trace::{
            SpanContext, SpanId, SpanKind, TraceContextExt as _, TraceFlags, TraceId, TraceState,
            Tracer as _,
        },
        Context, KeyValue,
    };

    use super::{SdkSpan, TRACEPARENT, TRACESTATE};

    /// Starts a span under the global tracer provider.
    pub(super) fn start(
        name: String,
        kind: SpanKind,
        parent: Option<Context>,
        attributes: Vec<KeyValue>,
    ) -> SdkSpan {
        let tracer = opentelemetry::global::tracer("handoff-client");
        let parent = parent.unwrap_or_else(Context::current);
        let span = tracer
            .span_builder(name)
            .with_kind(kind)
            .with_attributes(attributes)
            .start_with_context(&tracer, &parent);
        SdkSpan {
            cx: Some(parent.with_span(span)),
        }
    }

    /// The remote context W3C `fields` name (`None`: no valid
    /// `traceparent`).
    pub(super) fn extract(fields: &HashMap<String, String>) -> Option<Context> {
        let get = |key: &str| {
            fields
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(key))
                .map(|(_, v)| v.trim())
        };
        let parts: Vec<&str> = get(TRACEPARENT)?.split('-').collect();
        let [version, trace, span, flags] = parts.as_slice() else {
            return None;
        };
        if version.len() != 2 || *version == "ff" || trace.len() != 32 || span.len() != 16 {
            return None;
        }
        let trace = TraceId::from_hex(trace).ok()?;
        let span = SpanId::from_hex(span).ok()?;
        let flags = u8::from_str_radix(flags, 16).ok()?;
        let state = get(TRACESTATE)
            .and_then(|s| s.parse::<TraceState>().ok())
            .unwrap_or_default();
        let sc = SpanContext::new(trace, span, TraceFlags::new(flags & 1), true, state);
        sc.is_valid()
            .then(|| Context::new().with_remote_span_context(sc))
    }
}
