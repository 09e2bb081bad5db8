//! The metrics endpoint: exact values by label after a known sequence of
//! handoffs, deliveries, settlements, a refusal, a dead letter and a
//! fan-in; every family described; HTTP behaviour (404, concurrent
//! scrapes, a request split across reads, keep-alive); and the Grafana
//! dashboard, whose every query names only series the broker exposes.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    time::{Duration, Instant, SystemTime},
};

use handoff_client::{pb, AgentConfig, Client, ContractSpec, ErrorKind, Handoff, RunConfig};
use handoff_tests::{
    compile_proto, http_exchange, http_get, next_within, note, scrape_parsed, stack, Exposition,
    Note,
};

const NOTE_PROTO: &str =
    "syntax = \"proto3\";\npackage handoff.test;\nmessage Note { string text = 1; uint32 n = 2; }\n";

/// Every family the broker exposes, with its type.
const FAMILIES: &[(&str, &str)] = &[
    ("handoff_handoffs_accepted", "counter"),
    ("handoff_deliveries", "counter"),
    ("handoff_acked", "counter"),
    ("handoff_nacked", "counter"),
    ("handoff_redelivered", "counter"),
    ("handoff_rejected", "counter"),
    ("handoff_dead_lettered", "counter"),
    ("handoff_contract_rejections", "counter"),
    ("handoff_access_denied", "counter"),
    ("handoff_unauthenticated", "counter"),
    ("handoff_access_denied_unrecorded", "counter"),
    ("handoff_events_dropped", "counter"),
    ("handoff_handoff_call_seconds", "histogram"),
    ("handoff_queue_wait_seconds", "histogram"),
    ("handoff_processing_seconds", "histogram"),
    ("handoff_barrier_wait_seconds", "histogram"),
    ("handoff_barrier_release_seconds", "histogram"),
    ("handoff_in_flight", "gauge"),
    ("handoff_pending", "gauge"),
    ("handoff_store_bytes", "gauge"),
    ("handoff_store_messages", "gauge"),
    ("handoff_store_limit_bytes", "gauge"),
    ("handoff_dropped_fields", "counter"),
    ("handoff_stale_state_reasks", "counter"),
    ("handoff_intent_score", "histogram"),
    ("handoff_intent_drift", "counter"),
    ("handoff_run_handoffs", "histogram"),
    ("handoff_tool_result_age_seconds", "histogram"),
    ("handoff_stale_tool_results", "counter"),
];

