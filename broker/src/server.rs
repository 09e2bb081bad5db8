//! Starting, serving and draining the broker.
//!
//! [`run`] is the whole daemon minus process concerns: it connects to NATS
//! (or starts the embedded server), opens the store, serves gRPC on the
//! given listener until `shutdown` resolves, then drains under
//! `drain_timeout`. The binary and the tests call the same function.

use std::{future::Future, net::SocketAddr, time::Duration};

use handoff_proto::{server::handoff_broker_server::HandoffBrokerServer, FILE_DESCRIPTOR_SET};
use tokio::{
    net::TcpListener,
    sync::{oneshot, watch},
};

use crate::{
    app::{auth::Auth, Broker},
    config::Config,
    embedded::{self, EmbeddedError, NatsServer},
    error::BrokerError,
    rpc::Service,
    store::JetStream,
    timers,
};

/// Why the broker could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The embedded nats-server could not start.
    #[error(transparent)]
    Embedded(#[from] EmbeddedError),
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
    let embedded = match &config.nats_url {
        Some(_) => None,
        None => {
            let mut opts =
                embedded::Options::new(&config.nats_server_bin, config.data_dir.join("nats"));
            opts.ready_timeout = config.connect_timeout;
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
    let result = serve(&config, &nats_url, addr, listener, shutdown, ready).await;
    if let Some(server) = embedded {
        server.stop(Duration::from_secs(10)).await;
        tracing::info!("embedded nats-server stopped");
    }
    result
}

async fn serve(
    config: &Config,
    nats_url: &str,
    addr: SocketAddr,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    ready: Option<oneshot::Sender<Ready>>,
) -> Result<(), RunError> {
    let client = async_nats::ConnectOptions::new()
        .name("handoffd")
        .connection_timeout(config.connect_timeout)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .event_callback(|event| async move {
            tracing::info!(%event, "NATS connection");
        });
    let client = tokio::time::timeout(config.connect_timeout, client.connect(nats_url))
        .await
        .map_err(|_| RunError::Connect {
            url: nats_url.to_string(),
            reason: format!("no answer within {:?}", config.connect_timeout),
        })?
        .map_err(|e| RunError::Connect {
            url: nats_url.to_string(),
            reason: e.to_string(),
        })?;
    let store = JetStream::open(client.clone(), config).await?;
    let (drain_tx, drain_rx) = watch::channel(false);
    let auth = match &config.auth_token_file {
        None => {
            tracing::warn!(%addr, "no auth configured: every caller may do anything (serve on loopback only)");
            Auth::disabled()
        }
        Some(path) => Auth::required(Some(read_secret(path)?)),
    };
    let broker = Broker::with_auth(
        config.clone(),
        std::sync::Arc::new(store.clone()),
        drain_rx,
        auth,
    );
    crate::app::auth::load_keys(&broker).await?;
    // Watch contracts from where the load ends, so it does not load them
    // all again.
    let watch_from = store.contracts_revision().await? + 1;
    let loaded = broker.load_contracts().await?;
    tracing::debug!(contracts = loaded, "contract versions loaded");
    let metrics_task = match config.metrics_listen {
        None => None,
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| RunError::Serve(format!("metrics_listen {addr}: {e}")))?;
            tracing::info!(addr = %listener.local_addr().unwrap_or(addr), "metrics endpoint serving");
            Some(tokio::spawn(crate::metrics::serve(
                listener,
                broker.metrics().clone(),
            )))
        }
    };
    let timer_task = tokio::spawn(timers::run(broker.clone(), store.clone()));
    let agents_task = tokio::spawn(watch_agents(broker.clone(), store.clone()));
    let contracts_task = tokio::spawn(watch_contracts(broker.clone(), store, watch_from));

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<HandoffBrokerServer<Service>>()
        .await;
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
    let service = HandoffBrokerServer::new(Service::new(broker.clone()))
        .max_decoding_message_size(config.max_inline_payload.saturating_mul(2).max(4 << 20));

    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let server = tonic::transport::Server::builder()
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
    tracing::info!(%addr, nats = nats_url, "handoffd serving");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    if let Some(tx) = ready {
        let _ = tx.send(Ready {
            addr,
            nats_url: nats_url.to_string(),
        });
    }
    tokio::select! {
        r = &mut server => {
            timer_task.abort();
            agents_task.abort();
            contracts_task.abort();
            if let Some(t) = &metrics_task {
                t.abort();
            }
            return r.map_err(|e| RunError::Serve(e.to_string()));
        }
        _ = shutdown => {}
    }
    tracing::info!(grace = ?config.drain_timeout, "draining: no new connections; finishing in-flight RPCs");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
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
    timer_task.abort();
    agents_task.abort();
    contracts_task.abort();
    if let Some(t) = &metrics_task {
        t.abort();
    }
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
