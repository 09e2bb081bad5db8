//! `handoffd`: a broker that makes handoffs between AI agents durable,
//! typed and observable, over NATS JetStream.
//!
//! The binary is a thin shell around [`run`]; tests call the same function
//! with their own listener and shutdown signal. Layout:
//!
//! - [`config`]: layered configuration (defaults, TOML, env, flags);
//! - [`domain`] and [`names`]: the rules, free of transport;
//! - [`store`]: the JetStream adapter (streams, consumers, buckets);
//! - [`contracts`]: typed contracts, their compatibility and the guards;
//! - [`metrics`]: counters and the Prometheus endpoint;
//! - [`broker`]: shared state and run transitions;
//! - [`rpc`]: the gRPC edge, one file per RPC;
//! - [`timers`]: durable deadlines;
//! - [`embedded`]: the embedded `nats-server` child;
//! - [`server`]: serving and draining.

#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod barrier;
pub mod broker;
pub mod cli;
pub mod config;
pub mod contracts;
pub mod domain;
pub mod embedded;
pub mod error;
pub mod metrics;
pub mod names;
pub mod rpc;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod timers;

pub use config::Config;
pub use error::BrokerError;
pub use server::{run, run_with, Ready, RunError};
