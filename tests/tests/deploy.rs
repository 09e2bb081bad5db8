//! The files in `deploy/`, run together as shipped: `nats/nats-{1,2,3}.conf`
//! as a three-node JetStream cluster with TLS and the broker's user,
//! `handoffd.toml` as the broker's configuration, and `handoffd.service`'s
//! `ExecStart=`, `Environment=`, `LoadCredential=`, `StateDirectory=`,
//! `WorkingDirectory=` and `Type=notify` as the way the broker is started.
//!
//! Only what must differ on a test machine is rewritten, by tables of
//! substitutions each of which must match, and after which no setting may
//! still name a production host, port or path: when a deploy file changes,
//! this test fails loudly instead of testing something else.
//!
//! - Each host is a temporary directory: `/etc/...`, `/var/lib/...` and
//!   `/run/credentials/...` move under it, and the files the README installs
//!   there are written there under the names it gives (certificates from a
//!   CA the test makes, the broker's NATS password, its admin token).
//! - Hosts `nats-1`..`nats-3` become 127.0.0.1 (the certificates name both);
//!   the client and monitoring ports are the servers' own choice (`-1`),
//!   the route ports are reserved for them (see [`handoff_tests::cluster`]),
//!   and the broker listens on port 0.
//! - The bcrypt placeholder becomes the `$2a$11$` hash of the password the
//!   test generates, as the README tells an operator to do.
//! - `ExecStart`'s `/usr/bin/handoffd` is the test's build of the daemon; it
//!   runs in an environment holding only what systemd would give it.

use std::{
    collections::BTreeMap,
    io::Read as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use handoff_client::{pb, AgentConfig, ConnectOptions, ErrorKind, Handoff, RunConfig};
use handoff_tests::{
    certs::{Ca, ExtendedKeyUsagePurpose, SanType},
    cluster::NodePlan,
    next_within, note, BrokerProcess, Cluster, Note,
};
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_handoffd-under-test");

/// The placeholder the shipped NATS configs hold for the password's hash.
const HASH_PLACEHOLDER: &str = "$2a$11$REPLACE.WITH.THE.BCRYPT.HASH.OF.THE.BROKER.PASSWORD.xx";

/// systemd's `PATH` for system services.
const SYSTEMD_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin";

/// A shipped file of `deploy/`.
fn shipped(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `text` (of deploy file `file`) with every `(from, to)` applied in turn;
/// each must match at least once.
fn rewrite(file: &str, text: &str, table: &[(String, String)]) -> String {
    let mut out = text.to_string();
    for (from, to) in table {
        assert!(
            out.contains(from.as_str()),
            "deploy/{file} no longer has {from:?}: the file changed, update this test's substitutions"
        );
        out = out.replace(from.as_str(), to);
    }
    out
}

/// Panics if a setting line of `text` (comments aside) still has one of
/// `left`: something production-only the substitutions did not cover.
fn assert_none_left(file: &str, text: &str, left: &[&str]) {
    for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
        for needle in left {
            assert!(
                !line.contains(needle),
                "deploy/{file}: {line:?} still has {needle:?}: the file changed, update this test's substitutions"
            );
        }
    }
}

/// `(from, to)` as owned strings.
fn sub(from: impl Into<String>, to: impl Into<String>) -> (String, String) {
    (from.into(), to.into())
}

/// A secret as the README makes one:
/// `head -c 32 /dev/urandom | base64 | tr -d '/+='`.
fn secret() -> String {
    use base64::Engine as _;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("/dev/urandom");
    base64::engine::general_purpose::STANDARD
        .encode(bytes)
        .replace(['/', '+', '='], "")
}

/// Writes `text` to `path` (its directory made) with `mode`.
fn install(path: &Path, text: &str, mode: u32) {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).expect("directory");
    }
    std::fs::write(path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("mode");
}

/// The `[Service]` settings of a systemd unit that the test acts on.
#[derive(Debug, Default)]
struct Service {
    settings: BTreeMap<String, Vec<String>>,
}

