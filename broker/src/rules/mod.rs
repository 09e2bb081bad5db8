//! The rules of a handoff, apart from any transport or store: names,
//! ids, depth, request validation, attempts, barrier decisions and typed
//! contracts. Nothing here touches NATS or tonic, so every rule is
//! unit-tested in isolation; the use cases in [`crate::app`] apply them.

pub mod barrier;
pub mod contracts;
pub mod grants;
pub mod handoff;
pub mod lease;
pub mod names;
pub mod state;
pub mod watch;
