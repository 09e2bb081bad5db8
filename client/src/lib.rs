//! Rust SDK for the handoff broker (`handoffd`).
//!
//! ```no_run
//! # async fn demo() -> handoff_client::Result<()> {
//! use handoff_client::{AgentConfig, Client, Handoff, RunConfig};
//! # #[derive(Clone, PartialEq, prost::Message)] struct Task { #[prost(string, tag = "1")] text: String }
//! # impl prost::Name for Task { const NAME: &'static str = "Task"; const PACKAGE: &'static str = "demo"; }
//! let client = Client::connect("127.0.0.1:7233").await?;
//! client.register_agent(AgentConfig::new("worker")).await?;
//! let run = client.start_run(RunConfig::new("me").ask("summarise the report")).await?;
//! client
//!     .handoff(Handoff::to(&run.id, "worker", &Task { text: "page 1".into() })?.idempotency_key("t1"))
//!     .await?;
//! let mut sub = client.subscribe("worker", "worker-1", 1).await?;
//! if let Some(delivery) = sub.next_delivery().await {
//!     let delivery = delivery?;
//!     let task: Task = delivery.payload()?;
//!     delivery.handoff(Handoff::final_result(&run.id, &task)?).await?;
//! }
//! # Ok(()) }
//! ```
//!
//! Typed contracts: register a protobuf message type with its rules, declare
//! which contract each agent accepts and emits, and the broker refuses at
//! the door any handoff that breaks them (the error names the field and the
//! numbers). [`Client::subscribe_typed`] decodes every delivery as the
//! accepted type.
//!
//! ```no_run
//! # async fn demo(client: handoff_client::Client) -> handoff_client::Result<()> {
//! use handoff_client::{AgentConfig, ContractSpec};
//! use handoff_proto::{demo::{Subtask, WorkerResult}, DEMO_FILE_DESCRIPTOR_SET};
//! client
//!     .register_contract(
//!         ContractSpec::of::<Subtask>(DEMO_FILE_DESCRIPTOR_SET).require("instruction").max_tokens(500),
//!     )
//!     .await?;
//! client.register_contract(ContractSpec::of::<WorkerResult>(DEMO_FILE_DESCRIPTOR_SET)).await?;
//! client
//!     .register_agent(AgentConfig::new("worker").accepts::<Subtask>().emits::<WorkerResult>())
//!     .await?;
//! let mut sub = client.subscribe_typed::<Subtask>("worker", "worker-1", 1).await?;
//! while let Some(delivery) = sub.next_delivery().await {
//!     let delivery = delivery?;
//!     let task: &Subtask = delivery.payload();
//!     let result = WorkerResult { index: task.index, of: task.of, summary: "done".into(), ..Default::default() };
//!     delivery.handoff_to("aggregator", &result).await?;
//! }
//! # Ok(()) }
//! ```
//!
//! Deliveries are at least once on the wire; the SDK recognises a handoff
//! it already finished and does not hand it to the application again, and
//! complete-and-handoff ([`Delivery::handoff`]) makes a crashed agent's
//! repeated handoff the same handoff.

#![deny(missing_docs, unreachable_pub)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod client;
mod contract;
pub mod display;
mod error;
mod handoff;
mod subscription;

pub use client::{AgentConfig, Client, ConnectOptions, RunConfig, WatchFilter};
pub use contract::{ContractSpec, RegisteredContract};
pub use error::{Error, ErrorKind, Result};
pub use handoff::{decode, encode, Handoff, Receipt};
pub use subscription::{Delivery, Subscription, TypedDelivery, TypedSubscription};

/// The `handoff.v1` protobuf messages and gRPC stubs.
pub use handoff_proto::pb;
