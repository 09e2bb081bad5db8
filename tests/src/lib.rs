//! Test helper: real `nats-server` processes and real brokers.
//!
//! [`Nats::start`] runs `nats-server` on a random loopback port with a
//! temporary JetStream store (the broker's own [`NatsServer`], which reads
//! readiness from the server's log: no fixed sleeps). [`Broker::start`]
//! runs `handoffd` in-process through the same `run` the binary uses;
//! [`BrokerProcess`] runs it as a separate process so a test can `kill -9`
//! it. Everything is cleaned up on drop without panicking. Every address is
//! bound on port 0 and read back from what was bound, never picked first.
//!
//! Negative checks ("nothing else arrived") rest on evidence, not only on
//! a quiet timeout: [`settled_inbox`] reads an agent's inbox from JetStream
//! (what was stored for it, how often its consumer delivered, that nothing
//! is left to deliver) and [`timeline_when`] reads a run's event log.
//!
//! [`Cluster`] (module [`cluster`]) runs three `nats-server` processes as
//! one JetStream cluster, for replication and failover tests.
//!
//! Tests with random timings take their seed from [`seed`]
//! (`HANDOFF_TEST_SEED`, else the clock) and print how to replay it.
//!
//! Logs: `RUST_LOG` shows those of in-process brokers; with
//! `HANDOFF_TEST_BROKER_LOG=FILE` every [`BrokerProcess`] appends its log
//! (JSON lines) to `FILE`.

#![allow(missing_docs)]

pub mod certs;
pub mod cluster;
pub mod history;
pub mod load;
pub mod proxy;
pub mod secured;
pub use cluster::{Cluster, ClusterError};

use std::{
    net::SocketAddr,
    process::Stdio,
    time::{Duration, Instant},
};

use futures::{Stream, StreamExt};
use handoff_client::{pb, Client};
use handoffd::{
    embedded::{NatsServer, Options},
    Config,
};
use tempfile::TempDir;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
    sync::oneshot,
    task::JoinHandle,
};

/// Installs a test log subscriber once (RUST_LOG to see broker logs).
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A `nats-server` with JetStream on a random loopback port.
pub struct Nats {
    // Killed on drop (kill_on_drop) before the store directory is removed.
    server: Option<NatsServer>,
    dir: TempDir,
    url: String,
}

impl Nats {
    /// Starts a server; panics (the test fails) if it cannot.
    pub async fn start() -> Nats {
        init_logs();
        let dir = tempfile::tempdir().expect("temp dir");
        let server = NatsServer::start(Options::new("nats-server", dir.path().join("js")))
            .await
            .expect(
                "nats-server 2.12 or newer must be on PATH (./dev installs it into target/tools)",
            );
        let url = server.url().to_string();
        Nats {
            server: Some(server),
            dir,
            url,
        }
    }

    /// `kill -9` of the server: its clients see the connection drop.
    pub async fn kill9(&mut self) {
        if let Some(server) = self.server.take() {
            server.kill().await;
        }
    }

    /// Starts the server again (after [`Nats::kill9`]) on the same port
    /// with the same store.
    pub async fn restart(&mut self) {
        self.kill9().await;
        let port = self
            .url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse::<u16>().ok())
            .expect("the port of the URL");
        let mut opts = Options::new("nats-server", self.dir.path().join("js"));
        opts.port = port;
        let server = NatsServer::start(opts).await.expect("nats-server restarts");
        assert_eq!(server.url(), self.url, "restarted on the same port");
        self.server = Some(server);
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> &str {
        &self.url
    }
}

/// A `nats-server`, a broker on it with `tweak` applied to the test
/// config, and a client: what most tests start with.
pub async fn stack(tweak: impl FnOnce(&mut Config)) -> (Nats, Broker, Client) {
    let nats = Nats::start().await;
    let broker = Broker::start(nats.url(), tweak).await;
    let client = broker.client().await;
    (nats, broker, client)
}

