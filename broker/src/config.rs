//! Configuration: defaults, then a TOML file, then `HANDOFF_*` environment
//! variables, then command-line flags (each overrides the one before).
//!
//! Every key is declared once in [`KEYS`] with its default and a doc line;
//! the README's configuration table is the same list. Loading reports every
//! problem at once, so an operator fixes a bad config in one round.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, time::Duration};

/// One configuration key: name, default (as written in TOML) and meaning.
pub struct Key {
    /// TOML key; the environment variable is `HANDOFF_` + its upper case.
    pub name: &'static str,
    /// Default, as a TOML literal (empty: unset).
    pub default: &'static str,
    /// What it does.
    pub doc: &'static str,
}

/// All keys, in the order the README documents them.
pub const KEYS: &[Key] = &[
    Key {
        name: "nats_url",
        default: "",
        doc: "NATS server(s), comma-separated (nats://, tls://; a host without a scheme is nats://). The broker starts from any one that answers and reconnects to any of them. Unset: start an embedded nats-server child.",
    },
    Key {
        name: "nats_server_bin",
        default: "nats-server",
        doc: "nats-server executable used for the embedded default.",
    },
    Key {
        name: "listen",
        default: "127.0.0.1:7233",
        doc: "gRPC listen address.",
    },
    Key {
        name: "data_dir",
        default: "./handoffd-data",
        doc: "Data directory (the embedded nats-server keeps JetStream under <data_dir>/nats).",
    },
    Key {
        name: "log_format",
        default: "text",
        doc: "text or json.",
    },
    Key {
        name: "log_level",
        default: "info",
        doc: "tracing filter directive; RUST_LOG overrides it.",
    },
    Key {
        name: "replicas",
        default: "1",
        doc: "JetStream replicas of streams and buckets (3 on a three-node cluster).",
    },
    Key {
        name: "default_lease",
        default: "30s",
        doc: "Lease of an agent that does not set one.",
    },
    Key {
        name: "default_max_attempts",
        default: "5",
        doc: "Deliveries before fallback or dead letter, for agents that do not set it.",
    },
    Key {
        name: "default_run_timeout",
        default: "24h",
        doc: "Deadline of a run that sets no timeout (a run has none only when it asks for no_timeout).",
    },
    Key {
        name: "default_max_depth",
        default: "5",
        doc: "Sequential hops allowed in a run that does not set max_depth.",
    },
    Key {
        name: "max_inline_payload",
        default: "262144",
        doc: "Largest payload carried inline in a handoff envelope, in bytes; larger ones (up to max_payload_size) are stored in the handoff_payloads object store and the envelope carries a reference.",
    },
    Key {
        name: "max_payload_size",
        default: "67108864",
        doc: "Largest payload accepted, in bytes (the encoded Any, type URL included); larger ones are refused (PAYLOAD_TOO_LARGE). gRPC requests may be this large plus 4 MiB.",
    },
    Key {
        name: "max_state_value_bytes",
        default: "65536",
        doc: "Largest encoded value of one run-state key, in bytes; a delta over it is refused (STATE_TOO_LARGE).",
    },
    Key {
        name: "max_state_bytes",
        default: "262144",
        doc: "Largest run-state document (keys and encoded values), in bytes; a delta over it is refused (STATE_TOO_LARGE).",
    },
    Key {
        name: "state_cache_bytes",
        default: "16777216",
        doc: "Memory this replica spends caching run-state revisions, in bytes (0: no cache).",
    },
    Key {
        name: "dedupe_window",
        default: "2m",
        doc: "How long an idempotency key (or a consumed delivery) is recognised.",
    },
    Key {
        name: "retention",
        default: "7d",
        doc: "How long handoffs, events and dead letters are kept.",
    },
    Key {
        name: "replica_name",
        default: "",
        doc: "This replica's name, as ListInstances shows it (empty: <hostname>-<pid>).",
    },
    Key {
        name: "instance_expiry",
        default: "30s",
        doc: "How long a live session's record outlives a replica that died (refreshed every third of it while the session lives).",
    },
    Key {
        name: "drain_timeout",
        default: "10s",
        doc: "Grace period for in-flight RPCs on SIGTERM.",
    },
    Key {
        name: "connect_timeout",
        default: "10s",
        doc: "Time allowed to reach NATS (and the embedded server to start).",
    },
    Key {
        name: "nats_timeout",
        default: "5s",
        doc: "Longest a call waits on an unreachable NATS (or on one JetStream request) before it answers UNAVAILABLE with reason NATS_UNAVAILABLE.",
    },
    Key {
        name: "nats_reconnect_delay",
        default: "250ms",
        doc: "Longest pause between attempts to reconnect to NATS (the first attempts follow at once, then back off to this).",
    },
    Key {
        name: "max_in_flight",
        default: "1000",
        doc: "Cap on max_in_flight of one Subscribe stream.",
    },
    Key {
        name: "tokenizer",
        default: "o200k_base",
        doc: "BPE encoding that counts payload tokens for max_tokens: o200k_base, cl100k_base, p50k_base or r50k_base.",
    },
    Key {
        name: "metrics_listen",
        default: "",
        doc: "Address of the metrics endpoint (GET /metrics, OpenMetrics text for Prometheus). Unset: no endpoint. Off loopback it needs auth: every scrape presents a bearer token of a principal with read, in clear over plain HTTP, so it also needs --insecure.",
    },
    Key {
        name: "console_listen",
        default: CONSOLE_LISTEN,
        doc: "Address of the web console (runs, agents, contracts, barriers; sign-in with an API token when auth is on). Empty: no console. At the default address, a port already taken only logs a warning. With tls_cert and tls_key it serves HTTPS with them (the session cookie is then Secure). Off loopback it needs auth, and TLS or --insecure.",
    },
    Key {
        name: "pipeline_judges",
        default: "",
        doc: "Judge agents by pipeline, comma-separated `pipeline=agent:threshold` (e.g. `travel=judge:0.7`): a run of that pipeline started without a judge of its own gets this one.",
    },
    Key {
        name: "otlp_endpoint",
        default: "",
        doc: "OTLP/gRPC collector the broker exports its traces to (http://host:4317, or https:// verified against the system's roots): a send span per handoff, continuing the caller's W3C trace context. Unset: no spans, no exporter.",
    },
    Key {
        name: "tls_cert",
        default: "",
        doc: "PEM file of the server's certificate chain; with tls_key, gRPC is served over TLS only. Unset: plaintext.",
    },
    Key {
        name: "tls_key",
        default: "",
        doc: "PEM file of the server certificate's private key. Under systemd, LoadCredential= puts it in $CREDENTIALS_DIRECTORY (/run/credentials/handoffd.service/).",
    },
    Key {
        name: "tls_client_ca",
        default: "",
        doc: "PEM file of the CA whose client certificates are accepted (mTLS; needs tls_cert). Clients without a certificate may still connect and present a token.",
    },
    Key {
        name: "auth_token_file",
        default: "",
        doc: "File holding the bootstrap admin token, at least 32 characters (systemd: LoadCredential=, in $CREDENTIALS_DIRECTORY). This or tls_client_ca set: every call must be authenticated (bearer token or client certificate).",
    },
    Key {
        name: "insecure",
        default: "false",
        doc: "Serve without auth on a listen address that is not loopback, bearer tokens off loopback without TLS, or the metrics endpoint off loopback (each refused otherwise).",
    },
    Key {
        name: "outbox_capacity",
        default: "65536",
        doc: "Events waiting to be stored that a replica holds at most; past it, the steps that emit them wait up to a second, then the event is dropped and counted (handoff_events_dropped_total).",
    },
    Key {
        name: "events_max_bytes",
        default: "1073741824",
        doc: "Byte limit of the events stream (HANDOFF_EVENTS), at least 1048576 (-1: none); past it the oldest events are discarded.",
    },
    Key {
        name: "stream_max_bytes",
        default: "1073741824",
        doc: "Byte limit of every other stream and bucket the broker creates (inboxes, branches, dead letters, timers, payloads, runs, state, leases, ...: 16 of them; the live-session bucket takes at most 64 MiB); past it new writes are refused (UNAVAILABLE), nothing stored is discarded; at least 1048576 (-1: none). JetStream reserves every limit on each server: their sum must fit its max_file_store. An existing stream that holds more than its new limit keeps its old one (with a warning).",
    },
    Key {
        name: "nats_user",
        default: "",
        doc: "NATS user name; its password is read from nats_password_file.",
    },
    Key {
        name: "nats_password_file",
        default: "",
        doc: "File holding the NATS password of nats_user (systemd: LoadCredential=, in $CREDENTIALS_DIRECTORY).",
    },
    Key {
        name: "nats_token_file",
        default: "",
        doc: "File holding a NATS authentication token (systemd: LoadCredential=, in $CREDENTIALS_DIRECTORY).",
    },
    Key {
        name: "nats_nkey_seed_file",
        default: "",
        doc: "File holding a NATS NKey seed, SU... (systemd: LoadCredential=, in $CREDENTIALS_DIRECTORY).",
    },
    Key {
        name: "nats_creds_file",
        default: "",
        doc: "NATS credentials file: user JWT and NKey seed, from nsc (systemd: LoadCredential=, in $CREDENTIALS_DIRECTORY).",
    },
    Key {
        name: "nats_tls_ca",
        default: "",
        doc: "PEM file of the CA that signed the NATS servers' certificates; set: TLS to NATS is required.",
    },
    Key {
        name: "nats_tls_cert",
        default: "",
        doc: "PEM file of the broker's client certificate for NATS (with nats_tls_key).",
    },
    Key {
        name: "nats_tls_key",
        default: "",
        doc: "PEM file of the private key of nats_tls_cert (systemd: LoadCredential=, in $CREDENTIALS_DIRECTORY).",
    },
];

