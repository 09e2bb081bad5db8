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
//! Fan-out and join: a planner hands one branch per item to a worker
//! agent and names the agent that receives the joined results. The broker
//! opens a barrier, and once every branch has reported (or a quorum, or
//! the timeout) hands the aggregator exactly one release with every
//! branch's result in branch-key order. See [`FanOut`] and [`Join`].
//!
//! ```no_run
//! # async fn demo(client: handoff_client::Client) -> handoff_client::Result<()> {
//! use handoff_client::JoinMode;
//! use handoff_proto::demo::{Ask, Report, Subtask, WorkerResult};
//! // The planner: consumes its Ask and fans out one Subtask per source.
//! let mut planner = client.subscribe_typed::<Ask>("planner", "planner-1", 1).await?;
//! if let Some(ask) = planner.next_delivery().await {
//!     let ask = ask?;
//!     let tasks = ["q1.pdf", "q2.pdf", "q3.pdf"].iter().enumerate().map(|(i, source)| Subtask {
//!         index: i as u32,
//!         of: 3,
//!         instruction: format!("summarise {source}"),
//!         sources: vec![source.to_string()],
//!     });
//!     let fanned = ask.fan_out("worker", tasks).join("aggregator", JoinMode::All).await?;
//!     println!("barrier {} opened", fanned.barrier_id);
//! }
//! // A worker: answers its branch to the barrier, not to an agent.
//! let mut worker = client.subscribe_typed::<Subtask>("worker", "worker-1", 1).await?;
//! if let Some(task) = worker.next_delivery().await {
//!     let task = task?;
//!     let result = WorkerResult { index: task.payload().index, of: 3, summary: "done".into(), ..Default::default() };
//!     task.to_barrier(&result).await?;
//! }
//! // The aggregator: one delivery, the release, with every result.
//! let mut aggregator = client.subscribe("aggregator", "aggregator-1", 1).await?;
//! if let Some(release) = aggregator.next_delivery().await {
//!     let release = release?;
//!     let join = release.join::<WorkerResult>()?;
//!     let report = Report {
//!         answer: format!("{} of {} branches", join.results().count(), join.branches.len()),
//!         results: join.results().map(|(_, r)| r.clone()).collect(),
//!     };
//!     release.handoff(handoff_client::Handoff::final_result(release.run_id(), &report)?).await?;
//! }
//! # Ok(()) }
//! ```
//!
//! Deliveries are at least once on the wire; the SDK recognises a handoff
//! it already finished and does not hand it to the application again, and
//! complete-and-handoff ([`Delivery::handoff`]) makes a crashed agent's
//! repeated handoff the same handoff.
//!
//! Every call fails with one [`Error`] type: match on [`Error::kind`] for
//! the class of failure and on [`Error::reason`] (with
//! [`Error::metadata`]) for the broker's precise cause, never on the
//! message text.

#![deny(missing_docs, unreachable_pub)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod admin;
mod barrier;
mod client;
mod contract;
mod error;
mod handoff;
mod otel;
mod payload;
pub mod state;
mod subscription;

pub use admin::{parse_grant, NewToken};
pub use barrier::{Branch, FanOut, FanOutReceipt, Join, JoinMode};
pub use client::{
    AgentConfig, BearerToken, Client, ConnectOptions, RawClient, RunConfig, WatchFilter,
};
pub use contract::{ContractSpec, RegisteredContract};
pub use error::{Disposition, Error, ErrorKind, FieldViolation, Result};
pub use handoff::{decode, encode, Handoff, Receipt};
pub use state::StateDelta;
pub use subscription::{
    retry_delay, Delivery, SubscribeOptions, Subscription, TypedDelivery, TypedSubscription,
    INTENT_MISMATCH,
};

/// The `handoff.v1` protobuf messages and gRPC stubs.
pub use handoff_proto::pb;