/// Registers `agent` (no contract) and starts a run with `config`.
pub async fn agent_and_run(
    client: &Client,
    agent: &str,
    config: handoff_client::RunConfig,
) -> pb::Run {
    client
        .register_agent(handoff_client::AgentConfig::new(agent))
        .await
        .expect("agent");
    client.start_run(config).await.expect("run")
}

/// A broker configuration for tests: short timeouts, given NATS.
pub fn test_config(nats_url: &str) -> Config {
    Config {
        nats_url: Some(nats_url.to_string()),
        listen: "127.0.0.1:0".parse().expect("addr"),
        drain_timeout: Duration::from_secs(2),
        default_lease: Duration::from_secs(5),
        // Tests start many brokers at once: none serves the console (at
        // its fixed default address) unless a test asks for one.
        console_listen: None,
        ..Config::default()
    }
}

/// `handoffd` running in-process.
pub struct Broker {
    pub addr: SocketAddr,
    /// The metrics endpoint's address (with `metrics_listen` set).
    pub metrics_addr: Option<SocketAddr>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), handoffd::RunError>>>,
}

impl Broker {
    /// Starts a broker on NATS at `nats_url` with `tweak` applied to the
    /// test config.
    pub async fn start(nats_url: &str, tweak: impl FnOnce(&mut Config)) -> Broker {
        let mut config = test_config(nats_url);
        tweak(&mut config);
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .expect("bind");
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (ready_tx, ready_rx) = oneshot::channel();
        let task = tokio::spawn(handoffd::run_with(
            config,
            listener,
            async {
                let _ = stop_rx.await;
            },
            Some(ready_tx),
        ));
        let ready = match ready_rx.await {
            Ok(r) => r,
            Err(_) => panic!("broker failed to start: {:?}", task.await),
        };
        keep_inboxes(nats_url).await;
        Broker {
            addr: ready.addr,
            metrics_addr: ready.metrics_addr,
            shutdown: Some(stop_tx),
            task: Some(task),
        }
    }

    /// A new SDK client to this broker.
    pub async fn client(&self) -> Client {
        Client::connect(format!("http://{}", self.addr))
            .await
            .expect("connect")
    }

    /// Graceful shutdown, awaited.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        // Dropping the sender starts the broker's drain; abort as a backstop.
        self.shutdown.take();
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// `handoffd` as a separate process (to be killed with SIGKILL).
pub struct BrokerProcess {
    child: Child,
    /// The gRPC address it bound, read from its `handoffd serving` line.
    pub addr: SocketAddr,
    /// The metrics endpoint it bound (with `HANDOFF_METRICS_LISTEN` set),
    /// read from its `metrics endpoint serving` line.
    pub metrics_addr: Option<SocketAddr>,
}

impl BrokerProcess {
    /// Spawns the daemon binary `bin` against NATS at `nats_url`, listening
    /// on port 0, and waits until it logs that it serves: the addresses it
    /// bound are read from its log.
    pub async fn spawn(bin: &str, nats_url: &str, extra_env: &[(&str, &str)]) -> BrokerProcess {
        let mut cmd = Command::new(bin);
        cmd.args([
            "--nats-url",
            nats_url,
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ])
        .env("RUST_LOG", "info")
        // No console (at its fixed default address) unless asked for.
        .env("HANDOFF_CONSOLE_LISTEN", "")
        .envs(extra_env.iter().copied());
        let broker = BrokerProcess::spawn_command(cmd).await;
        keep_inboxes(nats_url).await;
        broker
    }