impl Service {
    /// Reads the `[Service]` section of `text`: `Key=value` lines, comments
    /// and other sections aside.
    fn parse(text: &str) -> Service {
        let mut service = Service::default();
        let mut section = "";
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            if line.starts_with('[') {
                section = line;
                continue;
            }
            if section != "[Service]" {
                continue;
            }
            let (key, value) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("handoffd.service: {line:?} is not Key=value"));
            service
                .settings
                .entry(key.trim().to_string())
                .or_default()
                .push(value.trim().to_string());
        }
        service
    }

    /// Every value of `key`.
    fn all(&self, key: &str) -> &[String] {
        self.settings
            .get(key)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// The one value of `key`.
    fn one(&self, key: &str) -> &str {
        match self.all(key) {
            [value] => value,
            other => panic!("handoffd.service: {key}= has {other:?}, one value expected"),
        }
    }
}

/// `value` with systemd's specifiers expanded: `%S` (the state directory
/// root, `/var/lib` for system units, here under `root`) and `%%`. Another
/// specifier fails the test, to be taught here.
fn expand(value: &str, root: &Path) -> String {
    let mut out = String::new();
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('S') => out.push_str(&format!("{}/var/lib", root.display())),
            Some('%') => out.push('%'),
            other => panic!("handoffd.service: specifier %{other:?} in {value:?}: teach this test"),
        }
    }
    out
}

/// An absolute path of the unit, under the host's `root`.
fn under(root: &Path, path: &str) -> PathBuf {
    let relative = path
        .strip_prefix('/')
        .unwrap_or_else(|| panic!("handoffd.service: {path:?} is not an absolute path"));
    root.join(relative)
}

