//! Transport security: TLS and mTLS to clients, the principal a client
//! certificate names, the broker's credentials and TLS to NATS, the
//! password of the embedded nats-server, and the refusal to serve
//! unauthenticated off loopback.
//!
//! Certificates are generated here (rcgen); every server is real.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use handoff_client::{pb, AgentConfig, Client, ConnectOptions, ErrorKind, Handoff, RunConfig};
use handoff_tests::{next_within, note, Broker, Nats, Note};
use handoffd::{
    config::{NatsAuth, TlsFiles},
    embedded::{NatsServer, Options},
    tls::principal_of_certificate,
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use tempfile::TempDir;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::Command,
};

const BIN: &str = env!("CARGO_BIN_EXE_handoffd-under-test");

/// A certificate authority that issues server and client certificates.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

/// A certificate and its key, as PEM, and the certificate as DER.
struct Leaf {
    cert: String,
    key: String,
    der: Vec<u8>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    fn issue(&self, cn: &str, sans: Vec<SanType>, usage: ExtendedKeyUsagePurpose) -> Leaf {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![usage];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }

    /// A server certificate for `localhost` and 127.0.0.1.
    fn server(&self) -> Leaf {
        self.issue(
            "localhost",
            vec![
                SanType::DnsName("localhost".try_into().unwrap()),
                SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            ],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A client certificate naming `principal` by URI SAN.
    fn client(&self, principal: &str) -> Leaf {
        self.issue(
            "someone-else",
            vec![SanType::URI(
                format!("handoff://principal/{principal}")
                    .as_str()
                    .try_into()
                    .unwrap(),
            )],
            ExtendedKeyUsagePurpose::ClientAuth,
        )
    }
}

/// Writes `text` to `dir/name` and returns the path.
fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// A broker served over TLS with client certificates from `ca` accepted.
struct TlsBroker {
    _nats: Nats,
    broker: Broker,
    _dir: TempDir,
    ca: Ca,
}

async fn tls_broker() -> TlsBroker {
    let ca = Ca::new("handoff test CA");
    let server = ca.server();
    let dir = tempfile::tempdir().unwrap();
    let cert = write(dir.path(), "server.pem", &server.cert);
    let key = write(dir.path(), "server-key.pem", &server.key);
    let client_ca = write(dir.path(), "ca.pem", &ca.pem);
    let admin_token = write(dir.path(), "admin-token", ADMIN);
    let nats = Nats::start().await;
    let broker = Broker::start(nats.url(), |c| {
        c.tls = Some(TlsFiles { cert, key });
        c.tls_client_ca = Some(client_ca);
        c.auth_token_file = Some(admin_token);
    })
    .await;
    let t = TlsBroker {
        _nats: nats,
        broker,
        _dir: dir,
        ca,
    };
    // With a client CA, calls are authenticated: the principal the tests'
    // certificates name may administer and read.
    let admin = t.admin().await;
    let mut raw = admin.raw();
    for (name, grants) in [
        (
            "planner",
            vec![pb::GrantAction::Admin, pb::GrantAction::Read],
        ),
        ("reader", vec![pb::GrantAction::Read]),
    ] {
        raw.put_principal(pb::PutPrincipalRequest {
            principal: Some(pb::Principal {
                name: name.into(),
                grants: grants
                    .into_iter()
                    .map(|action| pb::Grant {
                        action: action as i32,
                        pattern: String::new(),
                        deny: false,
                    })
                    .collect(),
            }),
        })
        .await
        .unwrap();
    }
    t
}

/// The bootstrap admin token of [`tls_broker`].
const ADMIN: &str = "tls-tests-bootstrap-admin-token-000000001";

impl TlsBroker {
    /// A client with the bootstrap admin token (over TLS, no certificate).
    async fn admin(&self) -> Client {
        ConnectOptions::new()
            .tls(self.ca.pem.clone())
            .token(ADMIN)
            .connect(format!("https://localhost:{}", self.broker.addr.port()))
            .await
            .unwrap()
    }
}

/// Connects and makes one call: the handshake of TLS 1.3 may fail on
/// either, so both count.
async fn connect_and_call(opts: ConnectOptions, addr: &str) -> handoff_client::Result<()> {
    let client = opts.connect(addr).await?;
    client.list_agents().await.map(drop)
}

#[tokio::test]
async fn mtls_accepts_certificates_of_the_configured_ca_only() {
    let t = tls_broker().await;
    let addr = format!("https://localhost:{}", t.broker.addr.port());
    let planner = t.ca.client("planner");
    assert_eq!(
        principal_of_certificate(&planner.der).as_deref(),
        Some("planner")
    );

    // A client certificate from the CA: served.
    let client = ConnectOptions::new()
        .tls(t.ca.pem.clone())
        .identity(planner.cert.clone(), planner.key.clone())
        .connect(&addr)
        .await
        .expect("mTLS client connects");
    client
        .register_agent(AgentConfig::new("worker"))
        .await
        .expect("served over mTLS");

    // No certificate at all: still served, with a token as its credential.
    let bare = ConnectOptions::new()
        .tls(t.ca.pem.clone())
        .token(ADMIN)
        .connect(format!("localhost:{}", t.broker.addr.port()))
        .await
        .expect("TLS without a client certificate");
    assert_eq!(bare.list_agents().await.expect("served").len(), 1);

    // A certificate from another CA: the handshake fails.
    let other = Ca::new("another CA").client("planner");
    let refused = connect_and_call(
        ConnectOptions::new()
            .tls(t.ca.pem.clone())
            .identity(other.cert, other.key),
        &addr,
    )
    .await
    .expect_err("a foreign client certificate is refused");
    // With TLS 1.3 the server's alert may arrive with the first call, which
    // tonic reports as UNKNOWN (a transport error); never served, in any case.
    assert!(
        matches!(
            refused.kind(),
            ErrorKind::Connect | ErrorKind::Unavailable | ErrorKind::Other
        ),
        "{refused:?}"
    );

    // Plaintext to the TLS port: nothing is served.
    let plain = connect_and_call(
        ConnectOptions::new().connect_timeout(Duration::from_secs(2)),
        &format!("http://{}", t.broker.addr),
    )
    .await
    .expect_err("plaintext is not served");
    assert!(
        matches!(
            plain.kind(),
            ErrorKind::Connect | ErrorKind::Unavailable | ErrorKind::Other
        ),
        "{plain:?}"
    );
}

#[tokio::test]
async fn a_client_certificate_is_the_principal_it_names() {
    let t = tls_broker().await;
    let addr = format!("https://localhost:{}", t.broker.addr.port());
    let as_principal = |leaf: Leaf| {
        ConnectOptions::new()
            .tls(t.ca.pem.clone())
            .identity(leaf.cert, leaf.key)
            .connect(addr.clone())
    };
    // A certificate naming "reader" (by URI SAN): read is granted, admin
    // is not.
    let reader = as_principal(t.ca.client("reader")).await.unwrap();
    reader.list_agents().await.expect("reader reads");
    let err = reader
        .register_agent(AgentConfig::new("worker"))
        .await
        .expect_err("reader may not register");
    assert_eq!(err.reason(), Some("NOT_GRANTED"));
    assert_eq!(
        err.metadata().get("principal").map(String::as_str),
        Some("reader")
    );
    // By common name when there is no URI SAN.
    let by_cn =
        t.ca.issue("planner", vec![], ExtendedKeyUsagePurpose::ClientAuth);
    let planner = as_principal(by_cn).await.unwrap();
    planner
        .register_agent(AgentConfig::new("worker"))
        .await
        .expect("planner administers");
    // A certificate from the CA naming no registered principal.
    let nobody = as_principal(t.ca.client("nobody")).await.unwrap();
    let err = nobody.list_agents().await.expect_err("unknown principal");
    assert_eq!(err.reason(), Some("BAD_CREDENTIALS"));
    // Neither certificate nor token: unauthenticated.
    let bare = ConnectOptions::new()
        .tls(t.ca.pem.clone())
        .connect(addr.clone())
        .await
        .unwrap();
    let err = bare.list_agents().await.expect_err("no credentials");
    assert_eq!(err.reason(), Some("MISSING_CREDENTIALS"));
}

#[tokio::test]
async fn a_client_that_does_not_trust_the_server_certificate_cannot_connect() {
    let t = tls_broker().await;
    let addr = format!("https://127.0.0.1:{}", t.broker.addr.port());
    let planner = t.ca.client("planner");
    let stranger = Ca::new("a CA the broker's certificate is not from");
    let err = connect_and_call(
        ConnectOptions::new()
            .tls(stranger.pem.clone())
            .identity(planner.cert.clone(), planner.key.clone()),
        &addr,
    )
    .await
    .expect_err("untrusted server certificate");
    assert_eq!(err.kind(), ErrorKind::Connect, "{err:?}");

    // The right CA, by IP address (the certificate has 127.0.0.1): served.
    connect_and_call(
        ConnectOptions::new()
            .tls(t.ca.pem.clone())
            .identity(planner.cert, planner.key),
        &addr,
    )
    .await
    .expect("trusted");

    // TLS options with a plaintext address are refused, not downgraded.
    let err = ConnectOptions::new()
        .tls(t.ca.pem.clone())
        .connect(format!("http://{}", t.broker.addr))
        .await
        .expect_err("http:// with TLS options");
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
}

#[tokio::test]
async fn peer_certificates_reach_request_handlers() {
    // The broker's own TLS settings and the same way of serving (tonic's
    // TLS over a caller-given listener): a handler reads the verified
    // client certificate with `request.peer_certs()`.
    let ca = Ca::new("handoff test CA");
    let server = ca.server();
    let dir = tempfile::tempdir().unwrap();
    let config = handoffd::Config {
        tls: Some(TlsFiles {
            cert: write(dir.path(), "server.pem", &server.cert),
            key: write(dir.path(), "server-key.pem", &server.key),
        }),
        tls_client_ca: Some(write(dir.path(), "ca.pem", &ca.pem)),
        ..handoffd::Config::default()
    };
    let tls = handoffd::tls::server_config(&config)
        .unwrap()
        .expect("TLS configured");
    let seen: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
    let record = {
        let seen = seen.clone();
        move |req: tonic::Request<()>| {
            let principal = req
                .peer_certs()
                .and_then(|certs| certs.first().and_then(|c| principal_of_certificate(c)));
            seen.lock().unwrap().push(principal);
            Ok(req)
        }
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_health, health_service) = tonic_health::server::health_reporter();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .tls_config(tls)
            .unwrap()
            .layer(tonic::service::InterceptorLayer::new(record))
            .add_service(health_service)
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                async {
                    let _ = stopped.await;
                },
            ),
    );
    let check = |channel| async move {
        tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("served")
    };
    let endpoint = || {
        tonic::transport::Endpoint::from_shared(format!("https://localhost:{}", addr.port()))
            .unwrap()
    };
    let planner = ca.client("planner");
    let with_cert = endpoint()
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(&ca.pem))
                .identity(tonic::transport::Identity::from_pem(
                    &planner.cert,
                    &planner.key,
                )),
        )
        .unwrap()
        .connect()
        .await
        .unwrap();
    check(with_cert).await;
    let without = endpoint()
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(&ca.pem)),
        )
        .unwrap()
        .connect()
        .await
        .unwrap();
    check(without).await;
    assert_eq!(
        *seen.lock().unwrap(),
        vec![Some("planner".to_string()), None]
    );
    let _ = stop.send(());
    let _ = server.await;
}