    /// Spawns the daemon as `cmd` says (its arguments, environment and
    /// directory; its configuration must make it log JSON at level info or
    /// more) and waits until it logs that it serves: the addresses it bound
    /// are read from its log.
    pub async fn spawn_command(mut cmd: Command) -> BrokerProcess {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("spawn handoffd");
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = BufReader::new(stderr).lines();
        let mut early = Vec::new();
        let mut metrics_addr = None;
        let addr = tokio::time::timeout(Duration::from_secs(20), async {
            while let Ok(Some(line)) = lines.next_line().await {
                let addr = log_field(&line, "addr").and_then(|a| a.parse::<SocketAddr>().ok());
                let serving = match (log_field(&line, "message"), addr) {
                    (Some("metrics endpoint serving"), Some(a)) => {
                        metrics_addr = Some(a);
                        None
                    }
                    (Some("handoffd serving"), Some(a)) => Some(a),
                    _ => None,
                };
                early.push(line);
                if serving.is_some() {
                    return serving;
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| {
            panic!(
                "handoffd did not report serving; its log:\n{}",
                early.join("\n")
            )
        });
        // HANDOFF_TEST_BROKER_LOG=FILE keeps every broker's log (appended).
        let mut keep = match std::env::var_os("HANDOFF_TEST_BROKER_LOG") {
            Some(path) => tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .await
                .ok(),
            None => None,
        };
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            if let Some(f) = keep.as_mut() {
                for line in early {
                    let _ = f.write_all(format!("{line}\n").as_bytes()).await;
                }
            }
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(f) = keep.as_mut() {
                    let _ = f.write_all(format!("{line}\n").as_bytes()).await;
                }
            }
        });
        BrokerProcess {
            child,
            addr,
            metrics_addr,
        }
    }

    /// A new SDK client to this process.
    pub async fn client(&self) -> Client {
        Client::connect(format!("http://{}", self.addr))
            .await
            .expect("connect")
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// SIGKILL: no drain, no flush.
    pub async fn kill9(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    /// SIGTERM and wait for exit; returns the exit status code.
    pub async fn terminate(mut self) -> Option<i32> {
        if let Some(pid) = self.child.id().and_then(|p| i32::try_from(p).ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        match tokio::time::timeout(Duration::from_secs(15), self.child.wait()).await {
            Ok(Ok(status)) => status.code(),
            _ => None,
        }
    }
}

/// The string value of `field` in one JSON log line of `handoffd`
/// (`"field":"value"`, at any depth), or `None`.
fn log_field<'a>(line: &'a str, field: &str) -> Option<&'a str> {
    line.split(&format!("\"{field}\":\""))
        .nth(1)
        .and_then(|s| s.split('"').next())
}

/// Reads events from `stream` until `done` holds for one (returned with
/// everything before it), or panics after `timeout`.
pub async fn events_until<S>(
    stream: &mut S,
    timeout: Duration,
    done: impl Fn(&pb::Event) -> bool,
) -> Vec<pb::Event>
where
    S: Stream<Item = handoff_client::Result<pb::Event>> + Unpin,
{
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.next()).await {
            Ok(Some(Ok(e))) => {
                let stop = done(&e);
                seen.push(e);
                if stop {
                    return seen;
                }
            }
            Ok(Some(Err(e))) => panic!("watch failed: {e}"),
            Ok(None) => panic!("watch ended; seen {:?}", kinds(&seen)),
            Err(_) => panic!("timed out; seen {:?}", kinds(&seen)),
        }
    }
}

/// Event kinds as tokens, for assertions and messages.
pub fn kinds(events: &[pb::Event]) -> Vec<&'static str> {
    events
        .iter()
        .map(|e| {
            pb::EventKind::try_from(e.kind)
                .map(|k| k.token())
                .unwrap_or("?")
        })
        .collect()
}

/// The next delivery within `timeout`, or `None`.
pub async fn next_within(
    sub: &mut handoff_client::Subscription,
    timeout: Duration,
) -> Option<handoff_client::Delivery> {
    match tokio::time::timeout(timeout, sub.next_delivery()).await {
        Ok(Some(Ok(d))) => Some(d),
        Ok(Some(Err(e))) => panic!("subscription failed: {e}"),
        Ok(None) => None,
        Err(_) => None,
    }
}

/// Test payload type.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Note {
    #[prost(string, tag = "1")]
    pub text: String,
    #[prost(uint32, tag = "2")]
    pub n: u32,
}

impl prost::Name for Note {
    const NAME: &'static str = "Note";
    const PACKAGE: &'static str = "handoff.test";
}