/// The BPE encodings `tokenizer` may name.
pub const TOKENIZERS: &[&str] = &["o200k_base", "cl100k_base", "p50k_base", "r50k_base"];

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The resolved configuration of a broker.
#[derive(Debug, Clone)]
pub struct Config {
    /// NATS URL; `None` starts the embedded server.
    pub nats_url: Option<String>,
    /// nats-server executable for the embedded default.
    pub nats_server_bin: PathBuf,
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Log format.
    pub log_format: LogFormat,
    /// tracing filter.
    pub log_level: String,
    /// JetStream replicas.
    pub replicas: usize,
    /// Default agent lease.
    pub default_lease: Duration,
    /// Default max attempts.
    pub default_max_attempts: u32,
    /// Default run max depth.
    pub default_max_depth: u32,
    /// Deadline of a run that sets no timeout.
    pub default_run_timeout: Duration,
    /// Inline payload limit in bytes: larger payloads go by reference.
    pub max_inline_payload: usize,
    /// Largest payload accepted in bytes (by reference above the inline
    /// limit).
    pub max_payload_size: usize,
    /// Largest encoded value of one run-state key.
    pub max_state_value_bytes: usize,
    /// Largest run-state document.
    pub max_state_bytes: usize,
    /// Memory spent caching run-state revisions.
    pub state_cache_bytes: usize,
    /// JetStream duplicate window.
    pub dedupe_window: Duration,
    /// Stream retention.
    pub retention: Duration,
    /// This replica's name in ListInstances.
    pub replica_name: String,
    /// How long a live session's record outlives its replica.
    pub instance_expiry: Duration,
    /// Drain grace period.
    pub drain_timeout: Duration,
    /// NATS connect timeout.
    pub connect_timeout: Duration,
    /// Bound of a call's wait on NATS.
    pub nats_timeout: Duration,
    /// Longest pause between reconnection attempts.
    pub nats_reconnect_delay: Duration,
    /// Cap on max_in_flight per Subscribe.
    pub max_in_flight: u32,
    /// Events a replica holds waiting to be stored, at most.
    pub outbox_capacity: usize,
    /// Byte limit of the events stream.
    pub events_max_bytes: i64,
    /// Byte limit of every other stream and bucket.
    pub stream_max_bytes: i64,
    /// BPE encoding for token budgets.
    pub tokenizer: String,
    /// Prometheus endpoint address, if any.
    pub metrics_listen: Option<SocketAddr>,
    /// The web console's address, if any.
    pub console_listen: Option<SocketAddr>,
    /// OTLP/gRPC collector URL for traces, if any (checked: `http` or
    /// `https`, with a host).
    pub otlp_endpoint: Option<String>,
    /// Judge agents by pipeline: (agent, threshold).
    pub pipeline_judges: std::collections::HashMap<String, (String, f64)>,
    /// TLS to clients: the server's certificate chain and key, if set.
    pub tls: Option<TlsFiles>,
    /// CA of accepted client certificates (mTLS), if set.
    pub tls_client_ca: Option<PathBuf>,
    /// File of the bootstrap admin API token, if set.
    pub auth_token_file: Option<PathBuf>,
    /// Serve without auth on a non-loopback address.
    pub insecure: bool,
    /// How the broker authenticates to NATS, and TLS to NATS.
    pub nats_auth: NatsAuth,
    /// Fault injection for tests; not a configuration key.
    pub faults: Faults,
}

