use super::*;

#[tokio::test]
async fn a_gate_lets_through_only_the_scrapes_it_allows() {
    use tower::ServiceExt as _;
    let gate: Gate = Arc::new(|bearer: Option<String>| {
        Box::pin(async move { bearer.as_deref() == Some("good") })
    });
    let router = router(Arc::new(Metrics::default()), Some(gate));
    let scrape = |auth: Option<&'static str>| {
        let mut req = axum::http::Request::get("/metrics");
        if let Some(a) = auth {
            req = req.header(header::AUTHORIZATION, a);
        }
        req.body(axum::body::Body::empty()).expect("request")
    };
    for (auth, status) in [
        (None, StatusCode::UNAUTHORIZED),
        (Some("Bearer bad"), StatusCode::UNAUTHORIZED),
        (Some("Basic good"), StatusCode::UNAUTHORIZED),
        (Some("Bearer good"), StatusCode::OK),
    ] {
        let answer = router.clone().oneshot(scrape(auth)).await.expect("answer");
        assert_eq!(answer.status(), status, "{auth:?}");
    }
}

#[test]
fn renders_counters_by_label_with_total_once() {
    let m = Metrics::default();
    m.accepted("b");
    m.rejected("max_tokens");
    m.rejected("max_tokens");
    m.rejected("decode");
    m.denied("NOT_GRANTED");
    let text = m.render().unwrap();
    assert!(
        text.contains("handoff_handoffs_accepted_total{agent=\"b\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("handoff_contract_rejections_total{rule=\"max_tokens\"} 2\n"),
        "{text}"
    );
    assert!(
        text.contains("handoff_contract_rejections_total{rule=\"decode\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("handoff_access_denied_total{reason=\"NOT_GRANTED\"} 1\n"),
        "{text}"
    );
    assert!(text.contains("handoff_events_dropped_total 0\n"), "{text}");
    assert!(!text.contains("_total_total"), "{text}");
    assert!(text.ends_with("# EOF\n"), "{text}");
}

#[test]
fn every_family_is_described_before_any_value() {
    let text = Metrics::default().render().unwrap();
    for family in [
        "handoff_handoffs_accepted counter",
        "handoff_deliveries counter",
        "handoff_acked counter",
        "handoff_nacked counter",
        "handoff_redelivered counter",
        "handoff_rejected counter",
        "handoff_dead_lettered counter",
        "handoff_contract_rejections counter",
        "handoff_access_denied counter",
        "handoff_events_dropped counter",
        "handoff_handoff_call_seconds histogram",
        "handoff_queue_wait_seconds histogram",
        "handoff_processing_seconds histogram",
        "handoff_barrier_wait_seconds histogram",
        "handoff_barrier_release_seconds histogram",
        "handoff_in_flight gauge",
        "handoff_pending gauge",
        "handoff_dropped_fields counter",
        "handoff_stale_state_reasks counter",
        "handoff_intent_score histogram",
        "handoff_intent_drift counter",
        "handoff_run_handoffs histogram",
        "handoff_tool_result_age_seconds histogram",
        "handoff_stale_tool_results counter",
    ] {
        assert!(
            text.contains(&format!("# TYPE {family}\n")),
            "{family}\n{text}"
        );
    }
}

#[test]
fn label_values_are_cut_escaped_and_folded_past_the_cap() {
    let m = Metrics::default();
    let long = "é".repeat(100); // 200 bytes
    m.stale_tool_result(&long);
    m.stale_tool_result("say \"hi\"\\\nnow");
    let text = m.render().unwrap();
    let cut = "é".repeat(64);
    assert!(
        text.contains(&format!(
            "handoff_stale_tool_results_total{{tool=\"{cut}\"}} 1\n"
        )),
        "{text}"
    );
    assert!(
        text.contains(r#"handoff_stale_tool_results_total{tool="say \"hi\"\\\nnow"} 1"#),
        "{text}"
    );

    for i in 0..MAX_SERIES + 5 {
        m.dropped_field("a", "b", &format!("f{i}"));
    }
    m.dropped_field("a", "b", "f0");
    let text = m.render().unwrap();
    let series = text
        .lines()
        .filter(|l| l.starts_with("handoff_dropped_fields_total{"))
        .count();
    assert_eq!(series, MAX_SERIES + 1, "the cap and one _other series");
    assert!(text.contains(
        "handoff_dropped_fields_total{source=\"_other\",target=\"_other\",field=\"_other\"} 5\n"
    ));
    assert!(
        text.contains("handoff_dropped_fields_total{source=\"a\",target=\"b\",field=\"f0\"} 2\n")
    );
}

#[test]
fn signal_histograms_use_their_buckets() {
    let m = Metrics::default();
    m.intent_score("p", 0.75);
    m.intent_score("p", f64::NAN);
    m.run_resolved("p", "completed", 4);
    m.tool_result_age("web", -3.0);
    let text = m.render().unwrap();
    for (le, n) in [("0.7", 0), ("0.8", 1), ("1.0", 1)] {
        let line = format!("handoff_intent_score_bucket{{le=\"{le}\",pipeline=\"p\"}} {n}\n");
        assert!(text.contains(&line), "{line}\n{text}");
    }
    assert!(
        text.contains("handoff_intent_score_count{pipeline=\"p\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains(
            "handoff_run_handoffs_bucket{le=\"3.0\",pipeline=\"p\",outcome=\"completed\"} 0\n"
        ) && text.contains(
            "handoff_run_handoffs_bucket{le=\"5.0\",pipeline=\"p\",outcome=\"completed\"} 1\n"
        ),
        "{text}"
    );
    assert!(
        text.contains("handoff_tool_result_age_seconds_sum{tool=\"web\"} 0.0\n"),
        "{text}"
    );
}

#[test]
fn targets_name_final_and_barrier_handoffs() {
    assert_eq!(target_label("b", false, false), "b");
    assert_eq!(target_label("", true, false), FINAL);
    assert_eq!(target_label("", false, true), BARRIER);
    assert_eq!(target_label("agg", false, true), "agg");
}
