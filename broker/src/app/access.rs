//! Who may act in a run, and who may read one: the one rule that every
//! path writing into a run, or reading what a run holds, goes through.
//!
//! **Acting** in a run (a handoff, a final result, a branch result, a
//! state delta, a fan-out, a barrier, a judge's verdict) needs a right to
//! that run: the caller has `own` on the run's owner, or it consumes a
//! delivery of that run that it receives (`receive_as` the delivery's
//! agent) while that delivery's lease lives. `send_as` only decides which
//! source the caller may name, never which run it may act in.
//!
//! **Reading** a run (its timeline, state, barriers, payloads) needs
//! `read`, `own` on its owner, or a live delivery of it.
//!
//! A caller with none of these is answered as if the run did not exist
//! (NOT_FOUND, `RUN_NOT_FOUND`), whether it exists or not, so run ids
//! cannot be probed; a caller with `read` (who may see the run anyway) is
//! told it may not act (PERMISSION_DENIED, `NOT_GRANTED`). Everything a
//! caller may learn is decided here before any contract check, payload
//! fetch or write, so a refused caller learns nothing about the run or the
//! target and leaves nothing in the run's timeline.
//!
//! The checks come in two steps so that they cost no round trip of their
//! own: [`precheck`] from memory (the sources, the consumed delivery's
//! agent and run, from its signed token), then [`may_act`] / [`read`] on
//! what the use case reads anyway (the run, the delivery's lease record).

use std::time::Duration;

use handoff_proto::pb;

use crate::{
    app::{
        agents::lease_of,
        auth::{self, Caller},
        Broker,
    },
    error::BrokerError,
    rules::{
        grants::Action,
        handoff as rules,
        lease::{self, Ask, Decision},
    },
};

/// What can be refused before anything is read: every source the caller
/// names needs `send_as`; a consumed delivery needs `receive_as` its agent
/// and must be of run `run_id` (its signed token says which).
pub async fn precheck<'a>(
    broker: &Broker,
    caller: &Caller,
    run_id: &str,
    sources: impl IntoIterator<Item = &'a str>,
    consumed: Option<&pb::DeliveryToken>,
) -> Result<(), BrokerError> {
    let mut sources: Vec<&str> = sources.into_iter().filter(|s| !s.is_empty()).collect();
    sources.sort_unstable();
    sources.dedup();
    for source in sources {
        auth::require(broker, caller, Action::SendAs, source).await?;
    }
    if let Some(token) = consumed {
        auth::require(broker, caller, Action::ReceiveAs, &token.agent).await?;
        if !token.run_id.is_empty() && token.run_id != run_id {
            return Err(BrokerError::malformed(
                "consumes",
                format!(
                    "the consumed delivery belongs to run {:?}, not {run_id:?}",
                    token.run_id
                ),
            ));
        }
    }
    Ok(())
}

/// Whether a consumed delivery's lease lives, from its lease record as
/// read (`None`: none recorded): `Err` with `ALREADY_SETTLED` or
/// `LEASE_SUPERSEDED` once it was settled, delivered again or its lease
/// passed.
pub async fn lease_lives(
    broker: &Broker,
    token: &pb::DeliveryToken,
    record: Option<(pb::Lease, u64)>,
) -> Result<(), BrokerError> {
    decide(broker, token, record, Ask::Extend).await.map(|_| ())
}

/// The right a consumed delivery gives (the `consumed` of [`may_act`]):
/// its lease lives ([`lease_lives`]), or the request is a redo of what
/// that very attempt stored and acked without recording its receipt in
/// the delivery's claim (`claim`, as read): the lease says this attempt
/// acked it, and the claim, taken by this attempt, records nothing. (A
/// claim whose storing failed is withdrawn, and an attempt acks its
/// delivery only once something is stored.) Such a redo goes on to be
/// recognised by the ids of what it stored.
pub async fn consumed_right(
    broker: &Broker,
    token: &pb::DeliveryToken,
    record: Option<(pb::Lease, u64)>,
    claim: Option<&pb::ConsumeClaim>,
) -> Result<(), BrokerError> {
    let acked = record.as_ref().is_some_and(|(l, _)| {
        l.attempt == token.attempt && l.state == pb::LeaseState::Acked as i32
    });
    let unrecorded =
        claim.is_some_and(|first| first.attempt == token.attempt && first.stored.is_empty());
    if acked && unrecorded {
        return Ok(());
    }
    lease_lives(broker, token, record).await
}

/// The right to act in `run` (read as `run`: `None` when it does not
/// exist), for a caller that passed [`precheck`]; `consumed` is whether the
/// delivery it consumes (if any) holds its lease ([`lease_lives`]).
///
/// A consumed delivery whose lease is gone is refused with its lease's
/// reason, whoever the caller: a delivery id is a capability only while
/// its lease lives. Otherwise the caller may act if it owns the run or
/// holds the live delivery; else it is answered as [`hidden`] says.
pub async fn may_act(
    broker: &Broker,
    caller: &Caller,
    run_id: &str,
    run: Option<&pb::Run>,
    consumed: Option<Result<(), BrokerError>>,
) -> Result<(), BrokerError> {
    let Some(run) = run else {
        return Err(BrokerError::RunNotFound(run_id.to_string()));
    };
    match consumed {
        Some(Err(gone)) => Err(gone),
        Some(Ok(())) => Ok(()),
        None if caller.may(Action::Own, &run.owner) => Ok(()),
        None => Err(hidden(broker, caller, run).await),
    }
}