/// A certificate chain and its private key, as PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    /// The private key.
    pub key: PathBuf,
}

/// The broker's NATS credentials and TLS settings: paths of files, read
/// when the broker connects, so no secret sits in the TOML or the
/// environment. At most one of user/password, token, NKey seed and
/// credentials file is set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatsAuth {
    /// User name (its password in `password_file`).
    pub user: Option<String>,
    /// File of the password of `user`.
    pub password_file: Option<PathBuf>,
    /// File of an authentication token.
    pub token_file: Option<PathBuf>,
    /// File of an NKey seed.
    pub nkey_seed_file: Option<PathBuf>,
    /// Credentials file (JWT and seed).
    pub creds_file: Option<PathBuf>,
    /// CA of the NATS servers' certificates; set: TLS is required.
    pub tls_ca: Option<PathBuf>,
    /// The broker's client certificate and key for NATS.
    pub tls_client: Option<TlsFiles>,
}

/// The replica name when none is configured: the host's name and this
/// process's id.
/// The console's default address.
pub const CONSOLE_LISTEN: &str = "127.0.0.1:7234";

fn default_replica_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "handoffd".to_string());
    format!("{host}-{}", std::process::id())
}

/// Faults a test can inject to reproduce crashes at exact points.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Store a complete-and-handoff but skip acking the consumed delivery,
    /// as if the broker died between the two steps.
    pub skip_consume_ack: bool,
    /// Claim the consumed delivery of a complete-and-handoff, then fail
    /// before storing anything and leave the claim, as if the broker died
    /// between the two steps.
    pub die_after_claim: bool,
    /// Take no claim on a consumed delivery, nor its inbox slot (a broken
    /// broker: a redo with other content is stored again), for tests that
    /// must catch it.
    pub skip_claim: bool,
    /// Send deliveries with an intent digest that does not match their
    /// pinned context, as a corrupted or tampered delivery would be.
    pub corrupt_intent_digest: bool,
}

