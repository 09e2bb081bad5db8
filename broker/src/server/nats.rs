//! The broker's connection to NATS: its credentials and TLS from the
//! configuration's files, retried until `connect_timeout`, reconnecting
//! for ever once connected.

use super::*;

/// How the broker authenticates to NATS: the secrets read once from the
/// configured files (or the embedded server's generated password), and the
/// TLS files, which async-nats reads at each connection.
#[derive(Default)]
pub(super) struct NatsSecrets {
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
    pub(super) fn read(config: &Config) -> Result<NatsSecrets, FileError> {
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
    pub(super) fn embedded(credentials: &Credentials) -> NatsSecrets {
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
pub(super) async fn connect_nats(
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
pub(super) fn reconnect_delay(attempts: usize, max: Duration) -> Duration {
    if attempts <= 1 {
        return Duration::ZERO;
    }
    let doublings = u32::try_from(attempts - 2).unwrap_or(u32::MAX).min(16);
    Duration::from_millis(10u64 << doublings).min(max)
}

/// Pause between attempts to reach NATS at start.
pub(super) const CONNECT_RETRY: Duration = Duration::from_millis(250);