/// The NATS node `n` (1, 2 or 3) as its host would run it: certificates and
/// store installed under `plan.dir`, and `deploy/nats/nats-<n>.conf`
/// rewritten for the test. Returns the node's command line.
fn nats_host(plan: &NodePlan<'_>, ca: &Ca, hash: &str) -> Vec<String> {
    let n = plan.index + 1;
    let host = plan.dir;
    let file = format!("nats/nats-{n}.conf");
    let mut table = vec![
        sub("listen: 0.0.0.0:4222", "listen: 127.0.0.1:-1"),
        sub(
            "listen: 0.0.0.0:6222",
            format!("listen: 127.0.0.1:{}", plan.route_port()),
        ),
        sub("http: 127.0.0.1:8222", "http: 127.0.0.1:-1"),
        sub("\"/etc/nats/", format!("\"{}/etc/nats/", host.display())),
        sub(
            "\"/var/lib/nats\"",
            format!("\"{}/var/lib/nats\"", host.display()),
        ),
        sub(HASH_PLACEHOLDER, hash),
    ];
    for (k, port) in plan.route_ports.iter().enumerate() {
        if k != plan.index {
            table.push(sub(
                format!("nats-route://nats-{}:6222", k + 1),
                format!("nats-route://127.0.0.1:{port}"),
            ));
        }
    }
    let conf = rewrite(&file, &shipped(&file), &table);
    assert_none_left(
        &file,
        &conf,
        &[
            "0.0.0.0", ":4222", ":6222", ":8222", "nats-1:", "nats-2:", "nats-3:", "REPLACE",
            "\"/etc", "\"/var",
        ],
    );

    // As the README installs them: the CA, this node's certificate (DNS
    // SAN nats-N, serverAuth and clientAuth) and its key.
    let tls = host.join("etc/nats/tls");
    let leaf = ca.host(
        &format!("nats-{n}"),
        vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
    );
    install(&tls.join("ca.pem"), &ca.pem, 0o644);
    install(&tls.join(format!("nats-{n}.pem")), &leaf.cert, 0o644);
    install(&tls.join(format!("nats-{n}-key.pem")), &leaf.key, 0o600);
    std::fs::create_dir_all(host.join("var/lib/nats")).expect("store_dir");
    let path = host.join("etc/nats-server.conf");
    install(&path, &conf, 0o644);

    // "nats-server -c /etc/nats-server.conf -t  # check the config only"
    let check = std::process::Command::new("nats-server")
        .arg("-c")
        .arg(&path)
        .arg("-t")
        .output()
        .expect("nats-server must be installed (apt-get install -y nats-server)");
    assert!(
        check.status.success(),
        "{file} as rewritten does not pass nats-server -t: {}{}\n{conf}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    vec!["-c".to_string(), path.display().to_string()]
}

#[tokio::test]
async fn the_shipped_deploy_files_run_a_broker_on_a_three_node_tls_cluster() {
    let began = Instant::now();

    // Step 1 of the README: the cluster, with TLS and the broker's user.
    let nats_ca = Ca::new("NATS CA");
    let nats_password = secret();
    let hash = bcrypt::hash_with_result(&nats_password, 11)
        .expect("bcrypt")
        .format_for_version(bcrypt::Version::TwoA);
    let nats_ca_file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(nats_ca_file.path(), &nats_ca.pem).expect("CA file");
    let helper_ca = nats_ca_file.path().to_path_buf();
    let helper_password = nats_password.clone();
    let cluster = Cluster::start_with(3, |plan| nats_host(plan, &nats_ca, &hash))
        .await
        .expect("the three shipped nats-server configs form a cluster")
        .with_connect_options(move || {
            async_nats::ConnectOptions::new()
                .user_and_password("handoffd".to_string(), helper_password.clone())
                .add_root_certificates(helper_ca.clone())
                .require_tls(true)
        });
    let names: Vec<&str> = (0..3).map(|i| cluster.name(i)).collect();
    assert_eq!(names, ["nats-1", "nats-2", "nats-3"]);
    println!("cluster formed after {:?}", began.elapsed());

    // Only the broker's user gets in, and only over TLS.
    let anonymous = async_nats::ConnectOptions::new()
        .add_root_certificates(nats_ca_file.path().to_path_buf())
        .require_tls(true)
        .connect(cluster.url(0))
        .await
        .expect_err("no user, no connection");
    assert_eq!(
        anonymous.kind(),
        async_nats::ConnectErrorKind::AuthorizationViolation
    );

    // Step 2: the broker's host, as the README installs it.
    let root_dir = tempfile::tempdir().expect("temp dir");
    let root = root_dir.path();
    let etc = root.join("etc/handoffd");
    let broker_ca = Ca::new("handoffd CA");
    let broker_leaf = broker_ca.host("handoffd", vec![ExtendedKeyUsagePurpose::ServerAuth]);
    let client_ca = Ca::new("handoffd client CA");
    let token = secret();
    install(
        &etc.join("nats-password"),
        &format!("{nats_password}\n"),
        0o600,
    );
    install(&etc.join("auth-token"), &format!("{token}\n"), 0o600);
    install(&etc.join("tls/handoffd-key.pem"), &broker_leaf.key, 0o600);
    install(&etc.join("tls/handoffd.pem"), &broker_leaf.cert, 0o644);
    install(&etc.join("tls/client-ca.pem"), &client_ca.pem, 0o644);
    install(&etc.join("tls/nats-ca.pem"), &nats_ca.pem, 0o644);

    let mut table: Vec<(String, String)> = (0..3)
        .map(|i| {
            sub(
                format!("tls://nats-{}:4222", i + 1),
                cluster.url(i).replace("nats://", "tls://"),
            )
        })
        .collect();
    table.extend([
        sub("\"/etc/handoffd/", format!("\"{}/", etc.display())),
        sub(
            "\"/run/credentials/handoffd.service/",
            format!("\"{}/run/credentials/handoffd.service/", root.display()),
        ),
        sub("listen = \"0.0.0.0:7233\"", "listen = \"127.0.0.1:0\""),
        sub(
            "data_dir = \"/var/lib/handoffd\"",
            format!("data_dir = \"{}/var/lib/handoffd\"", root.display()),
        ),
    ]);
    let toml = rewrite("handoffd.toml", &shipped("handoffd.toml"), &table);
    assert_none_left(
        "handoffd.toml",
        &toml,
        &[
            "nats-1:", "nats-2:", "nats-3:", "0.0.0.0", "\"/etc", "\"/run", "\"/var",
        ],
    );
    install(&etc.join("handoffd.toml"), &toml, 0o644);

    // What systemd does with the unit before and while it starts handoffd.
    let unit = Service::parse(&shipped("handoffd.service"));
    assert_eq!(unit.one("Type"), "notify");
    let exec: Vec<&str> = unit.one("ExecStart").split_whitespace().collect();
    assert!(
        exec.iter().all(|a| !a.contains(['"', '\''])),
        "quoted ExecStart arguments: teach this test {exec:?}"
    );
    assert_eq!(
        exec.first().copied(),
        Some("/usr/bin/handoffd"),
        "the README installs the binary there"
    );
    let args: Vec<String> = exec[1..]
        .iter()
        .map(|a| {
            let a = expand(a, root);
            if a.starts_with('/') {
                under(root, &a).display().to_string()
            } else {
                a
            }
        })
        .collect();
    for state in unit.all("StateDirectory") {
        for name in state.split_whitespace() {
            std::fs::create_dir_all(root.join("var/lib").join(name)).expect("state directory");
        }
    }
    let credentials = root.join("run/credentials/handoffd.service");
    std::fs::create_dir_all(&credentials).expect("credentials directory");
    let mut loaded = Vec::new();
    for line in unit.all("LoadCredential") {
        let (name, source) = line
            .split_once(':')
            .unwrap_or_else(|| panic!("LoadCredential={line}: not NAME:PATH"));
        let source = under(root, &expand(source, root));
        // A listed file that is missing stops the unit from starting.
        let text = std::fs::read_to_string(&source).unwrap_or_else(|e| {
            panic!(
                "LoadCredential={line}: {} ({e}): the README does not install it",
                source.display()
            )
        });
        install(&credentials.join(name), &text, 0o400);
        loaded.push(name.to_string());
    }
    assert_eq!(loaded, ["nats-password", "auth-token", "tls-key"]);
    let notify_dir = tempfile::tempdir().expect("temp dir");
    let notify_path = notify_dir.path().join("notify");
    let notify = tokio::net::UnixDatagram::bind(&notify_path).expect("notify socket");

    let mut cmd = Command::new(BIN);
    cmd.args(&args)
        .env_clear()
        .env("PATH", SYSTEMD_PATH)
        .env("CREDENTIALS_DIRECTORY", &credentials)
        .env("NOTIFY_SOCKET", &notify_path)
        // No console (at its fixed default address): tests run side by side.
        .env("HANDOFF_CONSOLE_LISTEN", "");
    for assignments in unit.all("Environment") {
        for assignment in assignments.split_whitespace() {
            let (key, value) = assignment
                .split_once('=')
                .unwrap_or_else(|| panic!("Environment={assignments}: not KEY=value"));
            assert!(
                !value.contains(['"', '\'']),
                "quoted Environment= values: teach this test"
            );
            cmd.env(key, expand(value, root));
        }
    }
    cmd.current_dir(expand(unit.one("WorkingDirectory"), root));

    let started = Instant::now();
    let broker = BrokerProcess::spawn_command(cmd).await;
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(10), notify.recv(&mut buf))
        .await
        .expect("READY=1 within 10 s (Type=notify)")
        .expect("notify socket");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("READY=1"));
    println!(
        "handoffd ready after {:?}; {:?} since the test began",
        started.elapsed(),
        began.elapsed()
    );
    let port = broker.addr.port();
    let url = format!("https://127.0.0.1:{port}");

    // Health, over TLS, with no credentials.
    let channel = tonic::transport::Endpoint::from_shared(url.clone())
        .expect("endpoint")
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(&broker_ca.pem)),
        )
        .expect("TLS config")
        .connect()
        .await
        .expect("TLS to the broker");
    let status = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: "handoff.v1.HandoffBroker".into(),
        })
        .await
        .expect("health check")
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    // Every call is authenticated.
    let anonymous = ConnectOptions::new()
        .tls(broker_ca.pem.clone())
        .connect(&url)
        .await
        .expect("TLS without credentials");
    let refused = anonymous
        .list_agents()
        .await
        .expect_err("no token, no certificate");
    assert_eq!(refused.kind(), ErrorKind::PermissionDenied);
    assert_eq!(refused.code(), Some(tonic::Code::Unauthenticated));
    assert_eq!(refused.reason(), Some("MISSING_CREDENTIALS"));

    // The admin token (auth_token_file, through LoadCredential=): a
    // handoff stored on the cluster and delivered.
    let admin = ConnectOptions::new()
        .tls(broker_ca.pem.clone())
        .token(token.as_str())
        .connect(&url)
        .await
        .expect("TLS with the admin token");
    admin
        .register_agent(AgentConfig::new("worker"))
        .await
        .expect("register an agent");
    let run = admin
        .start_run(RunConfig::new("owner").ask("count to one"))
        .await
        .expect("start a run");
    let mut sub = admin.subscribe("worker", "w1", 1).await.expect("subscribe");
    let receipt = admin
        .handoff(Handoff::to(&run.id, "worker", &note("task", 1)).expect("handoff"))
        .await
        .expect("a handoff accepted");
    let delivery = next_within(&mut sub, Duration::from_secs(10))
        .await
        .expect("delivered");
    assert_eq!(delivery.handoff_id(), receipt.handoff_id);
    assert_eq!(delivery.payload::<Note>().expect("a Note").n, 1);
    delivery.ack().await.expect("ack");

    // A client certificate from tls_client_ca names a principal.
    admin
        .raw()
        .put_principal(pb::PutPrincipalRequest {
            principal: Some(pb::Principal {
                name: "ops".into(),
                grants: vec![pb::Grant {
                    action: pb::GrantAction::Read as i32,
                    pattern: String::new(),
                    deny: false,
                }],
            }),
        })
        .await
        .expect("put principal ops");
    let ops = client_ca.issue(
        "ops",
        vec![SanType::URI(
            "handoff://principal/ops".try_into().expect("URI"),
        )],
        vec![ExtendedKeyUsagePurpose::ClientAuth],
    );
    let agents = ConnectOptions::new()
        .tls(broker_ca.pem.clone())
        .identity(ops.cert, ops.key)
        .connect(&url)
        .await
        .expect("mTLS")
        .list_agents()
        .await
        .expect("ops reads with its certificate");
    assert!(agents.iter().any(|a| a.name == "worker"), "{agents:?}");

    // replicas = 3: the inbox is replicated on all three nodes.
    let inbox = cluster
        .wait_stream_current(handoffd::store::jetstream::INBOX_STREAM)
        .await
        .expect("the inbox stream on three current replicas");
    let mut members: Vec<&str> = inbox.replicas.iter().map(|p| p.name.as_str()).collect();
    members.extend(inbox.leader.as_deref());
    members.sort_unstable();
    assert_eq!(members, ["nats-1", "nats-2", "nats-3"], "{inbox:?}");

    // systemctl stop: SIGTERM, STOPPING=1, a clean exit within the unit's
    // TimeoutStopSec.
    let stop = unit.one("TimeoutStopSec").trim_end_matches('s');
    let stop = Duration::from_secs(stop.parse().expect("TimeoutStopSec in seconds"));
    let stopping = tokio::spawn(async move {
        let mut buf = [0u8; 256];
        let n = notify.recv(&mut buf).await.expect("notify socket");
        String::from_utf8_lossy(&buf[..n]).to_string()
    });
    let code = tokio::time::timeout(stop, broker.terminate())
        .await
        .expect("stopped within TimeoutStopSec");
    assert_eq!(code, Some(0));
    let said = tokio::time::timeout(Duration::from_secs(1), stopping)
        .await
        .expect("STOPPING=1 sent")
        .expect("notify task");
    assert!(said.contains("STOPPING=1"), "{said}");
    println!("the test took {:?}", began.elapsed());
}