/// The refusal of a caller without a right to `run`: NOT_GRANTED to one
/// that may read every run, else RUN_NOT_FOUND, the same answer as for a
/// run that does not exist. Counted and announced as a denial either way.
pub async fn hidden(broker: &Broker, caller: &Caller, run: &pb::Run) -> BrokerError {
    let refused = auth::not_granted(caller, Action::Own, &run.owner);
    let refused = auth::deny(broker, refused, &caller.principal).await;
    if caller.may(Action::Read, "") {
        refused
    } else {
        BrokerError::RunNotFound(run.id.clone())
    }
}

/// Checks that a delivery belongs to run `run_id` (BAD_DELIVERY_ID if
/// not): from its signed token, or, for a token signed before deliveries
/// named their run, from the stored handoff it delivers.
pub async fn delivery_of_run(
    broker: &Broker,
    token: &pb::DeliveryToken,
    run_id: &str,
) -> Result<(), BrokerError> {
    let of_run = if token.run_id.is_empty() {
        broker
            .store()
            .handoff_at(token.stream_sequence)
            .await?
            .is_some_and(|m| m.envelope.id == token.handoff_id && m.envelope.run_id == run_id)
    } else {
        token.run_id == run_id
    };
    if of_run {
        Ok(())
    } else {
        Err(BrokerError::BadDeliveryId(format!(
            "it is not a delivery of run {run_id:?}"
        )))
    }
}

/// Reads run `run_id` for a caller that wants to see what it holds: with
/// `read`, `own` on its owner, or (`delivery_id`) a live delivery of the
/// run that it receives. Anyone else is answered RUN_NOT_FOUND, as for a
/// run that does not exist.
pub async fn read(
    broker: &Broker,
    caller: &Caller,
    run_id: &str,
    delivery_id: &str,
) -> Result<pb::Run, BrokerError> {
    if delivery_id.is_empty() {
        let run = broker.store().run(run_id).await?;
        let Some((run, _)) = run else {
            return Err(BrokerError::RunNotFound(run_id.to_string()));
        };
        if caller.may(Action::Read, "") || caller.may(Action::Own, &run.owner) {
            return Ok(run);
        }
        let refused = auth::not_granted(caller, Action::Own, &run.owner);
        auth::deny(broker, refused, &caller.principal).await;
        return Err(BrokerError::RunNotFound(run_id.to_string()));
    }
    // An agent working in the run: the delivery it holds is signed by the
    // broker, of this run, and its lease lives.
    let token = decode(broker, delivery_id).await?;
    auth::require(broker, caller, Action::ReceiveAs, &token.agent).await?;
    let (run, record, of_run) = tokio::join!(
        broker.store().run(run_id),
        broker.store().lease(&token.agent, token.stream_sequence),
        delivery_of_run(broker, &token, run_id)
    );
    of_run?;
    lease_lives(broker, &token, record?).await?;
    run?.map(|(r, _)| r)
        .ok_or_else(|| BrokerError::RunNotFound(run_id.to_string()))
}

/// Decodes a delivery id and checks that the store issued its reference
/// for that agent's delivery (INVALID_ARGUMENT, `BAD_DELIVERY_ID`) and
/// that its signature verifies (PERMISSION_DENIED, `BAD_SIGNATURE`).
pub async fn decode(broker: &Broker, delivery_id: &str) -> Result<pb::DeliveryToken, BrokerError> {
    let token = rules::decode_token(delivery_id)?;
    if !broker.store().reference_matches(&token) {
        return Err(BrokerError::BadDeliveryId(
            "not a token issued by the broker".to_string(),
        ));
    }
    auth::verify(broker, &token).await?;
    Ok(token)
}

/// The lease an agent's deliveries get.
pub async fn lease_for(broker: &Broker, agent: &str) -> Duration {
    match broker.agent(agent).await {
        Ok(spec) => lease_of(&spec, broker.config().default_lease),
        Err(_) => broker.config().default_lease,
    }
}

/// The lease of a first attempt that nothing recorded yet: what its
/// signed token says. A first delivery writes no record (it costs the hop
/// nothing); a redelivery, or a settlement, writes one.
fn first_attempt(token: &pb::DeliveryToken) -> Option<pb::Lease> {
    (token.attempt == 1).then(|| pb::Lease {
        attempt: 1,
        instance: token.instance.clone(),
        deadline: token.lease_deadline,
        state: pb::LeaseState::Leased as i32,
        settled_at: None,
        delivery: token.ack_subject.clone(),
    })
}

/// The decision on settling `token`'s attempt as `ask`, from its lease
/// record as stored now (`None`: none yet); with the record's revision
/// (`None`: to be created).
pub async fn decide(
    broker: &Broker,
    token: &pb::DeliveryToken,
    record: Option<(pb::Lease, u64)>,
    ask: Ask,
) -> Result<(Decision, Option<u64>), BrokerError> {
    let lease = lease_for(broker, &token.agent).await;
    let revision = record.as_ref().map(|(_, r)| *r);
    let current = match record {
        Some((l, _)) => Some(l),
        None => first_attempt(token),
    };
    let decision = lease::settle(
        current.as_ref(),
        token,
        ask,
        std::time::SystemTime::now(),
        lease,
    )?;
    Ok((decision, revision))
}