/// A `Note` payload.
pub fn note(text: &str, n: u32) -> Note {
    Note {
        text: text.to_string(),
        n,
    }
}

/// Compiles `.proto` sources given as `(file name, text)` into an encoded
/// `FileDescriptorSet` (with protox, no `protoc`), for registering
/// contracts.
pub fn compile_proto(files: &[(&str, &str)]) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, text) in files {
        let path = dir.path().join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("proto dir");
        }
        std::fs::write(&path, text).expect("write proto");
    }
    let names: Vec<&str> = files.iter().map(|(n, _)| *n).collect();
    let fds = protox::compile(names, [dir.path()]).expect("compile proto");
    prost::Message::encode_to_vec(&fds)
}

/// One HTTP response, as read by [`http_get`] and [`http_exchange`].
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// The `content-type` header, if any.
    pub content_type: Option<String>,
    /// The body (de-chunked).
    pub body: String,
}

/// `GET path` on a fresh connection (closed after the answer).
pub async fn http_get(addr: SocketAddr, path: &str) -> HttpResponse {
    let mut socket = tokio::net::TcpStream::connect(addr)
        .await
        .expect("metrics endpoint");
    let request = format!("GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n");
    http_exchange(&mut socket, &[request.as_bytes()]).await
}

/// Writes a request in `parts` (flushed one by one, 50 ms apart, to
/// split it across reads) on `socket` and reads one response: its head,
/// then a body of `content-length` bytes, chunked, or up to the close. The
/// connection stays usable for the next request unless it was closed.
pub async fn http_exchange(socket: &mut tokio::net::TcpStream, parts: &[&[u8]]) -> HttpResponse {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        socket.write_all(part).await.expect("request");
        socket.flush().await.expect("flush");
    }
    let deadline = Duration::from_secs(10);
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(deadline, socket.read(&mut chunk))
            .await
            .expect("response head in time")
            .expect("read");
        assert!(n > 0, "connection closed before a response head: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut rest = buf[head_end..].to_vec();
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {head}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let mut read_more = async |rest: &mut Vec<u8>| -> bool {
        let mut chunk = [0u8; 8192];
        let n = tokio::time::timeout(deadline, socket.read(&mut chunk))
            .await
            .expect("response body in time")
            .expect("read");
        rest.extend_from_slice(&chunk[..n]);
        n > 0
    };
    let body = if let Some(len) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        while rest.len() < len {
            assert!(read_more(&mut rest).await, "body cut short");
        }
        rest.truncate(len);
        rest
    } else if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(i) = rest.windows(2).position(|w| w == b"\r\n") {
                    break i;
                }
                assert!(read_more(&mut rest).await, "chunk cut short");
            };
            let size = usize::from_str_radix(
                String::from_utf8_lossy(&rest[..line_end])
                    .split(';')
                    .next()
                    .unwrap_or("")
                    .trim(),
                16,
            )
            .expect("chunk size");
            while rest.len() < line_end + 2 + size + 2 {
                assert!(read_more(&mut rest).await, "chunk cut short");
            }
            body.extend_from_slice(&rest[line_end + 2..line_end + 2 + size]);
            rest.drain(..line_end + 2 + size + 2);
            if size == 0 {
                break body;
            }
        }
    } else {
        while read_more(&mut rest).await {}
        rest
    };
    HttpResponse {
        status,
        content_type: header("content-type"),
        body: String::from_utf8(body).expect("a UTF-8 body"),
    }
}

/// The body of `GET /metrics` from a broker's metrics endpoint (which
/// must answer 200 with the OpenMetrics content type).
pub async fn scrape(addr: SocketAddr) -> String {
    let r = http_get(addr, "/metrics").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.content_type.as_deref(),
        Some(handoffd::metrics::CONTENT_TYPE),
        "{r:?}"
    );
    r.body
}