/// Scrapes until `done` holds (or 15 s pass), and returns the last
/// scrape: the caller then asserts exact values on it.
async fn settle_on(addr: SocketAddr, done: impl Fn(&Exposition) -> bool) -> Exposition {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let e = scrape_parsed(addr).await;
        if done(&e) || Instant::now() > deadline {
            return e;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn agent(name: &str) -> [(&'static str, &str); 1] {
    [("agent", name)]
}

async fn start_run(client: &Client, id: &str) {
    client
        .start_run(RunConfig::new("owner").id(id))
        .await
        .expect("start run");
}

#[tokio::test]
async fn a_known_sequence_is_counted_exactly_by_label() {
    let (_nats, broker, client) = stack(|c| {
        c.metrics_listen = Some("127.0.0.1:0".parse().expect("addr"));
    })
    .await;
    let addr = broker.metrics_addr.expect("the metrics endpoint's address");

    // Before anything: every family is described, and nothing counted.
    let first = scrape_parsed(addr).await;
    assert!(first.eof, "OpenMetrics ends with # EOF");
    for (name, kind) in FAMILIES {
        let family = first
            .families
            .get(*name)
            .unwrap_or_else(|| panic!("{name} is not described"));
        assert_eq!(family.kind, *kind, "{name}");
        assert!(
            family.help.as_deref().is_some_and(|h| !h.is_empty()),
            "{name}"
        );
    }
    assert_eq!(first.get("handoff_events_dropped_total", &[]), Some(0.0));
    // What each stream and bucket holds, and its limit, as JetStream has
    // it (read when the broker starts, then every 15 s).
    let inbox = [("stream", "HANDOFF_INBOX")];
    let events = [("stream", "HANDOFF_EVENTS")];
    let usage = settle_on(addr, |e| {
        e.get("handoff_store_limit_bytes", &events).is_some()
    })
    .await;
    let defaults = handoffd::Config::default();
    assert_eq!(
        usage.get("handoff_store_limit_bytes", &inbox),
        Some(defaults.stream_max_bytes as f64)
    );
    assert_eq!(
        usage.get("handoff_store_limit_bytes", &events),
        Some(defaults.events_max_bytes as f64)
    );
    assert_eq!(usage.get("handoff_store_messages", &inbox), Some(0.0));
    assert!(usage
        .get("handoff_store_bytes", &[("stream", "KV_handoff_keys")])
        .is_some_and(|b| b > 0.0));

    // Agent t accepts Note, whose tool results must be under a minute old.
    let fds = compile_proto(&[("note.proto", NOTE_PROTO)]);
    client
        .register_contract(
            ContractSpec::of::<Note>(fds).max_tool_result_age(Duration::from_secs(60)),
        )
        .await
        .unwrap();
    client
        .register_agent(AgentConfig::new("t").accepts::<Note>())
        .await
        .unwrap();
    client
        .register_agent(AgentConfig::new("worker").emits_type("handoff.test.Note"))
        .await
        .unwrap();
    client
        .register_agent(AgentConfig::new("agg"))
        .await
        .unwrap();
    client
        .register_agent(
            AgentConfig::new("b")
                .max_attempts(5)
                .lease(Duration::from_secs(60)),
        )
        .await
        .unwrap();
    client
        .register_agent(AgentConfig::new("d").max_attempts(1))
        .await
        .unwrap();
    for run in ["m1", "m2", "m3", "m4", "m5"] {
        start_run(&client, run).await;
    }

    // Three handoffs to b (two in m1, one in m2); b takes one at a time.
    let mut b = client.subscribe("b", "b1", 1).await.unwrap();
    let mut ids = Vec::new();
    for (run, n) in [("m1", 1), ("m1", 2), ("m2", 3)] {
        let r = client
            .handoff(Handoff::to(run, "b", &note("for b", n)).unwrap())
            .await
            .unwrap();
        ids.push(r.handoff_id);
    }
    let d1 = next_within(&mut b, Duration::from_secs(5))
        .await
        .expect("first delivery");
    assert_eq!(d1.handoff_id(), ids[0], "the inbox delivers in order");
    // One held, two waiting: the gauges say so (the backlog is read every
    // few seconds).
    let held = settle_on(addr, |e| {
        e.get("handoff_pending", &agent("b")) == Some(2.0)
            && e.get("handoff_in_flight", &agent("b")) == Some(1.0)
    })
    .await;
    assert_eq!(held.get("handoff_pending", &agent("b")), Some(2.0));
    assert_eq!(held.get("handoff_in_flight", &agent("b")), Some(1.0));
    d1.ack().await.unwrap();

    // The second is nacked once, then acked; the third rejected.
    let mut settled = 0;
    while settled < 3 {
        let d = next_within(&mut b, Duration::from_secs(10))
            .await
            .expect("a delivery to b");
        match (d.handoff_id() == ids[1], d.attempt()) {
            (true, 1) => d.nack(None).await.unwrap(),
            (true, 2) => d.ack().await.unwrap(),
            (false, 1) if d.handoff_id() == ids[2] => d.reject("cannot").await.unwrap(),
            other => panic!("unexpected delivery {other:?} of {}", d.handoff_id()),
        }
        settled += 1;
    }

    // A dead letter: d has one attempt, and nacks it.
    let mut dsub = client.subscribe("d", "d1", 1).await.unwrap();
    client
        .handoff(Handoff::to("m3", "d", &note("for d", 4)).unwrap())
        .await
        .unwrap();
    let dd = next_within(&mut dsub, Duration::from_secs(5))
        .await
        .expect("delivery to d");
    dd.nack(None).await.unwrap();

    // A contract refusal by max_tool_result_age, and a fresh tool result
    // accepted.
    let stale = Handoff::to("m4", "t", &note("stale", 5))
        .unwrap()
        .tool_result(
            "web_search",
            SystemTime::now() - Duration::from_secs(3600),
            &note("hit", 1),
        )
        .unwrap();
    let err = client
        .handoff(stale)
        .await
        .expect_err("a stale tool result");
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    let fresh = Handoff::to("m4", "t", &note("fresh", 6))
        .unwrap()
        .tool_result(
            "calc",
            SystemTime::now() - Duration::from_secs(5),
            &note("hit", 2),
        )
        .unwrap();
    client.handoff(fresh).await.unwrap();

    // A fan-in of two branches, released to agg.
    client
        .raw()
        .open_barrier(pb::OpenBarrierRequest {
            barrier: Some(pb::BarrierSpec {
                run_id: "m5".into(),
                barrier_id: "join".into(),
                branch_keys: vec!["k1".into(), "k2".into()],
                mode: pb::BarrierMode::All as i32,
                target_agent: "agg".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    for (key, n) in [("k1", 7), ("k2", 8)] {
        client
            .handoff(
                Handoff::to_barrier("m5", "join", key, &note("branch", n))
                    .unwrap()
                    .from_agent("worker"),
            )
            .await
            .unwrap();
    }

    // The run's result.
    client
        .handoff(Handoff::final_result("m1", &note("done", 9)).unwrap())
        .await
        .unwrap();

    let e = settle_on(addr, |e| {
        e.value("handoff_dead_lettered_total", &agent("d")) >= 1.0
            && e.value("handoff_rejected_total", &agent("b")) >= 1.0
            && e.value("handoff_deliveries_total", &agent("b")) >= 4.0
            && e.value("handoff_barrier_wait_seconds_count", &agent("agg")) >= 1.0
    })
    .await;

    // Counters by target agent.
    for (name, who, n) in [
        ("handoff_handoffs_accepted_total", "b", 3.0),
        ("handoff_handoffs_accepted_total", "d", 1.0),
        ("handoff_handoffs_accepted_total", "t", 1.0),
        ("handoff_handoffs_accepted_total", "_barrier", 2.0),
        ("handoff_handoffs_accepted_total", "_final", 1.0),
        ("handoff_deliveries_total", "b", 4.0),
        ("handoff_redelivered_total", "b", 1.0),
        ("handoff_acked_total", "b", 2.0),
        ("handoff_nacked_total", "b", 1.0),
        ("handoff_rejected_total", "b", 1.0),
        ("handoff_dead_lettered_total", "b", 0.0),
        ("handoff_deliveries_total", "d", 1.0),
        ("handoff_nacked_total", "d", 1.0),
        ("handoff_acked_total", "d", 0.0),
        ("handoff_dead_lettered_total", "d", 1.0),
        // Histogram counts: one per call, first delivery, settlement.
        ("handoff_handoff_call_seconds_count", "b", 3.0),
        ("handoff_handoff_call_seconds_count", "_barrier", 2.0),
        ("handoff_handoff_call_seconds_count", "_final", 1.0),
        ("handoff_queue_wait_seconds_count", "b", 3.0),
        ("handoff_processing_seconds_count", "b", 4.0),
        ("handoff_processing_seconds_count", "d", 1.0),
        ("handoff_barrier_wait_seconds_count", "agg", 1.0),
        ("handoff_barrier_release_seconds_count", "agg", 1.0),
        // Nothing held once everything is settled.
        ("handoff_in_flight", "b", 0.0),
        ("handoff_in_flight", "d", 0.0),
    ] {
        assert_eq!(e.value(name, &agent(who)), n, "{name}{{agent={who:?}}}");
    }
    // The refused handoff: no call latency, not accepted, but counted by
    // rule and by tool; the accepted one's tool result age (5 s old).
    assert_eq!(
        e.value("handoff_handoff_call_seconds_count", &agent("t")),
        1.0
    );
    assert_eq!(
        e.get(
            "handoff_contract_rejections_total",
            &[("rule", "tool_result_age")]
        ),
        Some(1.0)
    );
    assert_eq!(
        e.get(
            "handoff_stale_tool_results_total",
            &[("tool", "web_search")]
        ),
        Some(1.0)
    );
    assert_eq!(
        e.get("handoff_tool_result_age_seconds_count", &[("tool", "calc")]),
        Some(1.0)
    );
    let age = e
        .get("handoff_tool_result_age_seconds_sum", &[("tool", "calc")])
        .expect("age sum");
    assert!((5.0..60.0).contains(&age), "{age}");
    assert_eq!(
        e.get(
            "handoff_tool_result_age_seconds_bucket",
            &[("tool", "calc"), ("le", "1.0")]
        ),
        Some(0.0)
    );
    assert_eq!(
        e.get(
            "handoff_tool_result_age_seconds_bucket",
            &[("tool", "calc"), ("le", "60.0")]
        ),
        Some(1.0)
    );
    assert!(e
        .series("handoff_tool_result_age_seconds_count")
        .iter()
        .all(|s| s.labels.get("tool").map(String::as_str) == Some("calc")));
    assert_eq!(e.get("handoff_events_dropped_total", &[]), Some(0.0));
    // A histogram's buckets are cumulative and end at its count.
    let processed = e.value("handoff_processing_seconds_count", &agent("b"));
    assert_eq!(
        e.get(
            "handoff_processing_seconds_bucket",
            &[("agent", "b"), ("le", "+Inf")]
        ),
        Some(processed)
    );

    // The backlog drains to nothing (read again within a few seconds).
    let drained = settle_on(addr, |e| e.get("handoff_pending", &agent("b")) == Some(0.0)).await;
    assert_eq!(drained.get("handoff_pending", &agent("b")), Some(0.0));

    // Never a run id, in any label.
    for s in &e.samples {
        assert!(!s.labels.contains_key("run_id"), "{s:?}");
        for v in s.labels.values() {
            assert!(
                !["m1", "m2", "m3", "m4", "m5"].contains(&v.as_str()),
                "{s:?}"
            );
        }
    }
    broker.stop().await;
}

#[tokio::test]
async fn the_endpoint_is_http_404_elsewhere_concurrent_split_and_kept_alive() {
    let (_nats, broker, _client) = stack(|c| {
        c.metrics_listen = Some("127.0.0.1:0".parse().expect("addr"));
    })
    .await;
    let addr = broker.metrics_addr.expect("the metrics endpoint's address");

    assert_eq!(http_get(addr, "/nope").await.status, 404);
    assert_eq!(http_get(addr, "/").await.status, 404);

    // Two scrapes at once both succeed and parse.
    let (a, b) = tokio::join!(http_get(addr, "/metrics"), http_get(addr, "/metrics"));
    for r in [&a, &b] {
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(
            r.content_type.as_deref(),
            Some(handoffd::metrics::CONTENT_TYPE)
        );
        let parsed = Exposition::parse(&r.body).expect("parses");
        assert_eq!(parsed.families.len(), FAMILIES.len());
    }

    // A request split across reads, then a second one on the same
    // connection.
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    let split = http_exchange(
        &mut socket,
        &[
            b"GET /met",
            b"rics HTTP/1.1\r\nhost: local",
            b"host\r\n\r\n",
        ],
    )
    .await;
    assert_eq!(split.status, 200);
    assert!(Exposition::parse(&split.body).expect("parses").eof);
    let again = http_exchange(
        &mut socket,
        &[b"GET /nope HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n"],
    )
    .await;
    assert_eq!(again.status, 404, "the connection was kept alive");
    broker.stop().await;
}

#[tokio::test]
async fn without_metrics_listen_there_is_no_endpoint() {
    let (_nats, broker, _client) = stack(|_| {}).await;
    assert_eq!(broker.metrics_addr, None);
    broker.stop().await;
}

#[test]
fn the_parser_reads_labels_escapes_and_families() {
    let text =
        "# HELP x_total Things.\n# TYPE x counter\nx_total{a=\"1\",b=\"q\\\"u\\\\o\\nte\"} 3\n\
                # TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_count 2\nh_sum 0.5\n# EOF\n";
    let e = Exposition::parse(text).unwrap();
    assert_eq!(
        e.get("x_total", &[("a", "1"), ("b", "q\"u\\o\nte")]),
        Some(3.0)
    );
    assert_eq!(e.get("h_bucket", &[("le", "+Inf")]), Some(2.0));
    assert_eq!(e.family_of("h_sum"), Some("h"));
    assert!(e.eof);
    assert!(Exposition::parse("y 1\n").is_err(), "a sample of no family");
    assert!(Exposition::parse("# TYPE y gauge\ny{a=\"1} 1\n").is_err());
    assert!(Exposition::parse("# EOF\n# TYPE y gauge\n").is_err());
}

// ------------------------------------------------------------ dashboard

/// Every PromQL expression of a dashboard's panels (rows' nested panels
/// included), with its panel's title and datasource uid.
fn queries(panels: &[serde_json::Value], out: &mut Vec<(String, String, String)>) {
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or("").to_string();
        if let Some(nested) = panel["panels"].as_array() {
            queries(nested, out);
        }
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap_or("").to_string();
            let ds = target["datasource"]["uid"]
                .as_str()
                .or_else(|| panel["datasource"]["uid"].as_str())
                .unwrap_or("")
                .to_string();
            out.push((title.clone(), expr, ds));
        }
    }
}

/// The series names a PromQL expression reads (`handoff_...` words).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("handoff_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

#[test]
fn the_dashboard_queries_only_series_the_broker_exposes() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana/handoff.json"
    );
    let text = std::fs::read_to_string(path).expect("deploy/grafana/handoff.json");
    let dash: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");

    // What the broker exposes, from its own registry: family names and the
    // sample names each gives (counters' _total, histograms' parts).
    let m = handoffd::metrics::Metrics::default();
    let exposed = Exposition::parse(&m.render().expect("renders")).expect("parses");
    let mut names = BTreeSet::new();
    for (family, f) in &exposed.families {
        let suffixes: &[&str] = match f.kind.as_str() {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            _ => &[""],
        };
        for s in suffixes {
            names.insert(format!("{family}{s}"));
        }
    }

    assert!(
        dash["schemaVersion"].as_u64().is_some_and(|v| v >= 36),
        "a Grafana 10+ schema"
    );
    let inputs = dash["__inputs"].as_array().expect("__inputs");
    assert!(inputs.iter().any(|i| i["name"] == "DS_PROMETHEUS"));

    let mut all = Vec::new();
    queries(dash["panels"].as_array().expect("panels"), &mut all);
    assert!(all.len() >= 20, "{} queries", all.len());
    let mut used = BTreeSet::new();
    for (title, expr, ds) in &all {
        assert_eq!(ds, "${DS_PROMETHEUS}", "panel {title:?}");
        let read = metric_names(expr);
        assert!(
            !read.is_empty(),
            "panel {title:?} reads no handoff series: {expr}"
        );
        for name in read {
            assert!(
                names.contains(&name),
                "panel {title:?} reads {name}, which the broker does not expose"
            );
            used.insert(name);
        }
        assert!(!expr.contains("run_id"), "panel {title:?} groups by run");
    }
    // Every family is on the dashboard.
    for family in exposed.families.keys() {
        assert!(
            used.iter().any(|u| u.starts_with(family.as_str())),
            "{family} is on no panel"
        );
    }
    // The rows.
    let rows: Vec<&str> = dash["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["type"] == "row")
        .filter_map(|p| p["title"].as_str())
        .collect();
    for row in [
        "Throughput",
        "Latency",
        "Backlog",
        "Barriers",
        "Contract rejections",
        "Signals",
    ] {
        assert!(
            rows.iter().any(|r| r.starts_with(row)),
            "row {row}: {rows:?}"
        );
    }
}
