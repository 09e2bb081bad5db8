//! Validate a handoff, and read what it needs in one round trip: the
//! run, the consumed handoff and its lease, the claim on the consumed
//! delivery (taken here) and a named barrier.

use handoff_proto::pb;

use super::{Claim, ClaimKey};
use crate::{
    app::{access, Broker},
    error::BrokerError,
    rules::{handoff as rules, state as state_rules},
};

/// Checks what needs no state and reveals nothing (names, sizes, the
/// delta's shape); a consumed delivery's id is signed: verified here,
/// from memory. Returns the consumed delivery's token.
pub(super) async fn validate(
    broker: &Broker,
    req: &pb::HandoffRequest,
) -> Result<Option<pb::DeliveryToken>, BrokerError> {
    rules::validate_handoff(req, broker.config().max_payload_size)?;
    if let Some(delta) = &req.state_delta {
        state_rules::validate_delta(delta)?;
    }
    for key in &req.asks_for {
        state_rules::validate_key("asks_for", key)?;
    }
    match req.consumes.as_str() {
        "" => Ok(None),
        token => Ok(Some(access::decode(broker, token).await?)),
    }
}

/// What a handoff read, each as it came.
pub(super) struct Reads {
    pub(super) run: Result<Option<(pb::Run, u64)>, BrokerError>,
    pub(super) parent: Result<Option<pb::HandoffEnvelope>, BrokerError>,
    pub(super) claim: Result<Option<Claim>, BrokerError>,
    pub(super) barrier: Result<Option<Option<(pb::Barrier, u64)>>, BrokerError>,
    pub(super) lease: Result<Option<Option<(pb::Lease, u64)>>, BrokerError>,
    /// The claim this request makes on the consumed delivery (or on its
    /// key, when it consumes nothing).
    pub(super) mine: pb::ConsumeClaim,
    /// What the claim is on (`None`: nothing is claimed).
    pub(super) key: Option<ClaimKey>,
}

impl Reads {
    /// The claim this request took: its key and revision.
    pub(super) fn made(&self) -> Option<(ClaimKey, u64)> {
        match (&self.claim, &self.key) {
            (Ok(Some(Claim::Made(revision))), Some(key)) => Some((key.clone(), *revision)),
            _ => None,
        }
    }
}

/// Reads the run, the consumed handoff and its lease, the claim on the
/// consumed delivery (claiming it for handoff `id`) and a named barrier:
/// independent, so one round trip.
pub(super) async fn read(
    broker: &Broker,
    req: &pb::HandoffRequest,
    consumed: Option<&pb::DeliveryToken>,
    id: &str,
) -> Reads {
    let mine = rules::claim_of(req, id, consumed.map_or(0, |t| t.attempt));
    // (A keyed handoff that consumes nothing claims its key once the
    // caller's right to the run is known: see `plan`.)
    let key = match consumed {
        Some(_) if broker.config().faults.skip_claim => None,
        Some(token) => Some(ClaimKey::consumed(&token.handoff_id)),
        None => None,
    };
    let store = broker.store();
    let (run, parent, claim, barrier, lease) = tokio::join!(
        store.run(&req.run_id),
        async {
            match consumed {
                Some(token) => consumed_parent(broker, &req.run_id, token).await.map(Some),
                None => Ok(None),
            }
        },
        async {
            match &key {
                Some(key) => store.claim_consumed(key, &mine).await.map(Some),
                None => Ok(None),
            }
        },
        async {
            if req.to_barrier && !req.barrier_id.is_empty() {
                store.barrier(&req.run_id, &req.barrier_id).await.map(Some)
            } else {
                Ok(None)
            }
        },
        async {
            match consumed {
                Some(token) => store
                    .lease(&token.agent, token.stream_sequence)
                    .await
                    .map(Some),
                None => Ok(None),
            }
        },
    );
    Reads {
        run,
        parent,
        claim,
        barrier,
        lease,
        mine,
        key,
    }
}

/// Loads the handoff a delivery token names, checking it belongs to `run_id`.
pub(super) async fn consumed_parent(
    broker: &Broker,
    run_id: &str,
    token: &pb::DeliveryToken,
) -> Result<pb::HandoffEnvelope, BrokerError> {
    let stored = broker
        .store()
        .handoff_at(token.stream_sequence)
        .await?
        .ok_or_else(|| {
            BrokerError::DeliveryGone(format!(
                "the consumed delivery's handoff {} is no longer stored (retention passed)",
                token.handoff_id
            ))
        })?;
    if stored.envelope.id != token.handoff_id || stored.agent != token.agent {
        return Err(BrokerError::BadDeliveryId(
            "it does not match a stored handoff".to_string(),
        ));
    }
    if stored.envelope.run_id != run_id {
        return Err(BrokerError::malformed(
            "consumes",
            format!(
                "the consumed delivery belongs to run {:?}, not {run_id:?}",
                stored.envelope.run_id
            ),
        ));
    }
    Ok(stored.envelope)
}