/// A scrape of `addr`, parsed (panics if it does not parse).
pub async fn scrape_parsed(addr: SocketAddr) -> Exposition {
    let text = scrape(addr).await;
    Exposition::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// A metrics exposition (OpenMetrics or Prometheus text), parsed.
#[derive(Debug, Clone, Default)]
pub struct Exposition {
    /// The families described (`# TYPE`), by name: their type, help and
    /// unit.
    pub families: std::collections::BTreeMap<String, MetricFamily>,
    /// Every sample, in order.
    pub samples: Vec<Sample>,
    /// Whether it ended with `# EOF` (OpenMetrics).
    pub eof: bool,
}

/// A family's description.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MetricFamily {
    /// `counter`, `gauge`, `histogram`, ...
    pub kind: String,
    /// Its `# HELP` text.
    pub help: Option<String>,
    /// Its `# UNIT`.
    pub unit: Option<String>,
}

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The sample's name (`handoff_acked_total`, `..._bucket`).
    pub name: String,
    /// Its labels, unescaped.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Its value.
    pub value: f64,
}

/// Why an exposition does not parse.
#[derive(Debug, thiserror::Error)]
#[error("line {line}: {why}: {text:?}")]
pub struct ParseError {
    /// The line, from 1.
    pub line: usize,
    /// What is wrong.
    pub why: &'static str,
    /// The line's text.
    pub text: String,
}

impl Exposition {
    /// Parses an exposition: `# HELP`, `# TYPE`, `# UNIT`, `# EOF` and
    /// sample lines (`name{label="value",...} value [timestamp]`), label
    /// values unescaped. Anything after `# EOF`, a sample without a
    /// family, or a family described twice is an error.
    pub fn parse(text: &str) -> Result<Exposition, ParseError> {
        let mut out = Exposition::default();
        for (i, line) in text.lines().enumerate() {
            let err = |why| ParseError {
                line: i + 1,
                why,
                text: line.to_string(),
            };
            if out.eof {
                return Err(err("text after # EOF"));
            }
            if line == "# EOF" {
                out.eof = true;
                continue;
            }
            if let Some(rest) = line.strip_prefix("# ") {
                let (keyword, rest) = rest.split_once(' ').ok_or_else(|| err("bare comment"))?;
                let (name, value) = rest.split_once(' ').unwrap_or((rest, ""));
                match keyword {
                    "TYPE" => {
                        let family = out.families.entry(name.to_string()).or_default();
                        if !family.kind.is_empty() {
                            return Err(err("family described twice"));
                        }
                        family.kind = value.to_string();
                    }
                    "HELP" => {
                        out.families.entry(name.to_string()).or_default().help =
                            Some(value.to_string())
                    }
                    "UNIT" => {
                        out.families.entry(name.to_string()).or_default().unit =
                            Some(value.to_string())
                    }
                    _ => {}
                }
                continue;
            }
            if line.trim().is_empty() {
                continue;
            }
            let sample = parse_sample(line).ok_or_else(|| err("not a sample"))?;
            if out.family_of(&sample.name).is_none() {
                return Err(err("sample of no described family"));
            }
            out.samples.push(sample);
        }
        Ok(out)
    }

    /// The family a sample name belongs to (`x_total` -> counter `x`,
    /// `x_bucket` / `x_sum` / `x_count` -> histogram `x`, or `x` itself).
    pub fn family_of(&self, sample: &str) -> Option<&str> {
        if let Some((name, _)) = self.families.get_key_value(sample) {
            return Some(name);
        }
        for suffix in ["_total", "_bucket", "_sum", "_count", "_created", "_info"] {
            if let Some(base) = sample.strip_suffix(suffix) {
                if let Some((name, _)) = self.families.get_key_value(base) {
                    return Some(name);
                }
            }
        }
        None
    }

    /// The value of the sample `name` whose labels are exactly `labels`.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: std::collections::BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == want)
            .map(|s| s.value)
    }

    /// [`Exposition::get`], 0 when the sample is absent (a counter or a
    /// histogram not touched yet for these labels).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }

    /// The samples named `name`.
    pub fn series(&self, name: &str) -> Vec<&Sample> {
        self.samples.iter().filter(|s| s.name == name).collect()
    }
}