/// A nats-server that requires TLS and a user with a password.
struct SecureNats {
    server: NatsServer,
    dir: TempDir,
    ca: Ca,
}

async fn secure_nats(password: &str) -> SecureNats {
    let ca = Ca::new("NATS test CA");
    let leaf = ca.server();
    let dir = tempfile::tempdir().unwrap();
    let cert = write(dir.path(), "nats.pem", &leaf.cert);
    let key = write(dir.path(), "nats-key.pem", &leaf.key);
    let ca_file = write(dir.path(), "ca.pem", &ca.pem);
    let conf = write(
        dir.path(),
        "nats.conf",
        &format!(
            "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n}}\nauthorization {{\n  user: \"handoffd\"\n  password: \"{password}\"\n}}\n",
            cert.display(),
            key.display(),
            ca_file.display()
        ),
    );
    let mut opts = Options::new("nats-server", dir.path().join("js"));
    opts.extra_args = vec!["-c".to_string(), conf.display().to_string()];
    let server = NatsServer::start(opts)
        .await
        .expect("nats-server must be installed (apt-get install -y nats-server)");
    SecureNats { server, dir, ca }
}

#[tokio::test]
async fn the_broker_works_against_nats_with_a_password_and_tls() {
    let nats = secure_nats("s3cret-pa55").await;
    let password_file = write(nats.dir.path(), "nats-password", "s3cret-pa55\n");
    let ca_file = write(nats.dir.path(), "nats-ca.pem", &nats.ca.pem);

    // Without credentials NATS refuses a client.
    let anonymous = async_nats::ConnectOptions::new()
        .add_root_certificates(ca_file.clone())
        .require_tls(true)
        .connect(nats.server.url())
        .await
        .expect_err("anonymous client refused");
    assert_eq!(
        anonymous.kind(),
        async_nats::ConnectErrorKind::AuthorizationViolation
    );

    let broker = Broker::start(nats.server.url(), |c| {
        c.nats_auth = NatsAuth {
            user: Some("handoffd".to_string()),
            password_file: Some(password_file.clone()),
            tls_ca: Some(ca_file.clone()),
            ..NatsAuth::default()
        };
    })
    .await;
    let client = broker.client().await;
    client
        .register_agent(AgentConfig::new("worker"))
        .await
        .unwrap();
    let run = client
        .start_run(RunConfig::new("owner").ask("count to one"))
        .await
        .unwrap();
    let mut sub = client.subscribe("worker", "w1", 1).await.unwrap();
    let receipt = client
        .handoff(Handoff::to(&run.id, "worker", &note("task", 1)).unwrap())
        .await
        .unwrap();
    let delivery = next_within(&mut sub, Duration::from_secs(10))
        .await
        .expect("delivered over TLS NATS");
    assert_eq!(delivery.handoff_id(), receipt.handoff_id);
    assert_eq!(delivery.payload::<Note>().unwrap().n, 1);
    delivery.ack().await.unwrap();
    broker.stop().await;
}