impl Default for Config {
    fn default() -> Self {
        let empty = BTreeMap::new();
        // The defaults in KEYS always parse; a failure here is a bug in KEYS.
        match Config::from_layers(&empty) {
            Ok(c) => c,
            Err(problems) => panic!("built-in defaults do not parse: {problems:?}"),
        }
    }
}

impl Config {
    /// Resolves a config from layered raw values (`key -> value`). The
    /// defaults of [`KEYS`] fill what is missing; every problem is reported.
    pub fn from_layers(values: &BTreeMap<String, String>) -> Result<Config, Vec<String>> {
        let mut problems = Vec::new();
        for k in values.keys() {
            if !KEYS.iter().any(|key| key.name == k) {
                problems.push(format!("unknown configuration key {k:?}"));
            }
        }
        let raw = |name: &str| -> String {
            values.get(name).cloned().unwrap_or_else(|| {
                KEYS.iter()
                    .find(|k| k.name == name)
                    .map(|k| k.default.to_string())
                    .unwrap_or_default()
            })
        };
        let dur = |name: &str, problems: &mut Vec<String>| -> Duration {
            let v = raw(name);
            match humantime::parse_duration(&v) {
                Ok(d) if !d.is_zero() => d,
                Ok(_) => {
                    problems.push(format!("{name}: must be greater than zero"));
                    Duration::from_secs(1)
                }
                Err(e) => {
                    problems.push(format!(
                        "{name}: {v:?} is not a duration ({e}); write e.g. \"30s\" or \"5m\""
                    ));
                    Duration::from_secs(1)
                }
            }
        };
        fn num<T>(name: &str, v: String, min: T, problems: &mut Vec<String>) -> T
        where
            T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy,
        {
            match v.trim().parse::<T>() {
                Ok(n) if n >= min => n,
                Ok(_) => {
                    problems.push(format!("{name}: must be at least {min}"));
                    min
                }
                Err(_) => {
                    problems.push(format!("{name}: {v:?} is not a number"));
                    min
                }
            }
        }
        // A stream's byte limit: at least 1 MiB, or -1 for none.
        fn byte_limit(name: &str, v: String, problems: &mut Vec<String>) -> i64 {
            match v.trim().parse::<i64>() {
                Ok(-1) => -1,
                Ok(n) if n >= 1 << 20 => n,
                _ => {
                    problems.push(format!(
                        "{name}: {v:?} is not a byte count of at least 1048576 (or -1: no limit)"
                    ));
                    1 << 30
                }
            }
        }
        let default_lease = dur("default_lease", &mut problems);
        let default_run_timeout = dur("default_run_timeout", &mut problems);
        let dedupe_window = dur("dedupe_window", &mut problems);
        let retention = dur("retention", &mut problems);
        let drain_timeout = dur("drain_timeout", &mut problems);
        let instance_expiry = dur("instance_expiry", &mut problems);
        if instance_expiry < Duration::from_secs(1) {
            problems.push("instance_expiry: must be at least 1s".to_string());
        }
        let replica_name = match raw("replica_name") {
            name if name.is_empty() => default_replica_name(),
            name => {
                if name.len() > 128 || name.chars().any(char::is_control) {
                    problems.push(
                        "replica_name: at most 128 characters, none of them control characters"
                            .to_string(),
                    );
                }
                name
            }
        };
        let connect_timeout = dur("connect_timeout", &mut problems);
        let nats_timeout = dur("nats_timeout", &mut problems);
        let nats_reconnect_delay = dur("nats_reconnect_delay", &mut problems);
        let listen = match raw("listen").parse::<SocketAddr>() {
            Ok(a) => a,
            Err(e) => {
                problems.push(format!(
                    "listen: {:?} is not a socket address ({e})",
                    raw("listen")
                ));
                SocketAddr::from(([127, 0, 0, 1], 7233))
            }
        };
        let log_format = match raw("log_format").as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                problems.push(format!(
                    "log_format: {other:?} is neither \"text\" nor \"json\""
                ));
                LogFormat::Text
            }
        };
        let replicas = num::<usize>("replicas", raw("replicas"), 1, &mut problems);
        if replicas > 5 {
            problems.push("replicas: JetStream allows at most 5".to_string());
        }
        let tokenizer = raw("tokenizer");
        if !TOKENIZERS.contains(&tokenizer.as_str()) {
            problems.push(format!(
                "tokenizer: {tokenizer:?} is not one of {}",
                TOKENIZERS.join(", ")
            ));
        }
        let metrics_listen = match raw("metrics_listen").trim() {
            "" => None,
            addr => match addr.parse::<SocketAddr>() {
                Ok(a) => Some(a),
                Err(e) => {
                    problems.push(format!(
                        "metrics_listen: {addr:?} is not a socket address ({e})"
                    ));
                    None
                }
            },
        };
        let console_listen = match raw("console_listen").trim() {
            "" => None,
            addr => match addr.parse::<SocketAddr>() {
                Ok(a) => Some(a),
                Err(e) => {
                    problems.push(format!(
                        "console_listen: {addr:?} is not a socket address ({e})"
                    ));
                    None
                }
            },
        };
        let otlp_endpoint = match raw("otlp_endpoint").trim() {
            "" => None,
            url => match otlp_endpoint(url) {
                Ok(()) => Some(url.to_string()),
                Err(e) => {
                    problems.push(format!("otlp_endpoint: {e}"));
                    None
                }
            },
        };
        let pipeline_judges = match pipeline_judges(&raw("pipeline_judges")) {
            Ok(j) => j,
            Err(e) => {
                problems.push(format!("pipeline_judges: {e}"));
                Default::default()
            }
        };
        let nats_url = Some(raw("nats_url")).filter(|s| !s.trim().is_empty());
        if let Some(Err(e)) = nats_url.as_deref().map(nats_servers) {
            problems.push(format!("nats_url: {e}"));
        }
        let path = |name: &str| -> Option<PathBuf> {
            Some(raw(name))
                .filter(|s| !s.trim().is_empty())
                .map(PathBuf::from)
        };
        let pair = |cert: &str, key: &str, problems: &mut Vec<String>| -> Option<TlsFiles> {
            match (path(cert), path(key)) {
                (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
                (None, None) => None,
                (Some(_), None) => {
                    problems.push(format!("{cert} is set without {key}: set both or neither"));
                    None
                }
                (None, Some(_)) => {
                    problems.push(format!("{key} is set without {cert}: set both or neither"));
                    None
                }
            }
        };
        let tls = pair("tls_cert", "tls_key", &mut problems);
        let tls_client_ca = path("tls_client_ca");
        if tls_client_ca.is_some() && tls.is_none() {
            problems.push(
                "tls_client_ca: client certificates need TLS; set tls_cert and tls_key too"
                    .to_string(),
            );
        }
        let insecure = match raw("insecure").trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => true,
            "false" | "0" | "no" | "off" | "" => false,
            other => {
                problems.push(format!("insecure: {other:?} is neither true nor false"));
                false
            }
        };
        let nats_auth = NatsAuth {
            user: Some(raw("nats_user")).filter(|s| !s.trim().is_empty()),
            password_file: path("nats_password_file"),
            token_file: path("nats_token_file"),
            nkey_seed_file: path("nats_nkey_seed_file"),
            creds_file: path("nats_creds_file"),
            tls_ca: path("nats_tls_ca"),
            tls_client: pair("nats_tls_cert", "nats_tls_key", &mut problems),
        };
        match (&nats_auth.user, &nats_auth.password_file) {
            (Some(_), None) => {
                problems.push("nats_user is set without nats_password_file".to_string())
            }
            (None, Some(_)) => {
                problems.push("nats_password_file is set without nats_user".to_string())
            }
            _ => {}
        }
        let methods: Vec<&str> = [
            ("nats_user", nats_auth.user.is_some()),
            ("nats_token_file", nats_auth.token_file.is_some()),
            ("nats_nkey_seed_file", nats_auth.nkey_seed_file.is_some()),
            ("nats_creds_file", nats_auth.creds_file.is_some()),
        ]
        .into_iter()
        .filter_map(|(k, set)| set.then_some(k))
        .collect();
        if methods.len() > 1 {
            problems.push(format!(
                "{} are all set: NATS takes one way to authenticate",
                methods.join(", ")
            ));
        }
        if nats_url.is_none() && nats_auth != NatsAuth::default() {
            problems.push(
                "nats_user, nats_*_file and nats_tls_* apply to nats_url, which is unset: the embedded nats-server uses a password handoffd generates at each start"
                    .to_string(),
            );
        }
        let auth_token_file = path("auth_token_file");
        let auth_configured = auth_token_file.is_some() || tls_client_ca.is_some();
        if !auth_configured && !insecure && !listen.ip().is_loopback() {
            problems.push(format!(
                "listen {listen} is not loopback and no auth is configured (auth_token_file or tls_client_ca); pass --insecure to serve anyway"
            ));
        }
        if auth_configured && tls.is_none() && !insecure && !listen.ip().is_loopback() {
            problems.push(format!(
                "listen {listen} is not loopback and serves without TLS: bearer tokens would cross the network in clear; set tls_cert and tls_key, or pass --insecure"
            ));
        }
        if let Some(metrics) = metrics_listen.filter(|m| !m.ip().is_loopback()) {
            if !auth_configured {
                problems.push(format!(
                    "metrics_listen {metrics} is not loopback and no auth is configured: scrapes off loopback must present a bearer token; configure auth_token_file, or serve metrics on loopback"
                ));
            } else if !insecure {
                problems.push(format!(
                    "metrics_listen {metrics} is not loopback: its scrapes present bearer tokens over plain HTTP; serve it on loopback (behind a TLS proxy), or pass --insecure"
                ));
            }
        }
        if let Some(console) = console_listen.filter(|c| !c.ip().is_loopback()) {
            if !auth_configured {
                problems.push(format!(
                    "console_listen {console} is not loopback and no auth is configured: anyone who reaches it could read and cancel every run; configure auth_token_file, serve the console on loopback, or set console_listen to \"\""
                ));
            } else if tls.is_none() && !insecure {
                problems.push(format!(
                    "console_listen {console} is not loopback and serves without TLS: its sign-in and session cookie would cross the network in clear; set tls_cert and tls_key (the console serves HTTPS with them), or pass --insecure"
                ));
            }
        }
        if retention < dedupe_window {
            problems.push("retention: must be at least dedupe_window".to_string());
        }
        let max_inline_payload = num(
            "max_inline_payload",
            raw("max_inline_payload"),
            1,
            &mut problems,
        );
        let max_payload_size = num(
            "max_payload_size",
            raw("max_payload_size"),
            1usize,
            &mut problems,
        );
        if max_payload_size < max_inline_payload {
            problems.push(format!(
                "max_payload_size: {max_payload_size} is under max_inline_payload ({max_inline_payload})"
            ));
        }
        let config = Config {
            nats_url,
            nats_server_bin: PathBuf::from(raw("nats_server_bin")),
            listen,
            data_dir: PathBuf::from(raw("data_dir")),
            log_format,
            log_level: raw("log_level"),
            replicas,
            default_lease,
            default_run_timeout,
            default_max_attempts: num(
                "default_max_attempts",
                raw("default_max_attempts"),
                1,
                &mut problems,
            ),
            default_max_depth: num(
                "default_max_depth",
                raw("default_max_depth"),
                1,
                &mut problems,
            ),
            max_inline_payload,
            max_payload_size,
            max_state_value_bytes: num(
                "max_state_value_bytes",
                raw("max_state_value_bytes"),
                1,
                &mut problems,
            ),
            max_state_bytes: num("max_state_bytes", raw("max_state_bytes"), 1, &mut problems),
            state_cache_bytes: num(
                "state_cache_bytes",
                raw("state_cache_bytes"),
                0,
                &mut problems,
            ),
            dedupe_window,
            retention,
            replica_name,
            instance_expiry,
            drain_timeout,
            connect_timeout,
            nats_timeout,
            nats_reconnect_delay,
            max_in_flight: num("max_in_flight", raw("max_in_flight"), 1, &mut problems),
            outbox_capacity: num("outbox_capacity", raw("outbox_capacity"), 1, &mut problems),
            events_max_bytes: byte_limit(
                "events_max_bytes",
                raw("events_max_bytes"),
                &mut problems,
            ),
            stream_max_bytes: byte_limit(
                "stream_max_bytes",
                raw("stream_max_bytes"),
                &mut problems,
            ),
            tokenizer,
            metrics_listen,
            console_listen,
            otlp_endpoint,
            pipeline_judges,
            tls,
            tls_client_ca,
            auth_token_file,
            insecure,
            nats_auth,
            faults: Faults::default(),
        };
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(problems)
        }
    }

    /// Whether clients must authenticate: `auth_token_file` or
    /// `tls_client_ca` is set. Without it the broker serves on loopback
    /// only (unless `insecure`), and warns.
    pub fn auth_configured(&self) -> bool {
        self.auth_token_file.is_some() || self.tls_client_ca.is_some()
    }

    /// Reads a TOML file into raw values (every value rendered as a string).
    pub fn read_toml(path: &std::path::Path) -> Result<BTreeMap<String, String>, Vec<String>> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| vec![format!("config file {}: {e}", path.display())])?;
        let table: toml::Table = text
            .parse()
            .map_err(|e| vec![format!("config file {}: {e}", path.display())])?;
        let mut out = BTreeMap::new();
        let mut problems = Vec::new();
        for (k, v) in table {
            let s = match v {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                other => {
                    problems.push(format!("{k}: unsupported value {other}"));
                    continue;
                }
            };
            out.insert(k, s);
        }
        if problems.is_empty() {
            Ok(out)
        } else {
            Err(problems)
        }
    }

    /// Raw values from `HANDOFF_<KEY>` environment variables.
    pub fn read_env(get: impl Fn(&str) -> Option<String>) -> BTreeMap<String, String> {
        KEYS.iter()
            .filter_map(|k| get(&env_var(k.name)).map(|v| (k.name.to_string(), v)))
            .collect()
    }
}

