//! The `handoffd` command line: flags, layering and process concerns
//! (signals, exit codes). Kept in the library so a test binary can run the
//! very same daemon.

use std::{collections::BTreeMap, path::PathBuf, process::ExitCode};

use clap::Parser;

use crate::config::{self, Config};

/// handoffd: durable, typed, observable handoffs between agents, over NATS JetStream.
#[derive(Parser, Debug)]
#[command(name = "handoffd", version, about)]
pub struct Args {
    /// TOML configuration file.
    #[arg(long, env = "HANDOFF_CONFIG")]
    pub config: Option<PathBuf>,
    /// NATS URL; unset starts an embedded nats-server.
    #[arg(long)]
    pub nats_url: Option<String>,
    /// gRPC listen address [default: 127.0.0.1:7233].
    #[arg(long)]
    pub listen: Option<String>,
    /// Data directory [default: ./handoffd-data].
    #[arg(long)]
    pub data_dir: Option<String>,
    /// Log format: text or json [default: text].
    #[arg(long)]
    pub log_format: Option<String>,
    /// OTLP/gRPC collector for traces (http://host:4317); unset: no traces.
    #[arg(long)]
    pub otlp_endpoint: Option<String>,
    /// Serve without auth even on a listen address that is not loopback.
    #[arg(long)]
    pub insecure: bool,
    /// Print every configuration key with its default and exit.
    #[arg(long)]
    pub print_config_keys: bool,
}

/// Exit code for a bad configuration (EX_CONFIG... EX_USAGE = 64).
const EX_USAGE: u8 = 64;

/// Resolves the configuration from file, environment and flags.
pub fn load(args: &Args) -> Result<Config, Vec<String>> {
    let mut values = BTreeMap::new();
    let mut problems = Vec::new();
    if let Some(path) = &args.config {
        match Config::read_toml(path) {
            Ok(v) => values.extend(v),
            Err(p) => problems.extend(p),
        }
    }
    values.extend(Config::read_env(|k| std::env::var(k).ok()));
    let flags = [
        ("nats_url", &args.nats_url),
        ("listen", &args.listen),
        ("data_dir", &args.data_dir),
        ("log_format", &args.log_format),
        ("otlp_endpoint", &args.otlp_endpoint),
    ];
    for (k, v) in flags {
        if let Some(v) = v {
            values.insert(k.to_string(), v.clone());
        }
    }
    if args.insecure {
        values.insert("insecure".to_string(), "true".to_string());
    }
    match Config::from_layers(&values) {
        // Then the files the keys name (certificates, keys, secrets), so
        // one round reports those too.
        Ok(c) if problems.is_empty() => {
            let files = crate::tls::check_files(&c);
            if files.is_empty() {
                Ok(c)
            } else {
                Err(files)
            }
        }
        Ok(_) => Err(problems),
        Err(p) => {
            problems.extend(p);
            Err(problems)
        }
    }
}

/// The daemon's `main`.
pub fn main() -> ExitCode {
    let args = Args::parse();
    if args.print_config_keys {
        for k in config::KEYS {
            println!(
                "{:<22} {:<18} {:<32} {}",
                k.name,
                k.default,
                config::env_var(k.name),
                k.doc
            );
        }
        return ExitCode::SUCCESS;
    }
    let config = match load(&args) {
        Ok(c) => c,
        Err(problems) => {
            eprintln!("handoffd: invalid configuration:");
            for p in problems {
                eprintln!("  - {p}");
            }
            return ExitCode::from(EX_USAGE);
        }
    };
    crate::telemetry::init(&config);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("handoffd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(config.listen).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(listen = %config.listen, error = %e, "cannot listen");
                return ExitCode::FAILURE;
            }
        };
        let shutdown = shutdown_signal();
        match crate::run(config, listener, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e @ crate::RunError::Config(_)) => {
                tracing::error!("{e}");
                eprintln!("handoffd: {e}");
                ExitCode::from(EX_USAGE)
            }
            Err(e) => {
                tracing::error!("{e}");
                eprintln!("handoffd: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Installs the SIGINT and SIGTERM handlers now (before the broker tells
/// systemd it is ready, so an early SIGTERM drains instead of killing), and
/// returns a future that resolves on either.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut t), Ok(mut i)) => {
                tokio::select! {
                    _ = t.recv() => tracing::info!("SIGTERM received"),
                    _ = i.recv() => tracing::info!("SIGINT received"),
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}