#[tokio::test]
async fn a_wrong_nats_password_stops_the_broker_with_one_line() {
    let nats = secure_nats("the-right-one").await;
    let password_file = write(nats.dir.path(), "nats-password", "a-wrong-one\n");
    let ca_file = write(nats.dir.path(), "nats-ca.pem", &nats.ca.pem);
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        Command::new(BIN)
            .args(["--listen", "127.0.0.1:0", "--nats-url", nats.server.url()])
            .env("HANDOFF_NATS_USER", "handoffd")
            .env("HANDOFF_NATS_PASSWORD_FILE", &password_file)
            .env("HANDOFF_NATS_TLS_CA", &ca_file)
            // Longer than the test waits: the refusal must not be retried.
            .env("HANDOFF_CONNECT_TIMEOUT", "60s")
            .output(),
    )
    .await
    .expect("exits at once, without retrying")
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("handoffd:")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains("nats_password_file"), "{}", lines[0]);
}

#[tokio::test]
async fn no_auth_off_loopback_is_refused_unless_insecure() {
    let out = Command::new(BIN)
        .args(["--listen", "0.0.0.0:7233"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.lines()
            .any(|l| l.contains("0.0.0.0:7233") && l.contains("--insecure")),
        "{err}"
    );

    let nats = Nats::start().await;
    let mut serving = spawn_until_serving(&[
        "--listen",
        "0.0.0.0:0",
        "--insecure",
        "--nats-url",
        nats.url(),
    ])
    .await;
    assert!(serving.addr.ip().is_unspecified(), "{}", serving.addr);
    assert_eq!(serving.warnings.len(), 1, "{:?}", serving.warnings);
    let client = Client::connect(format!("http://127.0.0.1:{}", serving.addr.port()))
        .await
        .unwrap();
    client.list_agents().await.unwrap();
    terminate(&mut serving.child).await;
}

#[tokio::test]
async fn no_auth_on_loopback_serves_and_warns_once() {
    let nats = Nats::start().await;
    let mut serving =
        spawn_until_serving(&["--listen", "127.0.0.1:0", "--nats-url", nats.url()]).await;
    assert!(serving.addr.ip().is_loopback());
    assert_eq!(serving.warnings.len(), 1, "{:?}", serving.warnings);
    assert!(
        serving.warnings[0].contains("unauthenticated"),
        "{}",
        serving.warnings[0]
    );
    Client::connect(format!("http://{}", serving.addr))
        .await
        .unwrap()
        .list_agents()
        .await
        .unwrap();
    terminate(&mut serving.child).await;
}

#[tokio::test]
async fn the_embedded_nats_server_requires_the_generated_password() {
    let dir = tempfile::tempdir().unwrap();
    let mut serving = spawn_until_serving(&[
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        dir.path().to_str().unwrap(),
    ])
    .await;
    let conf = dir.path().join("nats").join("nats-server.conf");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&conf).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let text = std::fs::read_to_string(&conf).unwrap();
    let password = text
        .split("password: \"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .expect("a password in the server's config");
    assert!(password.len() >= 32);

    // Not on the child's command line, where `ps` would show it.
    let pid: i32 = std::fs::read_to_string(dir.path().join("nats").join("nats-server.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(!String::from_utf8_lossy(&cmdline).contains(password));

    // Another local process is refused...
    let url = serving.nats_url.clone().expect("the embedded server's URL");
    let refused = async_nats::connect(&url)
        .await
        .expect_err("no password, no connection");
    assert_eq!(
        refused.kind(),
        async_nats::ConnectErrorKind::AuthorizationViolation
    );
    // ...and the broker works.
    let client = Client::connect(format!("http://{}", serving.addr))
        .await
        .unwrap();
    client
        .register_agent(AgentConfig::new("worker"))
        .await
        .unwrap();
    let run = client.start_run(RunConfig::new("owner")).await.unwrap();
    client
        .handoff(Handoff::final_result(&run.id, &note("done", 1)).unwrap())
        .await
        .unwrap();
    terminate(&mut serving.child).await;
}

/// A daemon process that serves, as its log told.
struct Serving {
    /// The address it bound.
    addr: SocketAddr,
    /// Its warning lines before it served.
    warnings: Vec<String>,
    /// The embedded nats-server's URL, if it started one.
    nats_url: Option<String>,
    child: tokio::process::Child,
}

/// Spawns the daemon with `args` and JSON logs, and reads its log until it
/// serves.
async fn spawn_until_serving(args: &[&str]) -> Serving {
    let mut child = Command::new(BIN)
        .args(args)
        .args(["--log-format", "json"])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut warnings = Vec::new();
    let mut nats_url = None;
    let mut seen = Vec::new();
    let field = |line: &str, name: &str| {
        line.split(&format!("\"{name}\":\""))
            .nth(1)
            .and_then(|s| s.split('"').next())
            .map(String::from)
    };
    let addr = loop {
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .ok()
            .and_then(|l| l.ok().flatten())
            .unwrap_or_else(|| panic!("handoffd did not serve; its log:\n{}", seen.join("\n")));
        if line.contains("\"level\":\"WARN\"") {
            warnings.push(line.clone());
        }
        if line.contains("embedded nats-server started") {
            nats_url = field(&line, "url");
        }
        if line.contains("handoffd serving") {
            break field(&line, "addr")
                .and_then(|a| a.parse::<SocketAddr>().ok())
                .expect("addr");
        }
        seen.push(line);
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Serving {
        addr,
        warnings,
        nats_url,
        child,
    }
}

async fn terminate(child: &mut tokio::process::Child) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("stops")
        .unwrap();
    assert_eq!(status.code(), Some(0));
}
