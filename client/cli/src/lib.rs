//! The library half of `handoffctl`: human-readable rendering of runs,
//! timelines, barriers and contracts, and a run's export as JSON, shared by the `handoffctl` binary
//! and the `pipeline` example. The SDK (`handoff-client`) renders nothing;
//! this crate owns the tables and the time formatting.

#![deny(missing_docs, unreachable_pub)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod display;
pub mod export;