/// One sample line, or `None`.
fn parse_sample(line: &str) -> Option<Sample> {
    let name_end = line.find(['{', ' '])?;
    let name = &line[..name_end];
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    {
        return None;
    }
    let mut labels = std::collections::BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(r) = rest.strip_prefix('{') {
        let mut chars = r.char_indices().peekable();
        let end;
        loop {
            // label name
            let start = chars.peek()?.0;
            if r[start..].starts_with('}') {
                end = start + 1;
                break;
            }
            let eq = r[start..].find('=')? + start;
            let key = r[start..eq].trim_start_matches(',').to_string();
            while chars.peek()?.0 <= eq {
                chars.next();
            }
            if chars.next()?.1 != '"' {
                return None;
            }
            let mut value = String::new();
            loop {
                let (_, c) = chars.next()?;
                match c {
                    '"' => break,
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        '"' => value.push('"'),
                        '\\' => value.push('\\'),
                        _ => return None,
                    },
                    c => value.push(c),
                }
            }
            labels.insert(key, value);
            match chars.peek()?.1 {
                ',' => {
                    chars.next();
                }
                '}' => {}
                _ => return None,
            }
        }
        rest = &r[end..];
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// The value of one counter line (`name{labels}`) in a metrics body, 0
/// when absent.
pub fn counter(metrics: &str, series: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0)
}

/// The seed of a test's random timings: `HANDOFF_TEST_SEED` when set, else
/// the clock. Printed (shown when the test fails) with the command that
/// replays it; pass `module_path!()` as `file` (the test file's name) and
/// the test's function name as `test`.
pub fn seed(file: &str, test: &str) -> u64 {
    let seed = match std::env::var("HANDOFF_TEST_SEED") {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("HANDOFF_TEST_SEED={s:?} is not a number")),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    };
    println!(
        "{test}: timing seed {seed}; replay with \
         HANDOFF_TEST_SEED={seed} cargo test -p handoff-tests --test {file} -- --exact {test}"
    );
    seed
}

/// A small deterministic generator for random timings, from a [`seed`].
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> XorShift {
        // Zero is xorshift's one fixed point.
        XorShift(seed | 1)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// JetStream's own record of one agent's inbox, read from NATS rather than
/// through the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inbox {
    /// Handoffs stored for the agent.
    pub stored: u64,
    /// Deliveries its consumer made, redeliveries included.
    pub deliveries: u64,
    /// Stored handoffs not delivered yet.
    pub pending: u64,
    /// Delivered and neither acked nor terminated yet.
    pub unacked: usize,
}

/// The consumer that keeps every handoff stored in an inbox (see
/// [`keep_inboxes`]).
pub const INBOX_WITNESS: &str = "test_witness";

/// Makes the inbox stream keep every handoff stored in it, acked or not,
/// so that a test can count what was stored ([`inbox`]): a durable
/// consumer on every inbox subject that never takes anything. (Without it
/// an acked handoff leaves its inbox.) [`Broker::start`] calls it once
/// the broker made its streams; [`forget_inboxes`] undoes it.
pub async fn keep_inboxes(nats_url: &str) {
    // A cluster's test brokers are given every server, comma-separated.
    let servers: Vec<async_nats::ServerAddr> = nats_url
        .split(',')
        .map(|url| url.trim().parse().expect("a NATS URL"))
        .collect();
    // A NATS that asks for credentials or TLS of its clients is left as
    // it is: `inbox` then refuses to count.
    let connect = async_nats::connect(servers);
    let Ok(Ok(client)) = tokio::time::timeout(Duration::from_secs(5), connect).await else {
        return;
    };
    let js = async_nats::jetstream::new(client);
    let stream = js
        .get_stream(handoffd::store::jetstream::INBOX_STREAM)
        .await
        .expect("the inbox stream");
    stream
        .get_or_create_consumer(
            INBOX_WITNESS,
            async_nats::jetstream::consumer::pull::Config {
                durable_name: Some(INBOX_WITNESS.to_string()),
                filter_subject: "handoff.v1.inbox.>".to_string(),
                ack_policy: async_nats::jetstream::consumer::AckPolicy::Explicit,
                ..Default::default()
            },
        )
        .await
        .expect("the inbox witness");
}

