//! The system under test: a `nats-server` (or a three-node JetStream
//! cluster) and a `handoffd` process, all on loopback ports they bind
//! themselves (port 0, read back from their logs), stopped when dropped.

use std::{path::PathBuf, process::Stdio, time::Duration};

use handoff_client::{Client, ConnectOptions};
use handoff_tests::Cluster;
use handoffd::embedded::{NatsServer, Options};
use tempfile::TempDir;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

use crate::BoxError;

/// `nats-server` (unless one was given) and `handoffd` against it.
pub(crate) struct Stack {
    _nats: Option<NatsServer>,
    broker: Child,
    /// The three-node cluster of `--cluster`, kept for the whole run.
    _cluster: Option<Cluster>,
    _dir: TempDir,
    nats_url: String,
    replicas: usize,
    addr: String,
    /// The console's address (it serves on a free port).
    console: Option<std::net::SocketAddr>,
    token: Option<String>,
}

/// Where the stack's NATS comes from.
pub(crate) enum Nats {
    /// A `nats-server` the stack starts.
    Single,
    /// A running NATS at this URL.
    Url(String),
    /// A three-node JetStream cluster the stack starts; the broker and the
    /// raw baselines keep everything in three replicas.
    Cluster,
}

/// Replicas of streams and buckets on a three-node cluster.
const CLUSTER_REPLICAS: usize = 3;

/// The bootstrap admin token of a stack started with auth.
const BENCH_TOKEN: &str = "handoff-bench-bootstrap-admin-token-000001";

impl Stack {
    /// Starts the stack on `nats`; `auth` makes every call authenticated
    /// (a bearer token).
    pub(crate) async fn start(nats: Nats, auth: bool) -> Result<Stack, BoxError> {
        let dir = tempfile::tempdir()?;
        let (server, cluster, url, replicas) = match nats {
            Nats::Url(url) => (None, None, url, 1),
            Nats::Single => {
                let server =
                    NatsServer::start(Options::new("nats-server", dir.path().join("js"))).await?;
                let url = server.url().to_string();
                (Some(server), None, url, 1)
            }
            Nats::Cluster => {
                let cluster = Cluster::try_start().await?;
                let url = cluster.urls_joined();
                (None, Some(cluster), url, CLUSTER_REPLICAS)
            }
        };
        let token_file = dir.path().join("admin-token");
        std::fs::write(&token_file, BENCH_TOKEN)?;
        // Warnings, and the line that says where it serves.
        let mut command = Command::new(broker_bin()?);
        if auth {
            command.env("HANDOFF_AUTH_TOKEN_FILE", &token_file);
        }
        if cluster.is_some() {
            command.env("HANDOFF_REPLICAS", replicas.to_string());
        }
        let mut broker = command
            .env("HANDOFF_CONSOLE_LISTEN", "127.0.0.1:0")
            .args(["--nats-url", &url, "--listen", "127.0.0.1:0"])
            .args(["--log-format", "json"])
            .env("RUST_LOG", "warn,handoffd::server=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stderr = broker.stderr.take().ok_or("no stderr pipe to handoffd")?;
        let mut lines = BufReader::new(stderr).lines();
        let field = |line: &str, name: &str| {
            line.split(&format!("\"{name}\":\""))
                .nth(1)
                .and_then(|s| s.split('"').next())
                .map(str::to_string)
        };
        let mut console = None;
        let listen = tokio::time::timeout(Duration::from_secs(30), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("\"message\":\"handoffd serving\"") {
                    return field(&line, "addr");
                }
                if line.contains("\"message\":\"console serving\"") {
                    console = field(&line, "console").and_then(|a| a.parse().ok());
                }
                pass_on(&line);
            }
            None
        })
        .await
        .ok()
        .flatten()
        .ok_or("handoffd did not report serving within 30 s")?;
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                pass_on(&line);
            }
        });
        let addr = format!("http://{listen}");
        Ok(Stack {
            _nats: server,
            broker,
            _cluster: cluster,
            _dir: dir,
            nats_url: url,
            replicas,
            addr,
            console,
            token: auth.then(|| BENCH_TOKEN.to_string()),
        })
    }

    /// A new SDK client to the broker.
    pub(crate) async fn client(&self) -> Result<Client, BoxError> {
        let mut options = ConnectOptions::new();
        if let Some(token) = &self.token {
            options = options.token(token.as_str());
        }
        Ok(options.connect(&self.addr).await?)
    }

    /// The console's address, if it serves.
    pub(crate) fn console(&self) -> Option<std::net::SocketAddr> {
        self.console
    }

    /// The broker's gRPC address.
    pub(crate) fn addr(&self) -> &str {
        &self.addr
    }

    /// The NATS URL (on a cluster, every node's, comma-separated), for the
    /// raw JetStream baselines.
    pub(crate) fn nats_url(&self) -> &str {
        &self.nats_url
    }

    /// The replicas the broker keeps its streams and buckets in, for the
    /// raw JetStream baselines to keep theirs alike.
    pub(crate) fn replicas(&self) -> usize {
        self.replicas
    }

    /// The version of the NATS server the raw baselines connect to.
    pub(crate) async fn nats_version(&self) -> Result<String, BoxError> {
        let first = self.nats_url.split(',').next().unwrap_or_default();
        let client = async_nats::connect(first).await?;
        Ok(client.server_info().version)
    }

    /// The process id of the nats-server the stack started (none on a
    /// cluster or a given URL).
    pub(crate) fn nats_pid(&self) -> Option<u32> {
        self._nats.as_ref().and_then(NatsServer::pid)
    }

    /// The broker process's id.
    pub(crate) fn broker_pid(&self) -> Option<u32> {
        self.broker.id()
    }

    /// The broker's resident memory in bytes.
    pub(crate) fn broker_rss(&self) -> Option<u64> {
        rss(self.broker_pid()?)
    }
}

/// Shows a log line of the broker unless it is informational.
fn pass_on(line: &str) {
    if !line.contains("\"level\":\"INFO\"") {
        eprintln!("{line}");
    }
}

/// Resident memory of process `pid` in bytes, from `/proc`.
pub(crate) fn rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// `handoffd-bench`, built next to this binary.
fn broker_bin() -> Result<PathBuf, BoxError> {
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .map(|d| d.join("handoffd-bench"))
        .ok_or("no directory for handoffd-bench")?;
    if !bin.exists() {
        return Err(format!(
            "{} not found: build the crate's binaries (cargo run --release -p handoff-bench)",
            bin.display()
        )
        .into());
    }
    Ok(bin)
}
