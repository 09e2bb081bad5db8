//! Accept one handoff: validate -> authenticate (what memory can) ->
//! read (one round trip) -> plan (the right to the run, a redo, the
//! guards) -> commit -> notify.
//!
//! Order of a complete-and-handoff, chosen so that a crash anywhere leaves
//! a state a retry repairs: (1) store the new handoff in the target's inbox
//! under an id derived from the consumed handoff, (2) publish the accepted
//! event and ack the consumed delivery, together, and answer once both
//! are confirmed. A crash before the ack redelivers the input; the agent's
//! repeated handoff has the same id and the store recognises it, so
//! downstream sees it once. A failed event publish fails the call, and the
//! retry, recognised by the claim on the consumed delivery, publishes it
//! under the same id.
//!
//! Who may act in the run is decided first (see [`access`]): what memory
//! can (the source, the consumed delivery's agent and run) before any
//! read, the rest (the run's owner, the consumed delivery's lease) on the
//! reads the handoff makes anyway. Only then are a payload by reference
//! fetched and the guards (see [`guard`](crate::app::guard)) run, so a refused caller learns
//! nothing of the target and leaves nothing behind. A claim on the
//! consumed delivery is taken with the reads (by a caller that receives
//! as its agent), and withdrawn if nothing was stored, so a failed step
//! leaves no claim behind.

use std::sync::atomic::{AtomicBool, Ordering};

use handoff_proto::pb;

use crate::{
    app::{access, auth::Caller, Broker},
    error::BrokerError,
    rules::handoff as rules,
    store::{Claim, ClaimKey, TimerKind},
};

mod commit;
mod plan;
mod read;

use plan::Plan;

/// Accepts one handoff from `caller`.
pub async fn accept(
    broker: &Broker,
    caller: &Caller,
    req: pb::HandoffRequest,
) -> Result<pb::HandoffResponse, BrokerError> {
    accept_as(broker, caller, req, Receipts::Each).await
}

/// Who records what a consumed delivery stored into its claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Receipts {
    /// Each handoff records its own receipt.
    Each,
    /// The caller records them together (a fan-out, once every branch is
    /// stored).
    Caller,
}

/// Accepts one handoff; `receipts` says who records its receipt.
pub async fn accept_as(
    broker: &Broker,
    caller: &Caller,
    mut req: pb::HandoffRequest,
    receipts: Receipts,
) -> Result<pb::HandoffResponse, BrokerError> {
    // 1. Validate what needs no state and reveals nothing.
    let consumed = read::validate(broker, &req).await?;
    let consumed = consumed.as_ref();
    // 2. Authenticate what memory can: the source, the consumed
    //    delivery's agent and run (see `access`).
    let sources = [req.source_agent.as_str()];
    access::precheck(broker, caller, &req.run_id, sources, consumed).await?;
    let id = rules::handoff_id(&req, consumed.map(|t| t.handoff_id.as_str()));
    // 3. Read, in one round trip; the consumed delivery is claimed. The
    //    contract guards of a payload carried inline run meanwhile (their
    //    outcome is acted on only once the right to the run is known).
    let (reads, guarded) = tokio::join!(
        read::read(broker, &req, consumed, &id),
        plan::guard_inline(broker, &req)
    );
    let mut made = reads.made();
    // The claim as this request knows it, to record the receipt into
    // without reading it again.
    let mut known = made.as_ref().map(|(_, rev)| (reads.mine.clone(), *rev));
    // 4 to 7. Plan, commit and notify; withdraw this request's claim if
    //    nothing was stored.
    let stored = AtomicBool::new(false);
    let result = async {
        let plan = plan::plan(
            broker, caller, &mut req, consumed, &id, reads, guarded, &mut made, &mut known,
            receipts,
        )
        .await?;
        match plan {
            Plan::Answered(answer) => Ok(answer),
            Plan::Commit {
                read,
                checked,
                receipt,
            } => {
                let receipt = receipt.filter(|_| receipts == Receipts::Each).map(|r| *r);
                commit::commit(broker, &req, receipt, consumed, id, checked, *read, &stored).await
            }
        }
    }
    .await;
    if result.is_err() && !stored.load(Ordering::Relaxed) {
        if let Some((key, revision)) = made {
            broker.store().release_claim(&key, revision).await;
        }
    }
    result
}
