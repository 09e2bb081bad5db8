//! Reading one handoff: `GetHandoff`.

use handoff_proto::pb;

use crate::{
    app::{access, auth::Caller, Broker},
    error::BrokerError,
    rules::{handoff as rules, names},
};

/// A handoff by id, for a caller that may read its run (see
/// [`access::read`]): found in the run given, else in the run the index
/// knows for it. A caller that may not read the run is answered
/// RUN_NOT_FOUND or HANDOFF_NOT_FOUND exactly as if it did not exist.
pub async fn get_handoff(
    broker: &Broker,
    caller: &Caller,
    req: pb::GetHandoffRequest,
) -> Result<pb::GetHandoffResponse, BrokerError> {
    names::validate("handoff_id", &req.handoff_id)?;
    names::validate_optional("run_id", &req.run_id)?;
    let run_id = if req.run_id.is_empty() {
        broker
            .run_index()
            .run_of(&req.handoff_id)
            .ok_or_else(|| BrokerError::HandoffNotFound(req.handoff_id.clone()))?
    } else {
        req.run_id.clone()
    };
    let run = match access::read(broker, caller, &run_id, "").await {
        // Not told apart from a handoff that does not exist, when the
        // caller did not name the run.
        Err(BrokerError::RunNotFound(_)) if req.run_id.is_empty() => {
            return Err(BrokerError::HandoffNotFound(req.handoff_id.clone()))
        }
        other => other?,
    };
    let mut timeline = broker.store().run_events(&run_id).await?;
    crate::app::clock::sort_timeline(&mut timeline);
    let events: Vec<&pb::Event> = timeline
        .iter()
        .filter(|e| e.handoff_id == req.handoff_id)
        .collect();
    if !events
        .iter()
        .any(|e| e.kind == pb::EventKind::HandoffAccepted as i32)
    {
        return Err(BrokerError::HandoffNotFound(req.handoff_id.clone()));
    }
    // Where the inbox holds it last (stored again by a redrive).
    let sequence = events
        .iter()
        .filter(|e| {
            e.kind == pb::EventKind::HandoffAccepted as i32
                || e.kind == pb::EventKind::HandoffRedriven as i32
        })
        .map(|e| e.inbox_sequence)
        .next_back()
        .unwrap_or(0);
    let (status, attempts) = rules::delivery_status(&events);
    let handoff = match sequence {
        0 => None,
        sequence => broker
            .store()
            .handoff_at(sequence)
            .await?
            .map(|m| m.envelope)
            .filter(|e| e.id == req.handoff_id),
    };
    Ok(pb::GetHandoffResponse {
        handoff,
        run: Some(run),
        status: status as i32,
        attempts,
        events: events.into_iter().cloned().collect(),
    })
}
