use super::*;

#[test]
fn defaults_parse() {
    let c = Config::default();
    assert_eq!(c.listen.port(), 7233);
    assert!(c.nats_url.is_none());
    assert_eq!(c.default_max_depth, 5);
}

#[test]
fn every_problem_is_reported() {
    let mut v = BTreeMap::new();
    v.insert("listen".into(), "nowhere".into());
    v.insert("default_lease".into(), "soon".into());
    v.insert("replicas".into(), "0".into());
    v.insert("colour".into(), "blue".into());
    let problems = Config::from_layers(&v).expect_err("bad config");
    assert_eq!(problems.len(), 4, "{problems:?}");
}

#[test]
fn no_auth_is_refused_off_loopback_unless_insecure() {
    let mut v = BTreeMap::new();
    v.insert("listen".into(), "0.0.0.0:7233".into());
    let problems = Config::from_layers(&v).expect_err("refused");
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains("0.0.0.0:7233"), "{problems:?}");

    v.insert("insecure".into(), "true".into());
    let c = Config::from_layers(&v).expect("insecure serves");
    assert!(c.insecure && !c.auth_configured());

    v.remove("insecure");
    v.insert(
        "auth_token_file".into(),
        "/run/credentials/x/auth-token".into(),
    );
    let problems = Config::from_layers(&v).expect_err("bearer tokens in clear");
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains("TLS"), "{problems:?}");
    v.insert("tls_cert".into(), "/etc/handoffd/cert.pem".into());
    v.insert("tls_key".into(), "/etc/handoffd/key.pem".into());
    let c = Config::from_layers(&v).expect("auth configured, over TLS");
    assert!(c.auth_configured());

    // The metrics endpoint off loopback: scrapes present tokens in
    // clear, so only with insecure (and never without auth).
    v.insert("metrics_listen".into(), "0.0.0.0:9464".into());
    let problems = Config::from_layers(&v).expect_err("metrics in clear");
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains("metrics_listen"), "{problems:?}");
    v.insert("insecure".into(), "true".into());
    Config::from_layers(&v).expect("insecure metrics with auth");
    v.remove("auth_token_file");
    v.remove("tls_cert");
    v.remove("tls_key");
    let problems = Config::from_layers(&v).expect_err("metrics without auth");
    assert_eq!(problems.len(), 1, "{problems:?}");
    v.remove("insecure");

    let c = Config::default();
    assert!(c.listen.ip().is_loopback() && !c.auth_configured() && !c.insecure);
}

#[test]
fn tls_and_nats_credentials_are_checked_together() {
    let mut v = BTreeMap::new();
    v.insert("nats_url".into(), "tls://nats-1:4222".into());
    v.insert("tls_cert".into(), "/etc/handoffd/cert.pem".into());
    v.insert("tls_client_ca".into(), "/etc/handoffd/ca.pem".into());
    v.insert("nats_user".into(), "handoffd".into());
    v.insert("nats_token_file".into(), "/run/t".into());
    v.insert("nats_tls_key".into(), "/run/k".into());
    v.insert("insecure".into(), "maybe".into());
    let problems = Config::from_layers(&v).expect_err("bad config");
    // tls_cert without tls_key, tls_client_ca without TLS, user without
    // password, two ways to authenticate, nats_tls_key without its
    // certificate, and the bad bool.
    assert_eq!(problems.len(), 6, "{problems:?}");

    let mut v = BTreeMap::new();
    v.insert("nats_url".into(), "tls://nats-1:4222".into());
    v.insert("tls_cert".into(), "/c".into());
    v.insert("tls_key".into(), "/k".into());
    v.insert("tls_client_ca".into(), "/ca".into());
    v.insert("nats_user".into(), "handoffd".into());
    v.insert("nats_password_file".into(), "/p".into());
    let c = Config::from_layers(&v).expect("valid");
    assert!(c.auth_configured());
    assert_eq!(c.tls.map(|t| t.key), Some(PathBuf::from("/k")));
    assert_eq!(c.nats_auth.user.as_deref(), Some("handoffd"));

    v.remove("nats_url");
    let problems = Config::from_layers(&v).expect_err("embedded takes no credentials");
    assert_eq!(problems.len(), 1, "{problems:?}");
}

#[test]
fn nats_url_takes_a_list_and_names_a_bad_entry() {
    let mut v = BTreeMap::new();
    v.insert(
        "nats_url".into(),
        "tls://nats-1:4222, tls://nats-2:4222,nats-3:4222".into(),
    );
    let c = Config::from_layers(&v).expect("a list of three");
    let servers = nats_servers(c.nats_url.as_deref().unwrap_or_default()).expect("parses");
    assert_eq!(servers.len(), 3);
    assert!(servers[0].tls_required() && !servers[2].tls_required());
    assert_eq!(servers[2].port(), 4222);

    for (bad, named) in [
        ("nats://a:4222,nats://b:port", "nats://b:port"),
        ("nats://a:4222,,nats://b:4222", "empty entry"),
        ("http://a:4222", "http://a:4222"),
    ] {
        v.insert("nats_url".into(), bad.into());
        let problems = Config::from_layers(&v).expect_err(bad);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with("nats_url: ") && problems[0].contains(named),
            "{problems:?}"
        );
    }
}

#[test]
fn pipeline_judges_parse_and_refuse_what_is_malformed() {
    let j = pipeline_judges("travel=judge:0.7, support = qa : 0.5").expect("parses");
    assert_eq!(j.get("travel"), Some(&("judge".to_string(), 0.7)));
    assert_eq!(j.get("support"), Some(&("qa".to_string(), 0.5)));
    assert!(pipeline_judges("").expect("empty").is_empty());
    for bad in [
        "travel",
        "travel=judge",
        "travel=judge:2",
        "a.b=judge:0.5",
        "t=j:0.1,t=k:0.2",
    ] {
        assert!(pipeline_judges(bad).is_err(), "{bad}");
    }
}

#[test]
fn otlp_endpoint_is_off_by_default_and_a_malformed_one_is_named() {
    assert!(Config::default().otlp_endpoint.is_none());
    let mut v = BTreeMap::new();
    for good in [
        "http://127.0.0.1:4317",
        "https://collector.example:4317",
        "http://[::1]:4317/",
    ] {
        v.insert("otlp_endpoint".into(), good.into());
        let c = Config::from_layers(&v).expect(good);
        assert_eq!(c.otlp_endpoint.as_deref(), Some(good));
    }
    for bad in [
        "127.0.0.1:4317",
        "grpc://127.0.0.1:4317",
        "http://",
        "http://127.0.0.1:4317/v1/traces",
        "http://exa mple:4317",
    ] {
        v.insert("otlp_endpoint".into(), bad.into());
        let problems = Config::from_layers(&v).expect_err(bad);
        assert_eq!(problems.len(), 1, "{bad}: {problems:?}");
        assert!(problems[0].starts_with("otlp_endpoint: "), "{problems:?}");
    }
    let got = Config::read_env(|k| {
        (k == "HANDOFF_OTLP_ENDPOINT").then(|| "http://127.0.0.1:4317".to_string())
    });
    assert_eq!(
        got.get("otlp_endpoint").map(String::as_str),
        Some("http://127.0.0.1:4317")
    );
}

#[test]
fn env_names() {
    assert_eq!(env_var("nats_url"), "HANDOFF_NATS_URL");
    let got = Config::read_env(|k| (k == "HANDOFF_LISTEN").then(|| "127.0.0.1:1".to_string()));
    assert_eq!(got.get("listen").map(String::as_str), Some("127.0.0.1:1"));
}
