//! `handoffd`: a broker that makes handoffs between AI agents durable,
//! typed and observable, over NATS JetStream.
//!
//! The binary is a thin shell around [`run`]; tests call the same function
//! with their own listener and shutdown signal. The layers, top to bottom
//! (a request flows down and never back up):
//!
//! - [`rpc`] and [`timers`]: the adapters that receive work: gRPC requests
//!   in, statuses with `google.rpc.ErrorInfo` out; due durable timers;
//! - [`app`]: the use cases (accept a handoff, fan out, arrive at a
//!   barrier, settle a delivery, end a run, fire a timer), which decide
//!   and order the writes;
//! - [`rules`]: names, ids, depth, barrier decisions and typed contracts,
//!   pure: no tonic, no NATS;
//! - [`store`]: the storage trait the use cases write through, and its
//!   JetStream implementation;
//! - [`error`]: the domain error and its stable reasons.
//!
//! Around them: [`config`], [`metrics`], [`embedded`] (the embedded
//! `nats-server` child), [`telemetry`] (logs), [`trace`] (OpenTelemetry
//! spans of handoffs, exported over OTLP), [`tls`] (TLS to clients and the
//! principal of a client certificate) and [`server`] (serving, NATS
//! credentials, draining).

#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod app;
pub mod cli;
pub mod config;
pub mod console;
pub mod embedded;
pub mod error;
pub mod link;
pub mod metrics;
pub mod rpc;
pub mod rules;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod timers;
pub mod tls;
pub mod trace;

pub use config::Config;
pub use error::BrokerError;
pub use server::{run, run_with, Ready, RunError};