/// The inbox stream of the broker on NATS at `nats_url`.
async fn inbox_stream(nats_url: &str) -> async_nats::jetstream::stream::Stream {
    let client = async_nats::connect(nats_url)
        .await
        .expect("connect to NATS");
    async_nats::jetstream::new(client)
        .get_stream(handoffd::store::jetstream::INBOX_STREAM)
        .await
        .expect("the inbox stream")
}

/// Undoes [`keep_inboxes`]: acked handoffs leave their inbox again, as
/// they do in production.
pub async fn forget_inboxes(nats_url: &str) {
    let stream = inbox_stream(nats_url).await;
    stream
        .delete_consumer(INBOX_WITNESS)
        .await
        .expect("the inbox witness removed");
}

/// What `agent`'s inbox stored (every handoff, acked or not, once
/// [`keep_inboxes`] made it keep them) and how its consumer stands.
pub async fn inbox(nats_url: &str, agent: &str) -> Inbox {
    let stream = inbox_stream(nats_url).await;
    let mut subjects = stream
        .info_with_subjects(format!("handoff.v1.inbox.{agent}"))
        .await
        .expect("inbox subjects");
    let mut stored = 0;
    while let Some(entry) = subjects.next().await {
        stored += entry.expect("inbox subject count").1 as u64;
    }
    let consumer = stream
        .consumer_info(agent)
        .await
        .expect("the agent's consumer");
    assert!(
        stream.consumer_info(INBOX_WITNESS).await.is_ok(),
        "the inbox keeps only unacked handoffs: call keep_inboxes before handing off to count them"
    );
    Inbox {
        stored,
        deliveries: consumer.delivered.consumer_sequence,
        pending: consumer.num_pending,
        unacked: consumer.num_ack_pending,
    }
}

/// `agent`'s inbox once nothing in it is left to deliver (nothing pending,
/// nothing unacked): from then on nothing arrives for the agent unless a
/// new handoff is stored for it. Acks are confirmed by JetStream before the
/// broker answers them, so this is normally true at once; panics if it does
/// not hold within 10 s.
pub async fn settled_inbox(nats_url: &str, agent: &str) -> Inbox {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let state = inbox(nats_url, agent).await;
        if state.pending == 0 && state.unacked == 0 {
            return state;
        }
        assert!(
            Instant::now() < deadline,
            "{agent}'s inbox never settled: {state:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The timeline of run `run_id` once `ready` holds for it (read again
/// until then, for at most 10 s; events the broker publishes without
/// waiting, like `delivered`, may trail the call that caused them).
pub async fn timeline_when(
    client: &Client,
    run_id: &str,
    ready: impl Fn(&[pb::Event]) -> bool,
) -> Vec<pb::Event> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let timeline = client.get_run(run_id).await.expect("get run").timeline;
        if ready(&timeline) {
            return timeline;
        }
        assert!(
            Instant::now() < deadline,
            "run {run_id}: the timeline never got there: {:?}",
            kinds(&timeline)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How many events in `timeline` are of one of `kinds_` and pass `which`.
pub fn count(
    timeline: &[pb::Event],
    kinds_: &[pb::EventKind],
    which: impl Fn(&pb::Event) -> bool,
) -> usize {
    timeline
        .iter()
        .filter(|e| kinds_.iter().any(|k| e.kind == *k as i32) && which(e))
        .count()
}

/// Deliveries of handoff `handoff_id` in `timeline`, redeliveries included.
pub fn deliveries_of(timeline: &[pb::Event], handoff_id: &str) -> usize {
    count(
        timeline,
        &[pb::EventKind::Delivered, pb::EventKind::Redelivered],
        |e| e.handoff_id == handoff_id,
    )
}
