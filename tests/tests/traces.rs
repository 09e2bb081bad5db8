//! Traces: the broker's `send` spans, collected by an OTLP receiver in the
//! test (a tonic server implementing the collector's `TraceService`), and
//! the W3C context each delivery carries.
//!
//! The tests of this file take turns (a lock): the one with traces off
//! checks that no exporter thread exists in the process, which another
//! test's broker would otherwise start.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use handoff_client::{pb, AgentConfig, Delivery, Handoff, RunConfig};
use handoff_tests::{next_within, note, stack};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        trace_service_server::{TraceService, TraceServiceServer},
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    },
    common::v1::{any_value::Value, KeyValue},
    trace::v1::{span::SpanKind, Span},
};
use tonic::{Request, Response, Status};

/// One test at a time in this file (see the module's doc).
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The caller's own span: trace `CALLER_TRACE`, span `CALLER_SPAN`.
const CALLER_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const CALLER_SPAN: &str = "b7ad6b7169203331";

fn traceparent(trace: &str, span: &str) -> String {
    format!("00-{trace}-{span}-01")
}

/// A span as the collector received it, with its resource's service name.
#[derive(Debug, Clone)]
struct Got {
    service: Option<String>,
    span: Span,
}

impl Got {
    fn name(&self) -> &str {
        &self.span.name
    }
    fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }
    fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }
    fn parent_id(&self) -> String {
        hex(&self.span.parent_span_id)
    }
    fn attr(&self, key: &str) -> Option<String> {
        attr(&self.span.attributes, key)
    }
    /// An integer attribute (none when absent or of another type).
    fn int_attr(&self, key: &str) -> Option<i64> {
        let kv = self.span.attributes.iter().find(|kv| kv.key == key)?;
        match kv.value.as_ref()?.value.as_ref()? {
            Value::IntValue(i) => Some(*i),
            _ => None,
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attr(attributes: &[KeyValue], key: &str) -> Option<String> {
    let value = attributes.iter().find(|kv| kv.key == key)?.value.as_ref()?;
    match value.value.as_ref()? {
        Value::StringValue(s) => Some(s.clone()),
        Value::BoolValue(b) => Some(b.to_string()),
        Value::IntValue(i) => Some(i.to_string()),
        other => Some(format!("{other:?}")),
    }
}

/// The in-process OTLP receiver: keeps every span it is sent.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Got>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut got = Vec::new();
        for resource_spans in req.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .as_ref()
                .and_then(|r| attr(&r.attributes, "service.name"));
            for scope in resource_spans.scope_spans {
                got.extend(scope.spans.into_iter().map(|span| Got {
                    service: service.clone(),
                    span,
                }));
            }
        }
        self.spans.lock().expect("collector lock").extend(got);
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Collector {
    /// Serves the collector on a loopback port; answers its URL.
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the collector");
        let addr = listener.local_addr().expect("collector address");
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        format!("http://{addr}")
    }

    /// The spans received once `done` holds for them; panics after 10 s.
    async fn spans_when(&self, done: impl Fn(&[Got]) -> bool) -> Vec<Got> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let spans = self.spans.lock().expect("collector lock").clone();
            if done(&spans) {
                return spans;
            }
            assert!(
                Instant::now() < deadline,
                "the collector never got the spans; it has {:?}",
                spans.iter().map(Got::name).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Threads of this process that are OpenTelemetry's batch processors
/// (Linux keeps the first 15 bytes of a thread's name).
fn exporter_threads() -> usize {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("OpenTelemetry"))
        .count()
}

/// Waits until no exporter thread is left (a stopped broker's exits once
/// its spans are flushed); panics after 5 s.
async fn exporter_stopped() {
    let deadline = Instant::now() + Duration::from_secs(5);
    while exporter_threads() > 0 {
        assert!(
            Instant::now() < deadline,
            "the exporter thread outlived the broker"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn next(sub: &mut handoff_client::Subscription) -> Delivery {
    next_within(sub, Duration::from_secs(5))
        .await
        .expect("a delivery")
}

#[tokio::test]
async fn one_trace_follows_a_run_from_the_callers_span_through_every_agent() {
    let _turn = TURN.lock().await;
    let collector = Collector::default();
    let endpoint = collector.start().await;
    let (_nats, broker, client) = stack(|c| c.otlp_endpoint = Some(endpoint.clone())).await;
    assert_eq!(exporter_threads(), 1, "the broker's exporter runs");
    for a in ["a", "b", "c"] {
        client.register_agent(AgentConfig::new(a)).await.unwrap();
    }
    let run = client.start_run(RunConfig::new("owner")).await.unwrap();
    let mut subs = HashMap::new();
    for a in ["a", "b", "c"] {
        subs.insert(a, client.subscribe(a, "i1", 1).await.unwrap());
    }

    // owner -> a, in the caller's trace; a -> b; b -> c; c -> final.
    let mut receipts = HashMap::new();
    let first = client
        .handoff(
            Handoff::to(&run.id, "a", &note("ask", 0))
                .unwrap()
                .traceparent(traceparent(CALLER_TRACE, CALLER_SPAN)),
        )
        .await
        .unwrap();
    receipts.insert("send a", first.handoff_id);
    let mut delivered = HashMap::new();
    for (agent, next_agent) in [("a", Some("b")), ("b", Some("c")), ("c", None)] {
        let d = next(subs.get_mut(agent).unwrap()).await;
        delivered.insert(agent, d.traceparent().map(str::to_string));
        let (span_name, handoff) = match next_agent {
            Some("b") => ("send b", Handoff::to("", "b", &note("hop", 1)).unwrap()),
            Some(_) => ("send c", Handoff::to("", "c", &note("hop", 2)).unwrap()),
            None => (
                "send (final)",
                Handoff::final_result("", &note("done", 3)).unwrap(),
            ),
        };
        let r = d.handoff(handoff).await.unwrap();
        receipts.insert(span_name, r.handoff_id);
    }

    // Stopping the broker flushes what its batch processor holds.
    broker.stop().await;
    let spans = collector
        .spans_when(|s| {
            s.iter().filter(|g| g.name().starts_with("send")).count() >= 4
                && s.iter().filter(|g| g.name().starts_with("receive")).count() >= 3
        })
        .await;
    let by_name = |name: &str| -> Got {
        let found: Vec<&Got> = spans.iter().filter(|g| g.name() == name).collect();
        assert_eq!(found.len(), 1, "one span {name:?} in {spans:?}");
        found[0].clone()
    };
    let send_a = by_name("send a");
    let send_b = by_name("send b");
    let send_c = by_name("send c");
    let send_final = by_name("send (final)");

    for s in [&send_a, &send_b, &send_c, &send_final] {
        println!(
            "{:<14} kind {:?} trace {} span {} parent {}",
            s.name(),
            SpanKind::try_from(s.span.kind).unwrap_or(SpanKind::Unspecified),
            s.trace_id(),
            s.span_id(),
            s.parent_id()
        );
    }
    // One trace, the caller's; each send a child of the one before it.
    for s in [&send_a, &send_b, &send_c, &send_final] {
        assert_eq!(s.trace_id(), CALLER_TRACE, "{}", s.name());
        assert_eq!(s.span.kind, SpanKind::Producer as i32, "{}", s.name());
        assert_eq!(s.service.as_deref(), Some("handoffd"));
        assert_eq!(s.attr("messaging.system").as_deref(), Some("handoff"));
        assert_eq!(s.attr("messaging.operation.type").as_deref(), Some("send"));
        assert_eq!(
            s.attr("gen_ai.conversation.id").as_deref(),
            Some(run.id.as_str()),
            "{}",
            s.name()
        );
        assert_eq!(
            s.attr("messaging.message.id").as_ref(),
            Some(&receipts[s.name()]),
            "{}",
            s.name()
        );
        assert_eq!(s.attr("error.type"), None, "{}", s.name());
    }
    // Each delivery is made in a CONSUMER span, a child of its handoff's;
    // the agent's next handoff is that span's child.
    let receive_a = by_name("receive a");
    let receive_b = by_name("receive b");
    let receive_c = by_name("receive c");
    for (receive, agent) in [(&receive_a, "a"), (&receive_b, "b"), (&receive_c, "c")] {
        assert_eq!(receive.trace_id(), CALLER_TRACE);
        assert_eq!(receive.span.kind, SpanKind::Consumer as i32);
        assert_eq!(
            receive.attr("messaging.destination.name").as_deref(),
            Some(agent)
        );
        assert_eq!(receive.int_attr("handoff.attempt"), Some(1));
    }
    assert_eq!(send_a.parent_id(), CALLER_SPAN);
    assert_eq!(receive_a.parent_id(), send_a.span_id());
    assert_eq!(send_b.parent_id(), receive_a.span_id());
    assert_eq!(receive_b.parent_id(), send_b.span_id());
    assert_eq!(send_c.parent_id(), receive_b.span_id());
    assert_eq!(receive_c.parent_id(), send_c.span_id());
    assert_eq!(send_final.parent_id(), receive_c.span_id());
    let ids: std::collections::HashSet<String> = [&send_a, &send_b, &send_c, &send_final]
        .iter()
        .map(|s| s.span_id())
        .collect();
    assert_eq!(ids.len(), 4, "four distinct spans");

    // Who sent each, and to whom: the owner's first send names no agent.
    let agents: Vec<Option<String>> = [&send_a, &send_b, &send_c, &send_final]
        .iter()
        .map(|s| s.attr("gen_ai.agent.name"))
        .collect();
    assert_eq!(
        agents,
        [None, Some("a".into()), Some("b".into()), Some("c".into())]
    );
    let destinations: Vec<Option<String>> = [&send_a, &send_b, &send_c, &send_final]
        .iter()
        .map(|s| s.attr("messaging.destination.name"))
        .collect();
    assert_eq!(
        destinations,
        [Some("a".into()), Some("b".into()), Some("c".into()), None]
    );
    assert_eq!(send_final.attr("handoff.final").as_deref(), Some("true"));
    let depths: Vec<Option<i64>> = [&send_a, &send_b, &send_c]
        .iter()
        .map(|s| s.int_attr("handoff.depth"))
        .collect();
    assert_eq!(depths, [Some(1), Some(2), Some(3)]);

    // Each delivery carried its receive span's context, not the caller's.
    for (agent, consumer) in [("a", &receive_a), ("b", &receive_b), ("c", &receive_c)] {
        assert_eq!(
            delivered[agent].as_deref(),
            Some(traceparent(CALLER_TRACE, &consumer.span_id()).as_str()),
            "the delivery to {agent}"
        );
    }

    exporter_stopped().await;
}

#[tokio::test]
async fn a_traceparent_header_is_continued_and_a_malformed_one_starts_a_new_trace() {
    let _turn = TURN.lock().await;
    let collector = Collector::default();
    let endpoint = collector.start().await;
    let (_nats, broker, client) = stack(|c| c.otlp_endpoint = Some(endpoint.clone())).await;
    client.register_agent(AgentConfig::new("a")).await.unwrap();
    let run = client.start_run(RunConfig::new("owner")).await.unwrap();
    let payload = Handoff::to(&run.id, "a", &note("x", 0))
        .unwrap()
        .request()
        .clone();
    let header_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let header_span = "00f067aa0ba902b7";
    let with_header = |req: pb::HandoffRequest, tp: &str| {
        let mut req = Request::new(req);
        req.metadata_mut()
            .insert("traceparent", tp.parse().expect("ascii"));
        req
    };

    // Only the header: continued.
    let from_header = pb::HandoffRequest {
        idempotency_key: "header".into(),
        ..payload.clone()
    };
    client
        .raw()
        .handoff(with_header(
            from_header,
            &traceparent(header_trace, header_span),
        ))
        .await
        .unwrap();
    // The request's field and the header: the field wins.
    let mut both = pb::HandoffRequest {
        idempotency_key: "both".into(),
        ..payload.clone()
    };
    both.trace_context
        .insert("traceparent".into(), traceparent(CALLER_TRACE, CALLER_SPAN));
    client
        .raw()
        .handoff(with_header(both, &traceparent(header_trace, header_span)))
        .await
        .unwrap();
    // A malformed traceparent is not an error: a new trace.
    let mut malformed = pb::HandoffRequest {
        idempotency_key: "malformed".into(),
        ..payload.clone()
    };
    malformed
        .trace_context
        .insert("traceparent".into(), "00-not-a-trace-01".into());
    client.raw().handoff(malformed).await.unwrap();

    let mut sub = client.subscribe("a", "i1", 3).await.unwrap();
    let mut delivered = Vec::new();
    for _ in 0..3 {
        let d = next(&mut sub).await;
        delivered.push((
            d.envelope().idempotency_key.clone(),
            d.traceparent().map(str::to_string),
        ));
        d.ack().await.unwrap();
    }

    broker.stop().await;
    let spans = collector
        .spans_when(|s| s.iter().filter(|g| g.name() == "send a").count() >= 3)
        .await;
    let of = |trace: &str| -> Vec<&Got> {
        spans
            .iter()
            .filter(|g| g.trace_id() == trace && g.name() == "send a")
            .collect()
    };
    let header = of(header_trace);
    assert_eq!(header.len(), 1, "{spans:?}");
    assert_eq!(header[0].parent_id(), header_span);
    let field = of(CALLER_TRACE);
    assert_eq!(field.len(), 1, "{spans:?}");
    assert_eq!(field[0].parent_id(), CALLER_SPAN);
    let roots: Vec<&Got> = spans
        .iter()
        .filter(|g| g.name() == "send a" && g.span.parent_span_id.is_empty())
        .collect();
    assert_eq!(roots.len(), 1, "{spans:?}");
    let root_trace = roots[0].trace_id();
    assert!(root_trace != header_trace && root_trace != CALLER_TRACE);

    // Every delivery carries the context of its own receive span, in its
    // handoff's trace.
    for (key, tp) in delivered {
        let tp = tp.unwrap_or_else(|| panic!("{key}: no traceparent delivered"));
        let producer = spans
            .iter()
            .find(|g| tp == traceparent(&g.trace_id(), &g.span_id()))
            .unwrap_or_else(|| panic!("{key}: {tp} is no span's context"));
        let expected_trace = match key.as_str() {
            "header" => header_trace.to_string(),
            "both" => CALLER_TRACE.to_string(),
            _ => root_trace.clone(),
        };
        assert_eq!(producer.trace_id(), expected_trace, "{key}");
    }
    exporter_stopped().await;
}

#[tokio::test]
async fn with_no_otlp_endpoint_no_span_is_made_and_no_exporter_runs() {
    let _turn = TURN.lock().await;
    let (_nats, broker, client) = stack(|_| {}).await;
    assert_eq!(exporter_threads(), 0, "no exporter thread");
    client.register_agent(AgentConfig::new("a")).await.unwrap();
    let run = client.start_run(RunConfig::new("owner")).await.unwrap();
    let caller = traceparent(CALLER_TRACE, CALLER_SPAN);
    client
        .handoff(
            Handoff::to(&run.id, "a", &note("x", 0))
                .unwrap()
                .traceparent(caller.clone()),
        )
        .await
        .unwrap();
    let mut sub = client.subscribe("a", "i1", 1).await.unwrap();
    let d = next(&mut sub).await;
    // Passed through as sent: no send span took its place.
    assert_eq!(d.traceparent(), Some(caller.as_str()));
    assert_eq!(d.trace_context().len(), 1);
    d.ack().await.unwrap();
    assert_eq!(exporter_threads(), 0, "no exporter thread");
    broker.stop().await;
}

#[tokio::test]
async fn a_malformed_otlp_endpoint_exits_64_naming_the_key() {
    const BIN: &str = env!("CARGO_BIN_EXE_handoffd-under-test");
    for (flag, env) in [
        (Some("grpc://127.0.0.1:4317"), None),
        (None, Some("127.0.0.1:4317")),
    ] {
        let mut cmd = tokio::process::Command::new(BIN);
        cmd.env("HANDOFF_CONSOLE_LISTEN", "").args([
            "--listen",
            "127.0.0.1:0",
            "--nats-url",
            "nats://127.0.0.1:4222",
        ]);
        if let Some(url) = flag {
            cmd.args(["--otlp-endpoint", url]);
        }
        if let Some(url) = env {
            cmd.env("HANDOFF_OTLP_ENDPOINT", url);
        }
        let out = cmd.output().await.unwrap();
        assert_eq!(out.status.code(), Some(64), "{flag:?} {env:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("otlp_endpoint"), "{err}");
    }
}