/// The servers of a `nats_url` list: comma-separated URLs, each checked
/// (a malformed one is named with what is wrong with it).
pub fn nats_servers(list: &str) -> Result<Vec<async_nats::ServerAddr>, String> {
    let mut servers = Vec::new();
    for url in list.split(',').map(str::trim) {
        if url.is_empty() {
            return Err(format!("{list:?} has an empty entry; write comma-separated URLs such as \"tls://nats-1:4222,tls://nats-2:4222\""));
        }
        match url.parse::<async_nats::ServerAddr>() {
            Ok(addr) => servers.push(addr),
            Err(e) => return Err(format!("{url:?} is not a NATS URL ({e})")),
        }
    }
    Ok(servers)
}

/// Parses `pipeline_judges`: comma-separated `pipeline=agent:threshold`,
/// names as agent names, the threshold in [0, 1].
pub fn pipeline_judges(
    text: &str,
) -> Result<std::collections::HashMap<String, (String, f64)>, String> {
    let mut out = std::collections::HashMap::new();
    for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let bad = || format!("{item:?} is not pipeline=agent:threshold (e.g. travel=judge:0.7)");
        let (pipeline, judge) = item.split_once('=').ok_or_else(bad)?;
        let (agent, threshold) = judge.split_once(':').ok_or_else(bad)?;
        let (pipeline, agent) = (pipeline.trim(), agent.trim());
        for name in [pipeline, agent] {
            if let Some(p) = crate::rules::names::problem(name) {
                return Err(format!("{item:?}: {name:?} {p}"));
            }
        }
        let threshold: f64 = threshold
            .trim()
            .parse()
            .ok()
            .filter(|t| (0.0..=1.0).contains(t))
            .ok_or_else(|| format!("{item:?}: the threshold must be a number in [0, 1]"))?;
        if out
            .insert(pipeline.to_string(), (agent.to_string(), threshold))
            .is_some()
        {
            return Err(format!("pipeline {pipeline:?} is given twice"));
        }
    }
    Ok(out)
}

/// Checks an `otlp_endpoint`: an absolute `http` or `https` URL with a
/// host and no path (the exporter adds the gRPC method's own).
pub fn otlp_endpoint(url: &str) -> Result<(), String> {
    let uri = url
        .parse::<tonic::codegen::http::Uri>()
        .map_err(|e| format!("{url:?} is not a URL ({e}); write e.g. \"http://127.0.0.1:4317\""))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        Some(other) => {
            return Err(format!(
                "{url:?}: the scheme {other:?} is neither http nor https (OTLP over gRPC)"
            ))
        }
        None => {
            return Err(format!(
                "{url:?} has no scheme; write e.g. \"http://127.0.0.1:4317\""
            ))
        }
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("{url:?} has no host"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(format!(
            "{url:?} has a path; give the collector's address only (http://host:port)"
        ));
    }
    Ok(())
}

/// The environment variable of a key.
pub fn env_var(key: &str) -> String {
    format!("HANDOFF_{}", key.to_ascii_uppercase())
}

#[cfg(test)]
mod tests;
